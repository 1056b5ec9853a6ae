"""Every tutorial in docs/tutorials has its test file here."""

import pathlib

from tests.tutorials.running import TUTORIALS


def test_every_tutorial_is_tested():
    here = pathlib.Path(__file__).parent
    tested = {p.stem.removeprefix("test_") for p in here.glob("test_*.py")} - {"listing"}
    assert {p.stem for p in TUTORIALS.glob("*.py")} == tested
