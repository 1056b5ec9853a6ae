"""The energy-aware MoE TTT experiment on digits-C: tiny config end to end, data, config checks."""

import json
import math

import jax
import numpy as np
import pytest

from configs import energy_moe_digits as digits_config
from experiments import energy_moe as em
from experiments import energy_moe_digits as emd
from metattt.data import digits_c
from metattt.models import moe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = digits_config.get_config("tiny")
    workdir = tmp_path_factory.mktemp("energy_moe_digits")
    return cfg, workdir, emd.run(cfg, str(workdir))


def _cell(workdir, name):
    return json.loads((workdir / "cells" / "seed_0" / f"{name.replace('/', '_')}.json").read_text())


@pytest.mark.slow
def test_tiny_run_gives_finite_results_for_every_method(tiny_run):
    cfg, workdir, results = tiny_run
    names = list(em.methods(cfg))
    assert list(results["methods"]) == names and "energy_ttt/3" in names
    for row in results["methods"].values():
        for key in em.scalars(emd.ERROR):
            assert math.isfinite(row[key]["mean"]), key
        assert 0 <= row["error"]["mean"] <= 1 and row["uj_per_token"]["mean"] > 0
    assert results["monitor"] == "simulated"
    assert set(results["matched"]) == {"prune/1", "top_k/1"}
    no_ttt = results["methods"]["no_ttt"]
    assert no_ttt["error_change"]["mean"] == 0 and no_ttt["meets_overhead_target"] is None
    # the change is absolute (accuracy points), per seed against no_ttt
    for name, row in results["methods"].items():
        expected = _cell(workdir, name)["error"] - _cell(workdir, "no_ttt")["error"]
        assert row["error_change"]["mean"] == pytest.approx(expected, abs=1e-12)
    assert results["methods"]["top_k/1"]["uj_per_token"]["mean"] < no_ttt["uj_per_token"]["mean"]
    assert 0 <= results["seed_info"][0]["clean_test_error"] <= 1
    text = (workdir / "summary.md").read_text()
    assert "| no_ttt |" in text and "| error |" in text and "pp" in text
    assert emd.summary(results, cfg) == text.strip() and "bits/char" not in text
    for plot in ("pareto", "heatmap", "convergence", "budget"):
        assert (workdir / f"energy_moe_digits_{plot}.png").stat().st_size > 1000


@pytest.mark.slow
def test_no_ttt_error_matches_a_direct_evaluation(tiny_run):
    """The cell's prequential error equals argmax of the model applied batch by batch."""
    cfg, workdir, results = tiny_run
    rt = em.build_runtime(cfg, emd.model_config(cfg), head="class")
    params, _ = em.cached_params(rt, 0, str(workdir), fit=None)
    _, _, x_te, y_te = digits_c.load_digits_split(0, cfg.data.test_fraction)
    stream = emd.shifted_stream(cfg, x_te, y_te, 0)
    apply = jax.jit(moe.init_moe(emd.model_config(cfg)).apply)
    b = cfg.data.batch
    wrong = 0
    for i in range(0, len(stream.targets), b):
        logits = np.asarray(apply(params, stream.inputs[i : i + b]).class_logits)
        wrong += int(np.sum(logits.argmax(-1) != stream.targets[i : i + b]))
    assert _cell(workdir, "no_ttt")["error"] == pytest.approx(wrong / len(stream.targets))
    adapted = _cell(workdir, "energy_ttt/3")
    assert adapted["adapt_calls"] == math.ceil(cfg.data.stream_batches / cfg.ttt.every)
    assert 0 < adapted["adapt_dynamic_j"] < adapted["dynamic_j"]


@pytest.mark.slow
def test_rerun_reuses_the_cached_cells_and_parameters(tiny_run, monkeypatch):
    cfg, workdir, results = tiny_run

    def fail(*args, **kwargs):
        raise AssertionError("a cached cell or checkpoint was recomputed")

    monkeypatch.setattr(em, "serve", fail)
    monkeypatch.setattr(emd.em, "pretrain", fail)
    again = emd.run(cfg, str(workdir))
    for name, row in results["methods"].items():
        assert again["methods"][name]["error"]["mean"] == row["error"]["mean"]
        assert again["methods"][name]["uj_per_token"]["mean"] == row["uj_per_token"]["mean"]


@pytest.mark.slow
def test_write_report_renders_the_section_and_figures(tiny_run, monkeypatch, tmp_path):
    cfg, workdir, results = tiny_run
    written = {}
    monkeypatch.setattr(emd.report, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(emd.report, "update_section", lambda n, b, *a: written.update({n: b}))
    emd.write_report(results, cfg, str(workdir))  # the cells are read back from the workdir
    body = written["energy_moe_digits"]
    assert "Energy is simulated" in body and "configs/energy_moe_digits.py" in body
    assert emd.summary(results, cfg) in body and "Routing alone" in body
    for plot in ("pareto", "heatmap", "convergence", "budget"):
        assert f"docs/figures/energy_moe_digits_{plot}.png" in body
        path = tmp_path / "docs" / "figures" / f"energy_moe_digits_{plot}.png"
        assert path.stat().st_size > 1000


def test_tokens_quantise_pixels_row_major():
    rng = np.random.default_rng(0)
    images = rng.uniform(-0.1, 1.1, size=(5, 8, 8))
    out = emd.tokens(images)
    assert out.shape == (5, 64) and out.dtype == np.int32
    for n in range(5):
        for r in range(8):
            for c in range(8):
                expected = round(min(max(images[n, r, c], 0.0), 1.0) * 16)
                assert out[n, 8 * r + c] == expected
    # the clean digits are integers 0..16 scaled by 1/16: tokens give them back exactly
    from sklearn.datasets import load_digits

    raw = load_digits().images[:20]
    assert np.array_equal(emd.tokens(raw / 16.0), raw.reshape(20, 64).astype(np.int32))


def test_schedule_partitions_the_stream_over_every_pair():
    cfg = digits_config.get_config()
    segments = emd.schedule(cfg)
    pairs = {(c, s) for _, _, c, s in segments}
    assert pairs == {(c, s) for c in cfg.data.corruptions for s in cfg.data.severities}
    covered = [t for start, end, _, _ in segments for t in range(start, end)]
    assert covered == list(range(cfg.data.stream_batches))


def test_shifted_stream_is_the_corrupted_test_split():
    cfg = digits_config.get_config("tiny")
    _, _, x_te, y_te = digits_c.load_digits_split(0, cfg.data.test_fraction)
    stream = emd.shifted_stream(cfg, x_te, y_te, 3)
    n = cfg.data.stream_batches * cfg.data.batch
    assert stream.inputs.shape == (n, 64) and stream.targets.shape == (n,)
    assert stream.inputs.min() >= 0 and stream.inputs.max() <= 16
    # the first batch is gaussian_noise at severity 5 of some test images: not clean tokens
    clean = {tuple(t) for t in emd.tokens(x_te)}
    assert not any(tuple(t) in clean for t in stream.inputs[: cfg.data.batch])
    again = emd.shifted_stream(cfg, x_te, y_te, 3)
    assert np.array_equal(stream.inputs, again.inputs)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seeds", (), "seeds is empty"),
        ("data.length", 32, "data.length must be 64"),
        ("data.corruptions", ("fog",), "unknown corruption 'fog'"),
        ("data.severities", (6,), "severities must be in 1..5"),
        ("data.stream_batches", 9, "multiple of the 2"),
        ("ttt.params", "routr", "routr"),
        ("ttt.lambdas", (0.0,), "ttt.lambdas must be > 0"),
        ("budget.fractions", (1.2,), "budget.fractions"),
        ("baselines.top_k", (2,), "baselines.top_k"),
        ("train.num_steps", 30, "multiple of train.steps_per_call"),
    ],
)
def test_bad_config_values_are_rejected(key, value, message):
    cfg = digits_config.get_config("tiny")
    *sections, field = key.split(".")
    node = cfg
    for s in sections:
        node = node[s]
    node[field] = value
    with pytest.raises(ValueError, match=message):
        emd.validate(cfg)


def test_unknown_variant_and_demo_config_is_valid():
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        digits_config.get_config("huge")
    emd.validate(digits_config.get_config("demo"))


def test_demo_rows_shape(monkeypatch, tmp_path):
    point = lambda uj, err: {"uj_per_token": {"mean": uj}, "error": {"mean": err}}
    fake = {"methods": {"no_ttt": point(0.2, 0.3), "energy_ttt/3": point(0.1, 0.35)}}
    monkeypatch.setattr(emd, "run", lambda cfg, workdir: fake)
    rows = emd.demo_rows(str(tmp_path))
    assert [r[3:5] for r in rows] == [(0.2 * 64, 0.1 * 64), (0.3, 0.35)]
    assert all(len(r) == 6 and r[0] == "energy-aware MoE TTT" for r in rows)
