"""The TTA-protocol experiment: config checks, the report on a frozen run, and (slow) the tiny
config end to end and its resume after SIGKILL."""

import copy
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import tta_protocol as tta_config
from experiments import report, tta_protocol
from metattt import stats
from metattt.data import controlled
from metattt.models import dynamics as dyn
from tests.experiments.killing import kill_after

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tta_protocol")
WALL_TIMES = ("train_seconds", "tta_seconds")
TEST_KEY = 123  # a key no training batch is drawn from


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tta_protocol")
    cfg = tta_config.get_config("tiny")
    return cfg, tta_protocol.run(cfg, str(workdir)), workdir


def _canonical(results) -> str:
    """The results as sorted JSON: equal text for equal numbers, NaN included (one seed's
    interval is NaN, and NaN != NaN)."""
    return json.dumps(results, sort_keys=True)


def _numbers(results) -> str:
    return _canonical({k: v for k, v in results.items() if k not in WALL_TIMES})


@pytest.mark.slow
def test_tiny_run_adapts_and_logs_every_clip(tiny):
    cfg, results, workdir = tiny
    table = results["cells"]["representational"]
    baseline = table[tta_protocol.BASELINE]
    (adapted,) = (v for k, v in table.items() if k != tta_protocol.BASELINE)
    assert adapted["mean_post"] < baseline["mean_post"]
    assert baseline["mean_improvement"] == 0.0 < adapted["mean_improvement"]
    # LayerNorm+MLP-out of the tiny predictor, counted by hand: one block of width 16 with an
    # MLP x2 has 2 LayerNorms, and one more at the output (3 x 2 x 16), plus the MLP's output
    # layer (32 x 16 + 16): 624 parameters.
    assert adapted["trainable_params"] == 624
    assert adapted["trainable_share"] == pytest.approx(624 / adapted["total_params"])
    # Every clip is logged (a header record, then one per clip), and the results' means are
    # those of the logged per-clip losses.
    for name, row in table.items():
        path = workdir / "representational" / name.replace("/", "_") / "seed_0" / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == 1 + cfg.data.num_clips
        post = [r["post_loss"] for r in records[1:]]
        np.testing.assert_allclose(row["mean_post"], np.mean(post), rtol=1e-6)
        np.testing.assert_allclose(row["final_rolling_post"], np.mean(post[-50:]), rtol=1e-6)
    assert (workdir / "tta_protocol_rolling.png").stat().st_size > 1000
    on_disk = json.loads((workdir / "results.json").read_text())
    assert _canonical(on_disk) == _canonical(results) and on_disk["seeds"] == [0]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_results(tiny, tmp_path, caplog):
    """SIGKILL after the source model's first checkpoint; the restarted run equals the
    uninterrupted one bit for bit, and a cell's partial log is replaced, not appended to."""
    cfg, reference, _ = tiny
    workdir = tmp_path / "killed"
    checkpoint = workdir / "source" / "seed_0" / "ckpt" / str(cfg.train.checkpoint_every)
    kill_after(["--config=configs/tta_protocol.py:tiny"], workdir, checkpoint)
    # A cell killed while logging its clips leaves a partial log and no cell record.
    path = workdir / "representational" / "baseline" / "seed_0" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"step": 0, "post_loss": 1.0}\n')
    with caplog.at_level("INFO"):
        resumed = tta_protocol.run(cfg, str(workdir))
    assert "Resumed from" in caplog.text
    assert _numbers(resumed) == _numbers(reference)
    assert len(path.read_text().splitlines()) == 1 + cfg.data.num_clips  # each clip once


@pytest.mark.slow
def test_the_source_batches_sharded_over_devices_equal_the_one_device_training(
    tiny, tmp_path, monkeypatch
):
    """``train.mesh_devices=2``: each source-training batch of 16 windows split over 2 of the 8
    simulated CPU devices, through the same sharded step a multi-process run uses; the
    reference is the fixture's one-device predictor, read back from its final checkpoint (no
    training). The gradient sums the windows in another order, and 300 Adam steps carry that
    rounding forward: every parameter within 1e-5 (measured 1.3e-6, 2026-12-07) except the
    attention's key bias, which shifts every score of a query equally, so softmax removes it and
    its exact gradient is zero; Adam scales the rounding noise into lr-sized steps (measured
    difference 4e-2, as large as the values). So the predictor is also compared as a function:
    its rollout loss on a fresh batch within 1e-5 relative."""
    cfg, _, workdir = tiny
    seed = cfg.seeds[0]
    program, params, _ = tta_protocol.train_source(
        cfg, seed, str(workdir / "source" / f"seed_{seed}")
    )
    sharded_cfg = copy.deepcopy(cfg)
    sharded_cfg.train.mesh_devices = 2
    meshes, make_mesh = [], jax.make_mesh
    monkeypatch.setattr(
        jax, "make_mesh", lambda *a, **k: meshes.append(make_mesh(*a, **k)) or meshes[-1]
    )
    _, sharded, _ = tta_protocol.train_source(sharded_cfg, seed, str(tmp_path))
    assert [m.devices.size for m in meshes] == [2]
    noise = "['attn']['key']['bias']"
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(params), strict=True
    ):
        key = jax.tree_util.keystr(path)
        if not key.endswith(noise):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=key)
    pcfg = tta_protocol.predictor_config(cfg)
    system = controlled.make_system(seed, pcfg.state_dim, pcfg.action_dim)
    data = (jax.random.key(TEST_KEY), system, controlled.source_regime(pcfg.state_dim))
    windows = program.batch_fn(data, 0)
    loss = [dyn.rollout_loss(program.apply, p, windows, pcfg.window) for p in (sharded, params)]
    np.testing.assert_allclose(*loss, rtol=1e-5)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.shifts", ("rotation",), "unknown shift 'rotation'"),
        ("ablation.adapt_layers", ("layernorm+atn",), "unknown adapt_layers preset 'atn'"),
        ("protocol.mode", "multi", "unknown TTA mode 'multi'"),
        ("model.num_heads", 3, "num_heads \\(3\\) must divide dim"),
        ("seeds", (), "config.seeds is empty"),
        ("train.mesh_devices", 3, "train.mesh_devices=3 must be 0 or divide train.batch=16"),
    ],
)
def test_bad_config_values_are_rejected(key, value, message):
    cfg = tta_config.get_config("tiny")
    *sections, field = key.split(".")
    target = cfg[sections[0]] if sections else cfg
    target[field] = value
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


# --- The report, on a frozen run of the tiny model over a wider matrix (no training) ----------
# Produced by tta_protocol.run on the config in run_info.json: the tiny config with seeds (0, 1),
# both shifts, LayerNorm and LayerNorm+MLP-out, reset and cumulative, the conservative and
# stronger settings, and the stronger setting also with the one-step loss.


@pytest.fixture(scope="module")
def frozen():
    with open(os.path.join(FIXTURE, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(FIXTURE, "run_info.json")) as f:
        run_info = json.load(f)
    return results, ml_collections.ConfigDict(run_info["config"]), run_info


def _rows(text: str, shift: str) -> list[list[str]]:
    """The cells of the shift's table rows, split on ``|``."""
    part = text.split(f"**Shift: {shift}**", 1)[1].split("**Shift:", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("| ") and "---" not in line]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]


def test_summary_table_cells_are_the_per_seed_numbers_means(frozen):
    """Each row recomputed from the per-seed losses: the ratio to the same seed's baseline,
    then mean ± Student-t half-width over the seeds."""
    results, cfg, _ = frozen
    text = tta_protocol.summary_table(results)
    for shift, table in results["cells"].items():
        rows = _rows(text, shift)
        assert [r[0] for r in rows] == [n.split("/")[0] for n in table]
        base = np.asarray(table["baseline"]["per_seed_mean_post"])
        for row, (name, r) in zip(rows, table.items(), strict=True):
            post = np.asarray(r["per_seed_mean_post"])
            ratio = post / base
            half = scipy_t975(len(post) - 1) * ratio.std(ddof=1) / np.sqrt(len(post))
            assert row[6] == f"{ratio.mean():.3f} ± {half:.3f}", (name, row)
            loss_half = scipy_t975(len(post) - 1) * post.std(ddof=1) / np.sqrt(len(post))
            assert row[5] == f"{post.mean():.4f} ± {loss_half:.4f}", (name, row)
            fields = name.split("/") if name != "baseline" else ["baseline", "-", "-"]
            mode = fields[3] if len(fields) == 4 else cfg.protocol.mode
            assert row[1:4] == [fields[1], fields[2], mode]
            assert row[8] == f"{r['final_rolling_post']:.4f}"
            # the final rolling loss is the last point of the seed-mean rolling curve
            np.testing.assert_allclose(
                r["final_rolling_post"], results["rolling_post"][shift][name][-1], rtol=1e-6
            )


def scipy_t975(dof: int) -> float:
    """The 97.5% quantile of Student's t, from a table (the test's independent reference)."""
    return {1: 12.706204736174703, 2: 4.302652729749464}[dof]


def _ratio(table, name):
    return np.mean(
        np.asarray(table[name]["per_seed_mean_post"]) / table["baseline"]["per_seed_mean_post"]
    )


def test_reading_names_the_best_layers_and_counts_cumulative_wins(frozen):
    results, cfg, _ = frozen
    lines = tta_protocol.reading(results, cfg)
    tables = results["cells"]
    for setting in cfg.ablation.settings:
        line = next(x for x in lines if x.startswith(f"- **Adapted layers, {setting} setting**"))
        for shift, table in tables.items():
            r = {x: _ratio(table, f"{x}/reset/{setting}") for x in cfg.ablation.adapt_layers}
            listed = ", ".join(f"{x} {v:.3f}" for x, v in r.items())
            assert f"{shift}: {listed} (best {min(r, key=r.get)})" in line
    cumulative = next(x for x in lines if x.startswith("- **Cumulative vs reset**"))
    wins = sum(
        _ratio(t, f"{x}/cumulative/{s}") < _ratio(t, f"{x}/reset/{s}")
        for t in tables.values()
        for x in cfg.ablation.adapt_layers
        for s in cfg.ablation.settings
    )
    assert f"Cumulative is lower in {wins} of 8 " in cumulative
    for shift, t in tables.items():
        diffs = [
            np.mean(
                [
                    _ratio(t, f"{x}/cumulative/{s}") - _ratio(t, f"{x}/reset/{s}")
                    for x in cfg.ablation.adapt_layers
                ]
            )
            for s in cfg.ablation.settings
        ]
        listed = ", ".join(
            f"{s} {d:+.3f}" for s, d in zip(cfg.ablation.settings, diffs, strict=True)
        )
        assert f"{shift}: {listed}" in cumulative
    modes = next(x for x in lines if x.startswith("- **Loss mode rollout vs one_step**"))
    for shift, t in tables.items():
        main = np.mean([_ratio(t, f"{x}/reset/stronger") for x in cfg.ablation.adapt_layers])
        alt = np.mean(
            [_ratio(t, f"{x}/reset/stronger/one_step") for x in cfg.ablation.adapt_layers]
        )
        assert f"{shift} {main:.3f} vs {alt:.3f}" in modes
    seeds = next(x for x in lines if x.startswith("- **Seeds**"))
    base = tables["offset"]["baseline"]["per_seed_mean_post"]
    assert f"offset {min(base):.4f} to {max(base):.4f}" in seeds


@pytest.mark.parametrize(
    "best_offset, best_representational, verdict",
    [
        ("layernorm", "layernorm+mlp_out", "holds here: the shifts part"),
        ("layernorm+mlp_out", "layernorm+mlp_out", "holds only in part"),
        ("layernorm+mlp_out", "layernorm", "does not hold here"),
    ],
)
def test_reading_verdict_on_wider_sets_follows_the_best_set(
    frozen, best_offset, best_representational, verdict
):
    """Edited numbers: which set is best on each shift decides the verdict."""
    results, cfg, _ = frozen
    edited = copy.deepcopy(results)
    for shift, best in (("offset", best_offset), ("representational", best_representational)):
        table = edited["cells"][shift]
        base = table["baseline"]["per_seed_mean_post"]
        for x in cfg.ablation.adapt_layers:
            scale = 0.5 if x == best else 0.9
            table[f"{x}/reset/stronger"]["per_seed_mean_post"] = [scale * b for b in base]
    line = next(
        x for x in tta_protocol.reading(edited, cfg) if x.startswith("- **Adapted layers, stronger")
    )
    assert verdict in line


def test_reading_of_a_single_cell_run_says_nothing_it_cannot_check(frozen):
    """The tiny config (one layer set, reset only, one mode, one seed) has no question to answer."""
    results, _, _ = frozen
    cfg = tta_config.get_config("tiny")
    one = {
        "cells": {"representational": results["cells"]["representational"]},
        "seeds": [0],
        "mode": "rollout",
    }
    assert tta_protocol.reading(one, cfg) == []


def test_report_step_renders_the_frozen_run(frozen, tmp_path, monkeypatch):
    from experiments import run

    results, cfg, run_info = frozen
    monkeypatch.setattr(report, "BENCHMARKS", tmp_path / "repo" / "BENCHMARKS.md")
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "run_info.json").write_text(json.dumps(run_info))
    (workdir / "results.json").write_text(json.dumps(results))
    assert run.report_workdir(str(workdir)) == "tta_protocol"
    text = (tmp_path / "repo" / "BENCHMARKS.md").read_text()
    section = text.split("<!-- tta_protocol:start -->")[1].split("<!-- tta_protocol:end -->")[0]
    assert "- Date: 2026-12-07;" in section
    assert tta_protocol.summary_table(results) in section
    assert section.rstrip().endswith("\n".join(tta_protocol.reading(results, cfg)))
    src = results["source_baseline_loss"]
    assert (
        f"Source-regime baseline loss (no shift): {src['mean']:.4f} ± {src['ci']:.4f}." in section
    )
    assert "training " + ", ".join(f"{t:.0f}" for t in results["train_seconds"]) in section
    assert "compiles the 11 runners" in section
    assert "settings conservative: 1 step(s), lr 0.0001, clip 1.0; stronger: 5 step(s)" in section
    # The kept results drop only the rolling curves the plot does not draw (the stronger
    # setting's main-mode cells and the baseline), and the section renders again from them.
    kept = json.loads((tmp_path / "repo" / "docs" / "results" / "tta_protocol.json").read_text())
    drawn = ["baseline"] + [
        f"{x}/{r}/stronger" for x in cfg.ablation.adapt_layers for r in ("reset", "cumulative")
    ]
    for shift, curves in kept["rolling_post"].items():
        assert sorted(curves) == sorted(drawn)
        assert all(curves[n] == results["rolling_post"][shift][n] for n in drawn)
    assert {k: v for k, v in kept.items() if k != "rolling_post"} == {
        k: v for k, v in results.items() if k != "rolling_post"
    }
    (tmp_path / "repo" / "BENCHMARKS.md").unlink()
    tta_protocol.write_report(kept, cfg, str(workdir))
    assert (tmp_path / "repo" / "BENCHMARKS.md").read_text().split("- Command:")[1] == text.split(
        "- Command:"
    )[1]
    assert (
        tmp_path / "repo" / "docs" / "figures" / "tta_protocol_rolling.png"
    ).stat().st_size > 1000


def test_source_baseline_interval_is_the_seed_summary(frozen):
    results, _, _ = frozen
    src = results["source_baseline_loss"]
    per_seed = np.asarray(src["per_seed"])
    half = scipy_t975(len(per_seed) - 1) * per_seed.std(ddof=1) / np.sqrt(len(per_seed))
    np.testing.assert_allclose([src["mean"], src["ci"]], [per_seed.mean(), half], rtol=1e-12)
    assert stats.seed_summary(per_seed) == src


def test_demo_rows_are_the_cells_seed_means(frozen, monkeypatch, tmp_path):
    results, _, _ = frozen
    monkeypatch.setattr(tta_protocol.main, "run", lambda cfg, workdir: results)
    rows = tta_protocol.demo_rows(str(tmp_path))
    table = results["cells"]["representational"]  # the demo config's one shift
    assert [r[1] for r in rows] == [n.replace("/", ", ") for n in table]
    for (system, _, metric, before, after, seconds), r in zip(rows, table.values(), strict=True):
        assert (system, metric) == ("TTA protocol (dynamics)", "rollout MSE, shifted clips")
        assert before == r["mean_pre"] and seconds >= 0
        assert after == pytest.approx(np.mean(r["per_seed_mean_post"]), rel=1e-12)
