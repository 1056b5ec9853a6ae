"""The UCR ``.ts`` reader on files written here, and where it looks for a problem's files."""

import numpy as np
import pytest

from metattt.data import ucr


def write_problem(root, name, series, labels, classes=("x", "y")):
    """``root/name/name_{TRAIN,TEST}.ts``, the first half of the series in TRAIN."""
    (root / name).mkdir(parents=True)
    half = len(series) // 2
    for part, rows in (("TRAIN", slice(0, half)), ("TEST", slice(half, None))):
        lines = ["# a comment", f"@problemName {name}", "@univariate true", "@equalLength true"]
        lines += [f"@classLabel true {' '.join(classes)}", "@data"]
        for x, y in zip(series[rows], labels[rows], strict=True):
            lines.append(",".join(repr(float(v)) for v in x) + f":{classes[y]}")
        (root / name / f"{name}_{part}.ts").write_text("\n".join(lines) + "\n")


def test_read_ts_returns_the_written_series_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    series, labels = rng.normal(size=(6, 9)), rng.integers(2, size=6)
    write_problem(tmp_path, "P", series, labels, classes=("2", "1"))
    got = ucr.read_ts(tmp_path / "P" / "P_TRAIN.ts")
    np.testing.assert_array_equal(got.series, series[:3])  # repr round-trips a float exactly
    np.testing.assert_array_equal(got.labels, labels[:3])
    assert got.classes == ("2", "1")  # labels number the header's order, not sorted names


def test_load_dataset_pools_train_and_test(tmp_path):
    rng = np.random.default_rng(1)
    series, labels = rng.normal(size=(8, 5)), rng.integers(2, size=8)
    write_problem(tmp_path, "Q", series, labels)
    data = ucr.load_dataset("Q", str(tmp_path))
    np.testing.assert_array_equal(data.series, series)
    np.testing.assert_array_equal(data.labels, labels)


def test_a_missing_problem_names_the_file_and_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"no file {tmp_path}/R/R_TRAIN.ts"):
        ucr.find_dataset("R", str(tmp_path))
    monkeypatch.setattr(ucr, "_aeon_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install 'metattt\[ucr\]'"):
        ucr.find_dataset("GunPoint")
