"""One LRA task as arrays: train, in-distribution test and shifted test splits.

Each loader takes plain arguments (sizes, recipe bounds, seeds) and returns :class:`Split`\\ s
with a per-example difficulty, so an experiment can score adaptation against how hard an
input is. A split's data seed is ``seed * SEED_STRIDE + offset``: splits of one seed differ by
their offsets, and seeds never share data.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from attd.lra.listops import VOCAB, generate_listops
from attd.lra.pathfinder import generate_pathfinder, to_sequences
from attd.lra.text import ByteText

SEED_STRIDE = 10_007  # data seed = seed * SEED_STRIDE + the split's offset
PATHFINDER_VOCAB = 256  # pixel intensities
TEXT_VOCAB = 257  # bytes and padding


class Split(NamedTuple):
    """N examples of one split: (N, L) tokens and mask, (N,) labels and difficulty."""

    tokens: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    difficulty: np.ndarray


class LRATask(NamedTuple):
    """One task's splits and sizes."""

    train: Split
    test_id: Split
    test_shift: Split
    vocab_size: int
    num_classes: int


def data_seed(seed: int, offset: int) -> int:
    """The generator seed of the split at ``offset`` for run seed ``seed``."""
    return int(seed) * SEED_STRIDE + int(offset)


def listops_split(
    num: int,
    seed: int,
    *,
    offset: int,
    min_depth: int,
    max_depth: int,
    min_length: int,
    max_length: int,
    seq_len: int,
    exclude: frozenset[str] = frozenset(),
) -> tuple[Split, set[str]]:
    """``num`` ListOps expressions not in ``exclude`` (difficulty: nesting depth), and their
    source strings (so a test split can exclude every training expression)."""
    data = generate_listops(
        num + len(exclude),
        seed=data_seed(seed, offset),
        min_depth=min_depth,
        max_depth=max_depth,
        min_length=min_length,
        max_length=max_length,
        seq_len=seq_len,
    )
    keep = np.array([s not in exclude for s in data.sources])
    idx = np.flatnonzero(keep)[:num]
    split = Split(data.tokens[idx], data.mask[idx], data.labels[idx], data.depth[idx])
    return split, {data.sources[i] for i in idx}


def pathfinder_split(
    num: int,
    seed: int,
    *,
    offset: int,
    size: tuple[int, int],
    path_length: tuple[int, int],
    num_distractors: tuple[int, int],
    distractor_length: int,
) -> Split:
    """``num`` Pathfinder images as pixel sequences (difficulty: main path length)."""
    data = generate_pathfinder(
        num,
        seed=data_seed(seed, offset),
        size=tuple(size),
        path_length=tuple(path_length),
        num_distractors=tuple(num_distractors),
        distractor_length=distractor_length,
    )
    tokens = to_sequences(data.images)
    return Split(tokens, np.ones_like(tokens, bool), data.labels, data.path_length)


def text_split(text: ByteText, num: int | None = None, seed: int = 0) -> Split:
    """A byte-text split (difficulty: length in bytes); with ``num``, a seeded subsample of
    ``num`` passages kept in their original order."""
    if num is None:
        return Split(text.tokens, text.mask, text.labels, text.length)
    idx = np.sort(np.random.default_rng(seed).permutation(len(text.labels))[:num])
    return Split(text.tokens[idx], text.mask[idx], text.labels[idx], text.length[idx])


def listops_task(seed: int, train: dict, test_id: dict, test_shift: dict) -> LRATask:
    """ListOps (10 classes): each split's keyword arguments of :func:`listops_split`
    (``num``, ``offset``, depth and length bounds, ``seq_len``); neither test split repeats a
    training expression."""
    train_split, seen = listops_split(seed=seed, **train)
    seen = frozenset(seen)
    return LRATask(
        train_split,
        listops_split(seed=seed, exclude=seen, **test_id)[0],
        listops_split(seed=seed, exclude=seen, **test_shift)[0],
        len(VOCAB),
        10,
    )


def pathfinder_task(seed: int, train: dict, test_id: dict, test_shift: dict) -> LRATask:
    """Pathfinder (2 classes): each split's keyword arguments of :func:`pathfinder_split`."""
    splits = (pathfinder_split(seed=seed, **kw) for kw in (train, test_id, test_shift))
    return LRATask(*splits, PATHFINDER_VOCAB, 2)


def text_task(splits: dict[str, ByteText], num_test: int, seed: int) -> LRATask:
    """Byte-level text (2 classes) from :func:`attd.lra.stdlib_text_task`'s splits: train
    whole, ``num_test`` passages of the held-out ``val`` files (training length) and of the
    other held-out ``test`` files (longer passages)."""
    return LRATask(
        text_split(splits["train"]),
        text_split(splits["val"], num_test, seed),
        text_split(splits["test"], num_test, seed + 1),
        TEXT_VOCAB,
        2,
    )
