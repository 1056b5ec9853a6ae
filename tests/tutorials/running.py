"""Run a tutorial (docs/tutorials/NAME.py, a jupytext percent script) as a script, in a
temporary working directory; one test file per tutorial so that the test workers share them."""

import pathlib
import runpy

TUTORIALS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "tutorials"


def run(name, tmp_path, monkeypatch):
    """The tutorial's namespace after running it; checks that it drew its plot."""
    monkeypatch.chdir(tmp_path)  # a tutorial writes into ./tutorial_output
    namespace = runpy.run_path(str(TUTORIALS / f"{name}.py"), run_name="__main__")
    assert (tmp_path / "tutorial_output" / f"{name}.png").stat().st_size > 5000
    return namespace
