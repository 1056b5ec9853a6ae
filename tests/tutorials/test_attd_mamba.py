"""The tutorial runs as written, and what its text claims holds on its numbers."""

import pytest

from tests.tutorials.running import run


@pytest.mark.slow
def test_attd_on_a_mamba(tmp_path, monkeypatch):
    ns = run("attd_mamba", tmp_path, monkeypatch)
    in_dist, warped = ns["rows"]["in-dist."], ns["rows"]["warped"]
    assert in_dist[0] > warped[0] + 0.2  # the warp hurts the fixed model
    assert warped[2].mean() > in_dist[2].mean()  # and ATTD spends more steps on warped inputs
