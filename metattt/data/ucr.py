"""Univariate recorded series of the UCR/UEA archive in its ``.ts`` format.

The archive's classic problems (e.g. GunPoint: the x-coordinate of an actor's hand, filmed at
30 frames/s, drawing a gun or pointing) are real recordings that ship inside a package: the
``aeon`` toolkit carries a few of them in ``aeon/datasets/data/NAME/NAME_{TRAIN,TEST}.ts``.
:func:`find_dataset` locates them there without importing ``aeon`` (install the optional extra
``metattt[ucr]``), or in a folder of your own laid out the same way (the archive as
downloaded). Nothing is fetched at run time.

Format (the part read here): ``#`` comment lines, ``@key value`` header lines, then after
``@data`` one series per line, ``v1,v2,...,vL:label``. Only univariate, equal-length series
without missing values are accepted; anything else is a one-line error naming the file.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import NamedTuple

import numpy as np


class UCRSeries(NamedTuple):
    """Series (N, L) float64, labels (N,) in ``0 .. C-1``, and the class names in label order."""

    series: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def read_ts(path: str | pathlib.Path) -> UCRSeries:
    """The series of one ``.ts`` file; labels number the header's ``@classLabel`` names.

    Raises:
      ValueError: a header-only file, multivariate or unequal-length series, missing values,
        a label the header does not declare, or a value that is not a number (one line, with
        the file and line).
    """
    path = pathlib.Path(path)
    classes: tuple[str, ...] | None = None
    rows, names = [], []
    in_data = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        if not in_data:
            key, _, value = line.partition(" ")
            key = key.lower()
            if key == "@data":
                in_data = True
            elif key == "@classlabel":
                flag, *declared = value.split()
                if flag.lower() != "true" or not declared:
                    raise ValueError(f"{where}: @classLabel declares no classes")
                classes = tuple(declared)
            elif key in ("@univariate", "@equallength") and value.strip().lower() != "true":
                raise ValueError(f"{where}: only univariate, equal-length series are read")
            elif key == "@missing" and value.strip().lower() != "false":
                raise ValueError(f"{where}: series with missing values are not read")
            continue
        *dims, label = line.split(":")
        if len(dims) != 1:
            raise ValueError(f"{where}: {len(dims)} dimensions; only univariate series are read")
        try:
            rows.append([float(v) for v in dims[0].split(",")])
        except ValueError:
            message = f"{where}: a value is not a number (missing values are not read)"
            raise ValueError(message) from None
        names.append(label.strip())
    if classes is None:
        raise ValueError(f"{path}: no '@classLabel true ...' header line")
    if not rows:
        raise ValueError(f"{path}: no series after the header (a header-only or empty file)")
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"{path}: series of unequal lengths {sorted(lengths)}")
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not in @classLabel {list(classes)}")
    labels = np.array([classes.index(n) for n in names], np.int32)
    return UCRSeries(np.asarray(rows, np.float64), labels, classes)


def _aeon_data_dir() -> pathlib.Path | None:
    spec = importlib.util.find_spec("aeon")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def find_dataset(name: str, data_dir: str | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """The ``(TRAIN, TEST)`` ``.ts`` files of problem ``name`` in ``data_dir/name/`` (the
    archive's layout), or by default in the copy ``aeon`` ships.

    Raises:
      FileNotFoundError: the files are not there; the message says how to get them.
    """
    root = pathlib.Path(data_dir) if data_dir else _aeon_data_dir()
    if root is None:
        raise FileNotFoundError(
            f"UCR problem {name!r} needs its .ts files: pip install 'metattt[ucr]' (aeon ships "
            "GunPoint, ArrowHead, OSULeaf, ...) or pass data_dir= a folder with NAME/NAME_TRAIN.ts"
        )
    files = tuple(root / name / f"{name}_{part}.ts" for part in ("TRAIN", "TEST"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"UCR problem {name!r}: no file {missing[0]}")
    return files


def load_dataset(name: str, data_dir: str | None = None) -> UCRSeries:
    """The archive's TRAIN and TEST series of ``name`` pooled (their classes must agree), for
    callers that draw their own splits (e.g. by recording)."""
    parts = [read_ts(f) for f in find_dataset(name, data_dir)]
    if parts[0].classes != parts[1].classes or parts[0].series.shape[1] != parts[1].series.shape[1]:
        raise ValueError(f"UCR problem {name!r}: TRAIN and TEST differ in classes or length")
    return UCRSeries(
        np.concatenate([p.series for p in parts]),
        np.concatenate([p.labels for p in parts]),
        parts[0].classes,
    )
