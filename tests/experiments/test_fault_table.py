"""The fault table's pieces that need no subprocess: reading a refusal, planting a fault."""

import pathlib

from experiments import fault_table


def test_refusal_reads_the_reason_of_the_first_warning():
    err = (
        "2026-12-03 metattt.train: Resumed from /w/ckpt at step 150 of 3000.\n"
        "2026-12-03 metattt.ckpt: Checkpoint /w/ckpt/300 is unusable (CorruptCheckpoint: file "
        "a (b) is missing); moved to /w/ckpt_rejected/300, trying an older one.\n"
    )
    assert fault_table._refusal(err) == "300: CorruptCheckpoint: file a (b) is missing"
    assert fault_table._resumed_from(err) == "150"
    assert fault_table._refusal("") == "-" and fault_table._resumed_from("") == "start"


def test_corrupt_empties_a_step_folder(tmp_path: pathlib.Path):
    (tmp_path / "default" / "d").mkdir(parents=True)
    (tmp_path / "default" / "d" / "x").write_bytes(b"abc")
    fault_table._corrupt(tmp_path, "empty step folder")
    assert tmp_path.is_dir() and not any(tmp_path.iterdir())
