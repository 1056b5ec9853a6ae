"""The tutorial runs as written, and what its text claims holds on its numbers."""

import pytest

from tests.tutorials.running import run


@pytest.mark.slow
def test_tent_on_your_own_model(tmp_path, monkeypatch, capsys):
    ns = run("tent_own_model", tmp_path, monkeypatch)
    # the preset takes the LayerNorm named enc_ln (32 features) and nothing else
    out = capsys.readouterr().out
    assert "selected:\n  enc_ln  bias, scale  (2 leaves, 64 parameters)\nnot selected:" in out
    assert ns["accuracy"](ns["source"], ns["x_id"], ns["y_id"]) > 0.9  # the source model learned
    assert all(float(c[-1]) < float(c[0]) for c in ns["curves"])  # TENT lowers the entropy
    assert ns["mean"](ns["before"]) < 0.9  # and the shift does hurt the source model
