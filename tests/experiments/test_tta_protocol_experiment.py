"""The TTA-protocol experiment end to end (tiny config), its config checks and demo rows."""

import json

import pytest

from configs import tta_protocol as tta_config
from experiments import tta_protocol


@pytest.mark.slow
def test_tiny_config_adaptation_beats_the_baseline(tmp_path):
    cfg = tta_config.get_config("tiny")
    results = tta_protocol.run(cfg, str(tmp_path))
    table = results["cells"]["representational"]
    baseline = table[tta_protocol.BASELINE]
    adapted = {k: v for k, v in table.items() if k != tta_protocol.BASELINE}
    assert adapted and baseline["mean_improvement"] == 0.0
    best = min(adapted.values(), key=lambda r: r["mean_post"])
    assert best["mean_post"] < baseline["mean_post"]
    assert best["mean_improvement"] > 0 and 0 < best["trainable_share"] < 1
    # every clip is logged: one header record plus one record per clip
    for name in table:
        path = tmp_path / "representational" / name.replace("/", "_") / "seed_0" / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == 1 + cfg.data.num_clips
        assert "trainable_share" in records[0] and "rolling_post" in records[-1]
    assert (tmp_path / "tta_protocol_rolling.png").stat().st_size > 1000
    assert "| baseline |" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.shifts", ("rotation",), "unknown shift 'rotation'"),
        ("ablation.adapt_layers", ("layernorm+atn",), "unknown adapt_layers preset 'atn'"),
        ("protocol.mode", "multi", "unknown TTA mode 'multi'"),
        ("model.num_heads", 3, "num_heads \\(3\\) must divide dim"),
    ],
)
def test_bad_config_values_are_rejected(key, value, message):
    cfg = tta_config.get_config("tiny")
    section, field = key.split(".")
    cfg[section][field] = value
    with pytest.raises(ValueError, match=message):
        tta_protocol.validate(cfg)


def test_ablation_cells_cover_the_matrix():
    cells = tta_protocol.cells(tta_config.get_config())
    names = [n for n in cells if n != tta_protocol.BASELINE]
    assert len(names) == 3 * 2 * 3 + 3  # layers x reset x settings, then the other mode
    strong = cells["layernorm+mlp_out/cumulative/stronger"]
    assert (strong.num_adaptation_steps, strong.lr, strong.clip_norm) == (5, 5e-4, 5.0)
    assert not strong.reset_per_clip and strong.adapt_layers == "layernorm+mlp_out"
    mild = cells["layernorm/reset/conservative"]
    assert (mild.num_adaptation_steps, mild.lr, mild.clip_norm) == (1, 1e-4, 1.0)
    assert cells["layernorm+attn_proj/reset/stronger/one_step"].mode == "one_step"
    assert not cells[tta_protocol.BASELINE].adapts


def test_demo_rows_shape(monkeypatch, tmp_path):
    fake = {
        "cells": {
            "representational": {
                "baseline": {"mean_pre": 0.5, "mean_post": 0.5},
                "layernorm+mlp_out/reset/stronger": {"mean_pre": 0.5, "mean_post": 0.4},
            }
        }
    }
    monkeypatch.setattr(tta_protocol, "run", lambda cfg, workdir: fake)
    rows = tta_protocol.demo_rows(str(tmp_path))
    assert [r[1] for r in rows] == ["baseline", "layernorm+mlp_out, reset, stronger"]
    assert all(len(r) == 6 and r[3] == 0.5 for r in rows) and rows[1][4] == 0.4
