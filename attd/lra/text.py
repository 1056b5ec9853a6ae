"""LRA Text: byte-level document classification, from aclImdb or from Python's own files.

LRA's Text task classifies IMDb reviews (Maas et al., 2011) as positive or negative from their
raw bytes, truncated to a fixed length (1K or 4K bytes). :func:`load_aclimdb` reads the
folder layout of the original archive, ``<root>/<split>/pos/<id>_<rating>.txt`` (label 1)
and ``<root>/<split>/neg/<id>_<rating>.txt`` (label 0), files sorted by name; the ``unsup``
folder is ignored.

Built-in task (nothing to download): :func:`stdlib_text_task` turns a corpus of
:mod:`metattt.data.text_corpora` into the same records -- by default, is a passage English
documentation (the pydoc topics) or Python source (a top-level standard-library module)?
Splits are by document, and the corpus manifest (files, SHA-256, Python version) comes back
with the data. A length-shifted test split is the same corpus with a longer ``test_length``
(passages cut at the longer length, so the model sees sequences it was not trained on).

Tokens are those of :func:`metattt.data.text_corpora.encode_bytes`: byte + 1, 0 = pad,
vocabulary 257 (as tfds' ``ByteTextEncoder`` that LRA uses).

Shapes: N documents, L bytes.

Example:
    >>> train = load_aclimdb("aclImdb", "train", seq_len=1000)
    >>> splits, manifest = stdlib_text_task(seq_len=512, seed=0)
    >>> splits["train"].tokens.shape                       # (N, 512)
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from metattt.data import text_corpora

__all__ = ["ByteText", "load_aclimdb", "stdlib_text_task"]


class ByteText(NamedTuple):
    """N byte-level classification examples.

    Attributes:
        tokens: (N, L) int32 byte tokens (byte + 1, 0 = pad), truncated to L.
        mask: (N, L) bool, True on real bytes.
        labels: (N,) int32 classes.
        length: (N,) int32 bytes before truncation (a difficulty measure).
        names: N source names (file paths, or corpus document names).
        rating: (N,) int32 IMDb star rating from the file name, -1 where there is none.
    """

    tokens: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    length: np.ndarray
    names: tuple[str, ...]
    rating: np.ndarray


def _rating(path: pathlib.Path) -> int:
    _, _, tail = path.stem.rpartition("_")
    return int(tail) if tail.isdigit() else -1


def load_aclimdb(root: str | pathlib.Path, split: str = "train", seq_len: int = 1000) -> ByteText:
    """Read ``<root>/<split>/{neg,pos}/*.txt`` (labels 0 and 1) as byte tokens.

    Args:
        root: the ``aclImdb`` folder.
        split: ``"train"`` or ``"test"``.
        seq_len: L (LRA: 1000 or 4000).

    Returns:
        A :class:`ByteText`, negatives first, each class sorted by file name.

    Raises:
        ValueError: unknown ``split``, a missing ``pos`` or ``neg`` folder, or no reviews.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = pathlib.Path(root) / split
    files: list[pathlib.Path] = []
    labels: list[int] = []
    for label, folder in enumerate(("neg", "pos")):
        if not (base / folder).is_dir():
            raise ValueError(f"root: no folder {base / folder}")
        found = sorted((base / folder).glob("*.txt"))
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"root: no reviews under {base}")
    tokens, mask, length = text_corpora.encode_bytes((f.read_bytes() for f in files), seq_len)
    return ByteText(
        tokens,
        mask,
        np.array(labels, np.int32),
        length,
        tuple(str(f) for f in files),
        np.array([_rating(f) for f in files], np.int32),
    )


def _from_passages(
    passages: text_corpora.Passages, manifest: text_corpora.SplitManifest
) -> ByteText:
    return ByteText(
        passages.tokens,
        passages.mask,
        passages.labels,
        passages.mask.sum(axis=1).astype(np.int32),
        tuple(manifest.names[d] for d in passages.doc),
        np.full(passages.labels.shape, -1, np.int32),
    )


def stdlib_text_task(
    *,
    seq_len: int = 512,
    test_length: int | None = None,
    corpus: str = "doc_vs_code",
    seed: int = 0,
    max_per_class: int | None = 2000,
    balance: bool = True,
    packages: Sequence[str] = text_corpora.DEFAULT_PACKAGES,
) -> tuple[dict[str, ByteText], text_corpora.CorpusManifest]:
    """The built-in Text task: passages of Python's own docs and sources, split by file.

    Args:
        seq_len: L, bytes per passage of train and val.
        test_length: bytes per test passage (default ``seq_len``; longer gives a length shift).
        corpus: a corpus of :data:`metattt.data.text_corpora.CORPORA`.
        seed: the document split and subsampling seed.
        max_per_class: passages per (split, class) at most.
        balance: equal passage counts per class within each split.
        packages: the classes of ``"stdlib_packages"``.

    Returns:
        ``({"train", "val", "test"} -> ByteText, manifest)``; the test split comes from the
        same test documents whatever ``test_length`` is.
    """
    kwargs = dict(
        corpus=corpus, seed=seed, max_per_class=max_per_class, balance=balance, packages=packages
    )
    data = text_corpora.build_corpus(length=seq_len, **kwargs)
    test = data.test
    if test_length is not None and test_length != seq_len:
        test = text_corpora.build_corpus(length=test_length, **kwargs).test
    splits = data.manifest.splits
    out = {
        "train": _from_passages(data.train, splits["train"]),
        "val": _from_passages(data.val, splits["val"]),
        "test": _from_passages(test, splits["test"]),
    }
    return out, data.manifest
