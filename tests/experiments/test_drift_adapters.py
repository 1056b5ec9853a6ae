"""The drift-adapter experiment end to end (tiny config), its config checks and demo rows."""

import copy
import json
import os

import jax
import numpy as np
import pytest

from configs import drift_adapters as config
from experiments import drift_adapters
from metattt.data import digits_c
from tests.experiments.killing import kill_after


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("drift_adapters")
    cfg = config.get_config("tiny")
    return cfg, drift_adapters.run(cfg, str(workdir)), workdir


@pytest.mark.slow
def test_tiny_run_dynamic_adapter_beats_no_adaptation_after_drift(tiny):
    cfg, results, workdir = tiny
    summary = results["summary"][cfg.objectives[0]]
    dynamic, none = summary["dynamic"], summary["none"]
    static = summary[f"static:{cfg.adapter.max_rank}"]
    assert dynamic["acc_post_drift"]["mean"] > none["acc_post_drift"]["mean"]
    # The adapter exists only while drifted: fewer active parameters than the static one.
    assert 0 < dynamic["mean_active_params"]["mean"] < static["mean_active_params"]["mean"]
    # One compiled step served every method and every alloc / realloc / free.
    assert results["step_traces"] == 1
    (run,) = results["streams"][cfg.objectives[0]]["dynamic"][cfg.stream.corruptions[0]]
    ops = [e[0] for e in run["events"]]
    assert ops[0] == "alloc" and "free" in ops
    onset = cfg.stream.clean_steps
    assert onset <= run["events"][0][1] <= onset + 5 * cfg.stream.steps_per_severity
    assert set(np.unique(run["rank"])) <= {0, 2, 4, 8}
    # The TENT comparison and the written artefacts.
    assert set(results["tent_summary"]["clean"]) == {"source", "norm", "tent"}
    assert os.path.getsize(workdir / "drift_adapters_stream.png") > 1000
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["step_traces"] == 1


@pytest.mark.slow
def test_demo_rows_read_the_right_numbers(tiny, monkeypatch, tmp_path):
    """Demo rows recomputed from the raw per-run records, not from the summary they read."""
    cfg, results, _ = tiny
    monkeypatch.setattr(drift_adapters.main, "run", lambda cfg, workdir: results)
    rows = drift_adapters.demo_rows(str(tmp_path))
    objective = cfg.objectives[0]
    start = cfg.stream.clean_steps

    def post_drift(method):  # mean over runs (seeds x corruptions) of the accuracy after onset
        runs = [r for rs in results["streams"][objective][method].values() for r in rs]
        return np.mean([np.mean(r["accuracy"][start:]) for r in runs])

    adapted = [m for m in cfg.methods if m != "none"]
    assert [r[1] for r in rows] == [*adapted, "norm", "tent"]
    for _, method, _, before, after, _ in rows[: len(adapted)]:
        np.testing.assert_allclose(before, post_drift("none"), rtol=1e-12)
        np.testing.assert_allclose(after, post_drift(method), rtol=1e-12)
    keys = [k for k in results["tent"][0] if k != "clean"]
    for _, method, _, before, after, _ in rows[len(adapted) :]:
        raw = {
            m: np.mean([t[k][m] for t in results["tent"] for k in keys]) for m in ("source", method)
        }
        np.testing.assert_allclose(before, raw["source"], rtol=1e-12)
        np.testing.assert_allclose(after, raw[method], rtol=1e-12)


def test_segments_cover_the_stream():
    cfg = config.get_config("tiny")
    seg = drift_adapters.segments(cfg)
    assert seg["clean"] == (0, cfg.stream.clean_steps)
    assert seg["after"][1] == drift_adapters.num_stream_steps(cfg)
    assert seg["post_drift"] == (cfg.stream.clean_steps, drift_adapters.num_stream_steps(cfg))
    assert [seg[f"sev{s}"][1] - seg[f"sev{s}"][0] for s in range(1, 6)] == [
        cfg.stream.steps_per_severity
    ] * 5


@pytest.mark.parametrize(
    "method, parsed",
    [("none", ("none", 0)), ("dynamic", ("dynamic", 0)), ("static:8", ("static", 8))],
)
def test_parse_method(method, parsed):
    assert drift_adapters.parse_method(method) == parsed


@pytest.mark.parametrize(
    "override, message",
    [
        (lambda c: setattr(c, "methods", ("static:0",)), "unknown drift_adapters method"),
        (lambda c: setattr(c, "methods", ("static:16",)), "exceeds adapter.max_rank"),
        (lambda c: setattr(c, "objectives", ("kl",)), "unknown objective"),
        (lambda c: setattr(c.stream, "corruptions", ("fog",)), "unknown corruption"),
        (lambda c: setattr(c.stream, "clean_steps", 300), "must exceed detector.warmup"),
        (
            lambda c: setattr(c.backbone, "mesh_devices", 5),
            "backbone.mesh_devices=5 must be 0 or divide backbone.batch_size=64",
        ),
    ],
)
def test_validate_rejects_bad_configs(override, message):
    cfg = config.get_config("tiny")
    override(cfg)
    with pytest.raises(ValueError, match=message):
        drift_adapters.validate(cfg)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        config.get_config("huge")


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _numbers(results):
    return {k: v for k, v in results.items() if k not in ("seconds", "timing")}


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_results(tiny, tmp_path, caplog):
    """SIGKILL after the backbone's first checkpoint; the restarted run equals the fixture's."""
    cfg, reference, _ = tiny
    workdir = tmp_path / "killed"
    checkpoint = workdir / "backbone" / "seed_0" / "ckpt" / "100"
    kill_after(["--config=configs/drift_adapters.py:tiny"], workdir, checkpoint)
    with caplog.at_level("INFO"):
        resumed = drift_adapters.run(cfg, str(workdir))
    assert "Resumed from" in caplog.text
    assert _numbers(resumed) == _numbers(reference)  # bit-identical: the same program resumed


def _leaves(tree):
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.mark.slow
def test_the_backbone_batches_sharded_over_devices_equal_the_one_device_training(
    tiny, tmp_path, monkeypatch
):
    """``backbone.mesh_devices=2``: each batch of 64 split over 2 of the 8 simulated CPU devices,
    through the same sharded step a multi-process run uses; the reference is the fixture's
    one-device backbone, read back from its final checkpoint (no training).

    The gradients and batch statistics sum the examples in another order. Every weight, the
    normalisation's affine parameters and the running variance stay within 1e-5 (measured
    1.2e-7, 2026-12-07). The hidden bias is the exception: batch norm subtracts the batch mean,
    so its exact gradient is zero, and Adam scales the rounding noise into lr-sized steps (in
    both runs: measured difference 1e-2, as large as the values); the running mean absorbs it.
    So the network is compared as a function on the test split: with batch statistics (where
    the bias cancels) within 1e-4 (measured 2.4e-6), with the running statistics within 2e-2
    (measured 3.5e-3, logits up to 8.5) and the same predicted class (measured: all)."""
    cfg, _, workdir = tiny
    seed = cfg.seeds[0]
    x_tr, y_tr, x_te, _ = digits_c.load_digits_split(seed, cfg.data.test_fraction)
    net, params, norm = drift_adapters.train_backbone(
        x_tr, y_tr, seed, cfg, str(workdir / "backbone" / f"seed_{seed}")
    )
    sharded_cfg = copy.deepcopy(cfg)
    sharded_cfg.backbone.mesh_devices = 2
    meshes, make_mesh = [], jax.make_mesh
    monkeypatch.setattr(
        jax, "make_mesh", lambda *a, **k: meshes.append(make_mesh(*a, **k)) or meshes[-1]
    )
    _, sharded_params, sharded_norm = drift_adapters.train_backbone(
        x_tr, y_tr, seed, sharded_cfg, str(tmp_path)
    )
    assert [m.devices.size for m in meshes] == [2]
    got, want = _leaves((sharded_params, sharded_norm)), _leaves((params, norm))
    noise = {"[0]['hidden']['bias']", "[1].mean"}
    assert noise < set(want)
    for key in set(want) - noise:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for batch_stats, atol in ((True, 1e-4), (False, 2e-2)):
        logits = net.apply(sharded_params, sharded_norm, x_te, batch_stats=batch_stats)[0]
        reference = net.apply(params, norm, x_te, batch_stats=batch_stats)[0]
        np.testing.assert_allclose(logits, reference, rtol=0, atol=atol)
        np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(reference, -1))


FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "drift_adapters", "results.json")


def test_report_renders_a_frozen_tiny_run_without_training(tmp_path, monkeypatch):
    """The report step on a kept tiny run: every table cell is the raw per-step records' mean."""
    from experiments import report, run

    monkeypatch.setattr(report, "BENCHMARKS", tmp_path / "repo" / "BENCHMARKS.md")
    cfg = config.get_config("tiny")
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "run_info.json").write_text(json.dumps({"config": cfg.to_dict()}))
    with open(FIXTURE) as f:
        results = json.load(f)
    (workdir / "results.json").write_text(json.dumps(results))
    assert run.report_workdir(str(workdir)) == "drift_adapters"
    text = (tmp_path / "repo" / "BENCHMARKS.md").read_text()
    assert (tmp_path / "repo" / "docs" / "figures" / "drift_adapters_stream.png").stat().st_size
    objective = cfg.objectives[0]
    start = cfg.stream.clean_steps
    for method in cfg.methods:
        (raw,) = results["streams"][objective][method][cfg.stream.corruptions[0]]
        acc = np.asarray(raw["accuracy"])
        sev1 = acc[start : start + cfg.stream.steps_per_severity].mean()
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} | "))
        cells = row.split(" | ")
        # one seed: no interval, so each cell is the mean alone (columns: clean, sev1..5, ...)
        assert cells[1] == f"{acc[:start].mean():.3f}" and cells[2] == f"{sev1:.3f}"
        assert cells[8] == f"{acc[start:].mean():.3f}"  # post_drift
        assert cells[9] == f"{np.mean(raw['active_params']):.0f}"
    # TENT table: per corruption, the mean over severities of the one seed's errors (in %).
    for corruption in cfg.tent.corruptions:
        keys = [f"{corruption}/{s}" for s in cfg.tent.severities]
        row = next(line for line in text.splitlines() if line.startswith(f"| {corruption} | "))
        expected = [
            f"{100 * np.mean([results['tent'][0][k][m] for k in keys]):.1f}"
            for m in ("source", "norm", "tent")
        ]
        assert row.split(" | ")[1:4] == expected[:2] + [expected[2] + " |"]


def test_kept_results_hold_the_plotted_means_and_rebuild_the_same_section(tmp_path, monkeypatch):
    """docs/results keeps mean curves instead of per-run records: each is the runs' per-step mean
    (a Python loop here), and the section rendered from the kept file equals the full one's."""
    from experiments import report
    from experiments.drift_adapters.report import kept_results, write_report

    cfg = config.get_config("tiny")
    with open(FIXTURE) as f:
        results = json.load(f)
    kept = json.loads(report.dumps(kept_results(results)))
    assert "streams" not in kept
    for objective, by_method in results["streams"].items():
        for method, by_corruption in by_method.items():
            runs = [r for rs in by_corruption.values() for r in rs]
            curve = kept["stream_curves"][objective][method]
            for t in range(len(runs[0]["accuracy"])):
                acc = sum(r["accuracy"][t] for r in runs) / len(runs)
                active = sum(r["active_params"][t] for r in runs) / len(runs)
                assert abs(curve["accuracy"][t] - acc) <= 5e-4 + 1e-12  # rounded to 3 decimals
                assert abs(curve["active_params"][t] - active) <= 0.05 + 1e-12
    sections = []
    for name, res in (("full", results), ("kept", kept)):
        monkeypatch.setattr(report, "BENCHMARKS", tmp_path / name / "BENCHMARKS.md")
        write_report(res, cfg, str(tmp_path / name))
        sections.append((tmp_path / name / "BENCHMARKS.md").read_text())
    assert sections[0] == sections[1]
