"""Labelled text corpora read from the files that ship with Python itself, and byte tokens.

Nothing is downloaded: the text is the running interpreter's own English documentation and
standard-library source. Two corpora:

``"doc_vs_code"``
    class 0 ``"doc"``: the topics of the interactive help, ``pydoc_data.topics.topics`` (a
    dict from topic name to English prose generated from the Python documentation), one
    document per topic; class 1 ``"code"``: the top-level modules of the standard library
    (``<stdlib>/*.py``, ``<stdlib>`` = ``sysconfig.get_paths()["stdlib"]``), one document per
    file. ``pydoc_data/topics.py`` is a package file, so it is never a "code" document (it
    would leak the prose into the other class).
``"stdlib_packages"``
    one class per standard-library package (default: asyncio, email, multiprocessing,
    unittest, xml), one document per ``.py`` file of the package, test folders excluded:
    which package does a passage of source code come from?

Documents are named ``"pydoc/<topic>"`` or ``"stdlib/<path relative to the stdlib>"``;
:func:`read_document` returns a name's bytes (the topic text in UTF-8, or the file's bytes).

Splits are BY DOCUMENT: each class's documents are shuffled with a seeded generator and cut
into train / val / test by the given fractions, so no file (or topic) contributes passages to
two splits. Each document is cut into non-overlapping passages of L bytes (a last, shorter
piece is kept when it has at least ``min_bytes``), and each (split, class) is subsampled to at
most ``max_per_class`` passages (seeded; ``balance=True`` also caps every class at the split's
smallest class -- the pydoc prose is ~0.5 MB against several MB of source). The standard
library differs between Python versions, so a :class:`CorpusManifest` records the Python
version and, per split, every document's name, label and SHA-256; :func:`verify_manifest`
re-reads the documents and lists those whose bytes changed.

Tokens (shared with the byte-level LRA Text task): byte b is token b + 1 and 0 is padding
(:data:`PAD_ID`), :data:`VOCAB_SIZE` = 257, as tfds' ``ByteTextEncoder`` used by LRA.
:func:`encode_bytes` truncates or pads to a fixed length L and returns a mask.

Character-level LM (shared with the MoE issue): :func:`concat_documents` joins a split's
documents into one byte stream; :func:`lm_windows` cuts (B, L) inputs and next-byte targets
from it, at seeded random offsets or as consecutive non-overlapping windows.

Shapes: N passages, L bytes per passage, B windows.

Example:
    >>> corpus = build_corpus("doc_vs_code", length=256, seed=0, max_per_class=500)
    >>> corpus.train.tokens.shape                      # (N, 256) int32
    >>> verify_manifest(corpus.manifest)               # () when the files are unchanged
    >>> docs = concat_documents(corpus.manifest.splits["train"].names)
    >>> batch = lm_windows(docs, length=128, num_windows=32, seed=0)   # inputs, targets (32, 128)
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import platform
import sysconfig
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "CORPORA",
    "DEFAULT_PACKAGES",
    "PAD_ID",
    "SPLITS",
    "VOCAB_SIZE",
    "CorpusManifest",
    "LMWindows",
    "Passages",
    "SplitManifest",
    "TextCorpus",
    "build_corpus",
    "concat_documents",
    "decode_tokens",
    "encode_bytes",
    "list_documents",
    "lm_windows",
    "python_version",
    "read_document",
    "sha256",
    "split_documents",
    "verify_manifest",
]

CORPORA: tuple[str, ...] = ("doc_vs_code", "stdlib_packages")
DEFAULT_PACKAGES: tuple[str, ...] = ("asyncio", "email", "multiprocessing", "unittest", "xml")
SPLITS: tuple[str, ...] = ("train", "val", "test")
PAD_ID = 0
VOCAB_SIZE = 257

_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages"})


def python_version() -> str:
    """The interpreter whose files are read, e.g. ``"CPython 3.11.7"``."""
    return f"{platform.python_implementation()} {platform.python_version()}"


def _stdlib() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _topics() -> dict[str, str]:
    from pydoc_data import topics

    return topics.topics


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_document(name: str) -> bytes:
    """The bytes of a document named ``"pydoc/<topic>"`` or ``"stdlib/<relative path>"``.

    Raises:
        ValueError: a ``name`` with neither prefix, or one naming no topic or file.
    """
    kind, _, rest = name.partition("/")
    if kind == "pydoc":
        topics = _topics()
        if rest not in topics:
            raise ValueError(f"name {name!r}: no pydoc topic {rest!r}")
        return topics[rest].encode("utf-8")
    if kind == "stdlib":
        path = _stdlib() / rest
        if not rest or ".." in pathlib.PurePosixPath(rest).parts or not path.is_file():
            raise ValueError(f"name {name!r}: no file {rest!r} in the standard library")
        return path.read_bytes()
    raise ValueError(f"name must start with 'pydoc/' or 'stdlib/', got {name!r}")


def _package_files(package: str) -> list[str]:
    root = _stdlib()
    folder = root / package
    if not folder.is_dir():
        raise ValueError(f"packages: {package!r} is not a package of this standard library")
    names = []
    for path in folder.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]):
            names.append("stdlib/" + rel.as_posix())
    return sorted(names)


def list_documents(
    corpus: str = "doc_vs_code", packages: Sequence[str] = DEFAULT_PACKAGES
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
    """The documents of ``corpus``, sorted by name within each class.

    Args:
        corpus: a name from :data:`CORPORA`.
        packages: the classes of ``"stdlib_packages"`` (ignored otherwise).

    Returns:
        ``(class_names, names, labels)``.

    Raises:
        ValueError: unknown ``corpus``; fewer than two ``packages`` or one that is missing.
    """
    if corpus == "doc_vs_code":
        docs = ["pydoc/" + key for key in sorted(_topics())]
        code = sorted("stdlib/" + p.name for p in _stdlib().glob("*.py") if p.is_file())
        return ("doc", "code"), tuple(docs + code), (0,) * len(docs) + (1,) * len(code)
    if corpus == "stdlib_packages":
        packages = tuple(packages)
        if len(packages) < 2 or len(set(packages)) != len(packages):
            raise ValueError(f"packages must name >= 2 distinct packages, got {packages!r}")
        names: list[str] = []
        labels: list[int] = []
        for label, package in enumerate(packages):
            files = _package_files(package)
            names += files
            labels += [label] * len(files)
        return packages, tuple(names), tuple(labels)
    raise ValueError(f"unknown corpus {corpus!r}; known: {list(CORPORA)}")


def split_documents(
    labels: Sequence[int], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Stratified split of documents (not passages) into ``len(fractions)`` disjoint sets.

    Each class's documents are shuffled with ``default_rng((seed, class))`` and cut at the
    cumulative fractions (rounded); every split with a positive fraction gets at least one
    document of each class.

    Args:
        labels: (D,) class of each document.
        fractions: non-negative shares summing to 1.
        seed: the shuffle's seed.

    Returns:
        One sorted int array of document indices per split.

    Raises:
        ValueError: bad ``fractions``, or a class with too few documents to give each
            non-empty split one.
    """
    fr = np.asarray(fractions, np.float64)
    if fr.ndim != 1 or fr.size < 1 or np.any(fr < 0) or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions!r}")
    labels = np.asarray(labels)
    parts: list[list[int]] = [[] for _ in fr]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        need = int(np.sum(fr > 0))
        if idx.size < need:
            raise ValueError(
                f"labels: class {c} has {idx.size} documents, fewer than the {need} splits"
            )
        idx = np.random.default_rng([int(seed), int(c)]).permutation(idx)
        counts = np.floor(fr * idx.size + 0.5).astype(int)
        counts = np.where(fr > 0, np.maximum(counts, 1), 0)
        while counts.sum() > idx.size:  # take the excess from the largest split
            counts[np.argmax(counts)] -= 1
        counts[np.argmax(fr)] += idx.size - counts.sum()
        start = 0
        for s, n in enumerate(counts):
            parts[s] += idx[start : start + n].tolist()
            start += n
    return tuple(np.array(sorted(p), np.int64) for p in parts)


def encode_bytes(
    texts: Iterable[bytes | str], length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte tokens (byte + 1, 0 = pad) truncated or right-padded to ``length``.

    Args:
        texts: N byte strings (``str`` is encoded as UTF-8).
        length: L.

    Returns:
        ``(tokens (N, L) int32, mask (N, L) bool, lengths (N,) int32)``; ``mask`` is True on
        real bytes and ``lengths`` are the original byte counts (> L when truncated).

    Raises:
        ValueError: ``length`` < 1.
    """
    if not isinstance(length, int | np.integer) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    items = [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts]
    tokens = np.zeros((len(items), int(length)), np.int32)
    for i, data in enumerate(items):
        row = np.frombuffer(data[:length], np.uint8)
        tokens[i, : row.size] = row.astype(np.int32) + 1
    lengths = np.array([len(d) for d in items], np.int32)
    return tokens, tokens != PAD_ID, lengths


def decode_tokens(tokens: np.ndarray) -> list[bytes]:
    """Inverse of :func:`encode_bytes` on each row (padding dropped): (N, L) -> N byte strings."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (N, L), got {tokens.shape}")
    return [(row[row != PAD_ID] - 1).astype(np.uint8).tobytes() for row in tokens]


class Passages(NamedTuple):
    """N passages of one split.

    Attributes:
        tokens: (N, L) int32 byte tokens (byte + 1, 0 = pad).
        mask: (N, L) bool, True on real bytes.
        labels: (N,) int32 class.
        doc: (N,) int32 index of the passage's document in the split's manifest.
        offset: (N,) int64 byte offset of the passage in its document.
    """

    tokens: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    doc: np.ndarray
    offset: np.ndarray


class SplitManifest(NamedTuple):
    """The documents of one split: names, labels and SHA-256 of their bytes."""

    names: tuple[str, ...]
    labels: tuple[int, ...]
    sha256: tuple[str, ...]


class CorpusManifest(NamedTuple):
    """What a corpus was built from: enough to rebuild it, or to see that it cannot be.

    Attributes:
        corpus: the corpus name.
        class_names: class index -> name.
        python_version: e.g. ``"CPython 3.11.7"`` (the standard library differs by version).
        seed: the split and subsampling seed.
        splits: split name -> :class:`SplitManifest`.
    """

    corpus: str
    class_names: tuple[str, ...]
    python_version: str
    seed: int
    splits: dict[str, SplitManifest]

    def to_json(self) -> str:
        """The manifest as a JSON document (sorted keys)."""
        data = self._asdict()
        data["splits"] = {k: v._asdict() for k, v in self.splits.items()}
        return json.dumps(data, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> CorpusManifest:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        splits = {
            k: SplitManifest(tuple(v["names"]), tuple(v["labels"]), tuple(v["sha256"]))
            for k, v in data["splits"].items()
        }
        return cls(
            data["corpus"],
            tuple(data["class_names"]),
            data["python_version"],
            int(data["seed"]),
            splits,
        )


class TextCorpus(NamedTuple):
    """Passages of each split and the manifest of the documents they come from."""

    train: Passages
    val: Passages
    test: Passages
    manifest: CorpusManifest


def verify_manifest(manifest: CorpusManifest) -> tuple[str, ...]:
    """Names of the manifest's documents that are missing or whose SHA-256 differs now."""
    bad = []
    for split in manifest.splits.values():
        for name, digest in zip(split.names, split.sha256, strict=True):
            try:
                ok = sha256(read_document(name)) == digest
            except ValueError:
                ok = False
            if not ok:
                bad.append(name)
    return tuple(bad)


def _passages(
    docs: Sequence[bytes],
    labels: Sequence[int],
    length: int,
    min_bytes: int,
    max_per_class: int | None,
    balance: bool,
    rng: np.random.Generator,
) -> Passages:
    pieces: list[tuple[int, int, int]] = []  # (doc, offset, label)
    for d, (data, label) in enumerate(zip(docs, labels, strict=True)):
        for offset in range(0, len(data), length):
            if min(length, len(data) - offset) >= min_bytes:
                pieces.append((d, offset, label))
    chosen: list[tuple[int, int, int]] = []
    classes = sorted(set(labels))
    cap = max_per_class
    if balance:
        smallest = min(sum(p[2] == c for p in pieces) for c in classes)
        cap = smallest if cap is None else min(cap, smallest)
    for c in classes:
        mine = [p for p in pieces if p[2] == c]
        if cap is not None and len(mine) > cap:
            keep = np.sort(rng.choice(len(mine), cap, replace=False))
            mine = [mine[i] for i in keep]
        chosen += mine
    chosen.sort()
    tokens, mask, _ = encode_bytes((docs[d][o : o + length] for d, o, _ in chosen), length)
    return Passages(
        tokens,
        mask,
        np.array([c for _, _, c in chosen], np.int32),
        np.array([d for d, _, _ in chosen], np.int32),
        np.array([o for _, o, _ in chosen], np.int64),
    )


def build_corpus(
    corpus: str = "doc_vs_code",
    *,
    length: int = 512,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    max_per_class: int | None = 2000,
    min_bytes: int | None = None,
    balance: bool = False,
    packages: Sequence[str] = DEFAULT_PACKAGES,
) -> TextCorpus:
    """A labelled byte-passage corpus, split by document, deterministic given ``seed``.

    Args:
        corpus: a name from :data:`CORPORA` (see the module docstring).
        length: L, bytes per passage.
        seed: seeds the document split and the passage subsampling.
        fractions: train / val / test shares of each class's documents.
        max_per_class: at most this many passages per (split, class); None keeps all.
        min_bytes: shortest kept last piece of a document (default L // 4).
        balance: also cap each split's classes at its smallest class's passage count.
        packages: the classes of ``"stdlib_packages"``.

    Returns:
        A :class:`TextCorpus`; passage ``i`` of a split comes from document
        ``manifest.splits[split].names[doc[i]]`` at byte ``offset[i]``.

    Raises:
        ValueError: unknown ``corpus``, bad ``length``, ``fractions`` (three shares),
            ``max_per_class`` or ``min_bytes``.
    """
    if not isinstance(length, int | np.integer) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if len(fractions) != len(SPLITS):
        raise ValueError(f"fractions must give {len(SPLITS)} shares, got {fractions!r}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class!r}")
    min_bytes = max(1, length // 4) if min_bytes is None else min_bytes
    if not 1 <= min_bytes <= length:
        raise ValueError(f"min_bytes must be in [1, length={length}], got {min_bytes!r}")
    class_names, names, labels = list_documents(corpus, packages)
    parts = split_documents(labels, fractions, seed)
    splits: dict[str, SplitManifest] = {}
    passages: dict[str, Passages] = {}
    for s, (split, idx) in enumerate(zip(SPLITS, parts, strict=True)):
        docs = [read_document(names[i]) for i in idx]
        split_labels = [labels[i] for i in idx]
        splits[split] = SplitManifest(
            tuple(names[i] for i in idx), tuple(split_labels), tuple(sha256(d) for d in docs)
        )
        rng = np.random.default_rng([int(seed), 1 + s])
        passages[split] = _passages(
            docs, split_labels, length, min_bytes, max_per_class, balance, rng
        )
    manifest = CorpusManifest(corpus, tuple(class_names), python_version(), int(seed), splits)
    return TextCorpus(passages["train"], passages["val"], passages["test"], manifest)


def concat_documents(names: Sequence[str], separator: bytes = b"\n\n") -> np.ndarray:
    """The documents' bytes joined by ``separator``, as a (T,) uint8 array.

    Raises:
        ValueError: empty ``names`` or an unknown document.
    """
    if len(names) == 0:
        raise ValueError("names must not be empty")
    data = separator.join(read_document(n) for n in names)
    return np.frombuffer(data, np.uint8).copy()


class LMWindows(NamedTuple):
    """B windows of a byte stream for next-byte prediction.

    Attributes:
        inputs: (B, L) int32 tokens (byte + 1) of bytes ``start .. start + L - 1``.
        targets: (B, L) int32 tokens of bytes ``start + 1 .. start + L``.
        start: (B,) int64 offsets in the stream.
    """

    inputs: np.ndarray
    targets: np.ndarray
    start: np.ndarray


def lm_windows(
    stream: np.ndarray | bytes,
    length: int,
    num_windows: int | None = None,
    seed: int = 0,
) -> LMWindows:
    """Contiguous (input, next-byte target) windows from a byte stream.

    Args:
        stream: (T,) uint8 bytes (e.g. from :func:`concat_documents`) or a ``bytes``.
        length: L.
        num_windows: B windows at uniform random offsets (seeded); None gives every
            consecutive non-overlapping window, in order (an evaluation stream).
        seed: the offsets' seed.

    Returns:
        An :class:`LMWindows` with no padding.

    Raises:
        ValueError: a stream shorter than L + 1 bytes, bad ``length`` or ``num_windows``.
    """
    data = np.frombuffer(stream, np.uint8) if isinstance(stream, bytes) else np.asarray(stream)
    if data.ndim != 1 or data.dtype != np.uint8:
        raise ValueError(f"stream must be (T,) uint8, got {data.shape} {data.dtype}")
    if not isinstance(length, int | np.integer) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if data.size < length + 1:
        raise ValueError(f"stream has {data.size} bytes, fewer than length + 1 = {length + 1}")
    if num_windows is None:
        start = np.arange(0, data.size - length, length, dtype=np.int64)
    else:
        if not isinstance(num_windows, int | np.integer) or num_windows < 1:
            raise ValueError(f"num_windows must be a positive int or None, got {num_windows!r}")
        rng = np.random.default_rng(seed)
        start = rng.integers(0, data.size - length, size=int(num_windows), dtype=np.int64)
    index = start[:, None] + np.arange(length + 1)[None, :]
    windows = data[index].astype(np.int32) + 1
    return LMWindows(windows[:, :-1], windows[:, 1:], start)
