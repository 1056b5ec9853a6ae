"""ListOps (Nangia & Bowman, 2018) as in Long Range Arena (Tay et al., 2021): generator, TSV.

An example is a nested expression over the digits 0..9 with the operators

- ``[MAX`` / ``[MIN``: largest / smallest argument;
- ``[MED``: the median, ``int(numpy.median(args))`` as LRA computes it, i.e. the floor of the
  mean of the two middle values for an even count;
- ``[SM``: the sum of the arguments modulo 10;

each closed by ``]``; the label (10 classes) is the expression's value.

Generator (LRA's recipe, ``lra_benchmarks/data/listops.py``): below the depth limit a node is
an operator with probability ``op_prob`` (LRA: 0.25) and a uniform digit otherwise; an operator
is uniform over the four and has a uniform number of arguments in ``[2, max_args]``; trees are
drawn until their length lies in the requested range. Two conventions differ from LRA's
flags, on purpose:

- depth counts operators: ``[MAX 2 9 ]`` has depth 1, and the root is always an operator
  (LRA draws the root like any node but rejects the length-1 trees, the same distribution);
  LRA's ``max_depth=10`` is ``max_depth=9`` here. ``min_depth`` rejects shallower trees, so
  ``max_depth=4`` for training and ``min_depth=5, max_depth=6`` for testing gives a split
  shifted in depth; ``min_length`` / ``max_length`` shift the length the same way;
- the length range is inclusive (LRA: ``min_length < length < max_length``).

Length is the number of tokens, parentheses excluded (what LRA counts). The source string
is LRA's TSV format, a left-nested binary bracketing: ``[MAX 2 9 ]`` is written
``( ( ( [MAX 2 ) 9 ) ] )``. LRA's own pipeline tokenises it with tfds' alphanumeric
``Tokenizer``, which silently drops every bracket; here the tokens keep operators and ``]``
and drop only the parentheses (which carry no information), over the fixed vocabulary
:data:`VOCAB` (0 = pad).

Shapes: N examples, L tokens per example.

Example:
    >>> train = generate_listops(1000, seed=0, max_depth=4, min_length=20, max_length=200)
    >>> test = generate_listops(200, seed=1, min_depth=5, max_depth=6, max_length=400,
    ...                         seq_len=200)                     # deeper, truncated to 200
    >>> save_listops_tsv("basic_test.tsv", test.sources, test.labels)
    >>> again = load_listops_tsv("basic_test.tsv", seq_len=200)
"""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "END",
    "OPERATORS",
    "VOCAB",
    "ListOps",
    "encode_listops",
    "evaluate",
    "generate_listops",
    "load_listops_tsv",
    "parse",
    "save_listops_tsv",
    "to_source",
    "to_tokens",
    "tree_depth",
]

OPERATORS: tuple[str, ...] = ("[MAX", "[MIN", "[MED", "[SM")
END = "]"
#: Token strings by id; id 0 is padding.
VOCAB: tuple[str, ...] = ("<pad>", *(str(d) for d in range(10)), *OPERATORS, END)
_ID = {tok: i for i, tok in enumerate(VOCAB)}

#: A tree is a digit or ``(operator, arguments)``.
Tree = int | tuple[str, tuple["Tree", ...]]


class ListOps(NamedTuple):
    """N ListOps examples.

    Attributes:
        tokens: (N, L) int32 ids into :data:`VOCAB` (0 = pad), truncated to L.
        mask: (N, L) bool, True on real tokens.
        labels: (N,) int32 values 0..9.
        depth: (N,) int32 operator nesting depth (a difficulty measure).
        length: (N,) int32 tokens before padding or truncation (a difficulty measure).
        sources: N expression strings in LRA's TSV format.
    """

    tokens: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    depth: np.ndarray
    length: np.ndarray
    sources: tuple[str, ...]


def evaluate(tree: Tree) -> int:
    """The value of an expression tree."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    values = [evaluate(a) for a in args]
    if op == "[MAX":
        return max(values)
    if op == "[MIN":
        return min(values)
    if op == "[SM":
        return sum(values) % 10
    s = sorted(values)
    n = len(s)
    return (s[(n - 1) // 2] + s[n // 2]) // 2


def tree_depth(tree: Tree) -> int:
    """Operator nesting depth: 0 for a digit, 1 + the deepest argument for an operator."""
    if isinstance(tree, int):
        return 0
    return 1 + max(tree_depth(a) for a in tree[1])


def to_tokens(tree: Tree) -> list[str]:
    """Prefix tokens without parentheses: ``[MAX 2 [SM 3 4 ] ]``."""
    if isinstance(tree, int):
        return [str(tree)]
    out = [tree[0]]
    for a in tree[1]:
        out += to_tokens(a)
    return out + [END]


def to_source(tree: Tree) -> str:
    """LRA's string form: ``( ( ( [MAX 2 ) 9 ) ] )`` for ``[MAX 2 9 ]``."""
    if isinstance(tree, int):
        return str(tree)
    text = tree[0]
    for a in tree[1]:
        text = f"( {text} {to_source(a)} )"
    return f"( {text} {END} )"


def parse(source: str) -> Tree:
    """Parse a ListOps string, with or without LRA's parentheses.

    Raises:
        ValueError: an unknown token, an operator with no argument, an unbalanced ``]``, or
            text after the expression.
    """
    tokens = [t for t in source.split() if t not in "()"]
    stack: list[tuple[str, list[Tree]]] = []
    result: Tree | None = None
    for pos, tok in enumerate(tokens):
        if result is not None:
            raise ValueError(f"source: text after the expression at token {pos} ({tok!r})")
        if tok in OPERATORS:
            stack.append((tok, []))
            continue
        if tok == END:
            if not stack or not stack[-1][1]:
                raise ValueError(f"source: unexpected {END!r} at token {pos}")
            op, args = stack.pop()
            node: Tree = (op, tuple(args))
        elif tok.isdigit() and len(tok) == 1:
            node = int(tok)
        else:
            raise ValueError(f"source: unknown token {tok!r} at token {pos}")
        if stack:
            stack[-1][1].append(node)
        else:
            result = node
    if result is None or stack:
        raise ValueError("source: incomplete expression")
    return result


def encode_listops(sources: Sequence[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each source, truncated or padded to ``seq_len``.

    Returns:
        ``(tokens (N, L) int32, mask (N, L) bool)``.

    Raises:
        ValueError: ``seq_len`` < 1 or an unknown token.
    """
    if not isinstance(seq_len, int | np.integer) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    tokens = np.zeros((len(sources), int(seq_len)), np.int32)
    for i, source in enumerate(sources):
        toks = [t for t in source.split() if t not in "()"][:seq_len]
        try:
            tokens[i, : len(toks)] = [_ID[t] for t in toks]
        except KeyError as err:
            raise ValueError(f"sources[{i}]: unknown token {err.args[0]!r}") from None
    return tokens, tokens != 0


class _TooLong(Exception):
    pass


def _draw(rng: np.random.Generator, max_depth: int, max_args: int, op_prob: float, limit: int):
    """One tree (root an operator) and its length; _TooLong once it passes ``limit`` tokens."""
    count = [0]

    def node(depth: int) -> Tree:  # depth: the nesting this node has if it is an operator
        if depth <= max_depth and (depth == 1 or rng.random() < op_prob):
            count[0] += 2
            if count[0] > limit:
                raise _TooLong
            arity = int(rng.integers(2, max_args + 1))
            op = OPERATORS[int(rng.integers(len(OPERATORS)))]
            return (op, tuple(node(depth + 1) for _ in range(arity)))
        count[0] += 1
        if count[0] > limit:
            raise _TooLong
        return int(rng.integers(10))

    tree = node(1)
    return tree, count[0]


def _records(trees: Sequence[Tree], sources: Sequence[str], seq_len: int) -> ListOps:
    tokens, mask = encode_listops(sources, seq_len)
    return ListOps(
        tokens,
        mask,
        np.array([evaluate(t) for t in trees], np.int32),
        np.array([tree_depth(t) for t in trees], np.int32),
        np.array([len(to_tokens(t)) for t in trees], np.int32),
        tuple(sources),
    )


def generate_listops(
    num: int,
    *,
    seed: int = 0,
    min_depth: int = 1,
    max_depth: int = 9,
    max_args: int = 10,
    min_length: int = 1,
    max_length: int = 2000,
    op_prob: float = 0.25,
    seq_len: int | None = None,
    unique: bool = True,
    max_tries: int | None = None,
) -> ListOps:
    """``num`` random expressions by LRA's recipe, deterministic given ``seed``.

    Args:
        num: N.
        seed: the generator's seed.
        min_depth, max_depth: operator nesting depth range (inclusive), 1 <= min <= max.
        max_args: largest operator arity (>= 2).
        min_length, max_length: token-count range (inclusive).
        op_prob: probability that a node below the depth limit is an operator (LRA: 0.25).
        seq_len: L, padding / truncation length (default ``max_length``).
        unique: no two examples share a source string (LRA deduplicates).
        max_tries: trees drawn before giving up (default 1000 N + 1000).

    Returns:
        A :class:`ListOps`.

    Raises:
        ValueError: a bad argument, or a range so narrow that ``max_tries`` draws do not fill it.
    """
    if not isinstance(num, int | np.integer) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not 1 <= min_depth <= max_depth:
        raise ValueError(f"need 1 <= min_depth <= max_depth, got {min_depth}, {max_depth}")
    if max_args < 2:
        raise ValueError(f"max_args must be >= 2, got {max_args}")
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    if not 0.0 <= op_prob <= 1.0:
        raise ValueError(f"op_prob must be in [0, 1], got {op_prob}")
    seq_len = max_length if seq_len is None else seq_len
    max_tries = 1000 * int(num) + 1000 if max_tries is None else max_tries
    rng = np.random.default_rng(seed)
    trees: list[Tree] = []
    sources: list[str] = []
    seen: set[str] = set()
    for _ in range(max_tries):
        try:
            tree, length = _draw(rng, max_depth, max_args, op_prob, max_length)
        except _TooLong:
            continue
        if length < min_length or tree_depth(tree) < min_depth:
            continue
        source = to_source(tree)
        if unique and source in seen:
            continue
        seen.add(source)
        trees.append(tree)
        sources.append(source)
        if len(trees) == num:
            return _records(trees, sources, seq_len)
    raise ValueError(
        f"max_tries: only {len(trees)} of {num} examples in {max_tries} draws; widen the depth "
        f"or length range or raise op_prob"
    )


def save_listops_tsv(
    path: str | pathlib.Path, sources: Sequence[str], labels: Sequence[int]
) -> None:
    """Write LRA's TSV: a ``Source\\tTarget`` header, then one ``source\\tlabel`` row each."""
    if len(sources) != len(labels):
        raise ValueError(f"labels: {len(labels)} labels for {len(sources)} sources")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["Source", "Target"])
        writer.writerows([s, int(y)] for s, y in zip(sources, labels, strict=True))


def load_listops_tsv(path: str | pathlib.Path, seq_len: int = 2000) -> ListOps:
    """Read one of LRA's ListOps TSV files (``basic_train.tsv`` etc.).

    The file's labels are kept as written (not recomputed); depth and length come from
    parsing each source.

    Raises:
        ValueError: a missing ``Source``/``Target`` header, no rows, an unparsable row or a
            label outside 0..9.
    """
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["Source", "Target"]:
            raise ValueError(f"path: {path} lacks the 'Source\\tTarget' header, got {header}")
        rows = [r for r in reader if r]
    if not rows:
        raise ValueError(f"path: {path} has a header but no rows")
    sources = [r[0] for r in rows]
    trees = []
    labels = []
    for i, row in enumerate(rows):
        try:
            trees.append(parse(row[0]))
            label = int(row[1])
        except (ValueError, IndexError) as err:
            raise ValueError(f"path: {path} row {i + 2}: {err}") from None
        if not 0 <= label <= 9:
            raise ValueError(f"path: {path} row {i + 2}: label {label} outside 0..9")
        labels.append(label)
    records = _records(trees, sources, seq_len)
    return records._replace(labels=np.array(labels, np.int32))
