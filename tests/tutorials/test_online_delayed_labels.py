"""The tutorial runs as written, and what its text claims holds on its numbers."""

import pytest

from tests.tutorials.running import run


@pytest.mark.slow
def test_online_adaptation_with_delayed_labels(tmp_path, monkeypatch):
    ns = run("online_delayed_labels", tmp_path, monkeypatch)
    late = ns["last"]
    assert float(ns["online_error"][late].mean()) < 0.2 * float(ns["frozen_error"][late].mean())
    assert int(ns["result"].updated.sum()) == ns["T"] - ns["H"]
