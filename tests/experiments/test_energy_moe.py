"""The energy-aware MoE TTT experiment: tiny config end to end, its arithmetic and config checks."""

import itertools
import json
import math

import jax
import numpy as np
import pytest

from configs import energy_moe as energy_config
from experiments import energy_moe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = energy_config.get_config("tiny")
    workdir = tmp_path_factory.mktemp("energy_moe")
    return cfg, workdir, energy_moe.run(cfg, str(workdir))


@pytest.mark.slow
def test_tiny_run_gives_finite_results_for_every_method(tiny_run):
    cfg, workdir, results = tiny_run
    names = list(energy_moe.methods(cfg))
    assert list(results["methods"]) == names
    assert names[:2] == ["no_ttt", "ttt"] and "energy_ttt/0.3" in names and "top_k/1" in names
    for row in results["methods"].values():
        for key in energy_moe.SCALARS:
            assert math.isfinite(row[key]["mean"]), key
        assert row["uj_per_token"]["mean"] > 0 and row["bpc"]["mean"] > 0
    assert results["monitor"] == "simulated"
    assert set(results["pareto_front"]) <= set(names) and results["pareto_front"]
    assert set(results["matched"]) == {"prune/1", "top_k/1"}
    no_ttt = results["methods"]["no_ttt"]
    assert no_ttt["energy_reduction"]["mean"] == 0 and no_ttt["meets_overhead_target"] is None
    # a smaller top-k routes each token to fewer experts: less expert energy per token
    for key in ("uj_per_token", "routed_uj_per_token_late"):
        assert results["methods"]["top_k/1"][key]["mean"] < no_ttt[key]["mean"]
    # the infeasible budget escalates to degradation (level 2: a smaller top-k)
    assert results["methods"]["budget/0.05"]["final_level"] == [2]
    text = (workdir / "summary.md").read_text()
    assert "| no_ttt |" in text and "Matched accuracy" in text and "Power budgets" in text
    assert energy_moe.summary(results, cfg) == text.strip()
    for plot in ("pareto", "heatmap", "convergence", "budget"):
        assert (workdir / f"energy_moe_{plot}.png").stat().st_size > 1000
    assert json.loads((workdir / "results.json").read_text())["seeds"] == [0]


@pytest.mark.slow
def test_cell_energy_accounting_matches_the_simulated_device(tiny_run):
    """Total energy = idle power over the stream's duration + the dynamic work's energy (more
    time passes when a batch's work overruns its serving period), and EDP is its arithmetic."""
    cfg, workdir, results = tiny_run
    dev = energy_moe.SimulatedDevice()
    period = cfg.data.batch * cfg.data.length / results["serving_rate_tokens_s"]
    duration = cfg.data.stream_batches * period
    for name in ("no_ttt", "energy_ttt/3"):
        cell = json.loads(
            (workdir / "cells" / "seed_0" / f"{name.replace('/', '_')}.json").read_text()
        )
        expected = dev.idle_power_w * duration + cell["dynamic_j"]
        if name == "no_ttt":  # the device keeps up with the stream: exactly idle + dynamic
            assert cell["delay_s"] <= duration
            assert cell["energy_j"] == pytest.approx(expected, rel=1e-6)
        else:
            assert cell["energy_j"] >= expected * (1 - 1e-6)
            # each batch lasts max(period, its busy time) <= period + busy time
            assert cell["energy_j"] <= expected + dev.idle_power_w * cell["delay_s"] * (1 + 1e-6)
        assert cell["edp"] == pytest.approx(
            energy_moe.edp(cell["dynamic_j"], cell["delay_s"], cell["tokens"]), rel=1e-12
        )
    adapted = json.loads((workdir / "cells" / "seed_0" / "energy_ttt_3.json").read_text())
    assert adapted["adapt_calls"] == math.ceil(cfg.data.stream_batches / cfg.ttt.every)
    assert 0 < adapted["adapt_dynamic_j"] < adapted["dynamic_j"]
    # inference energy = dense part + expert part; the adaptation's energy comes on top
    inference_j = adapted["dynamic_j"] - adapted["adapt_dynamic_j"]
    assert 0 < adapted["expert_j"] < inference_j
    assert len(adapted["curve_energy_uj"]) == adapted["adapt_calls"] * cfg.ttt.steps


@pytest.mark.slow
def test_rerun_reuses_the_cached_cells_and_parameters(tiny_run, monkeypatch):
    cfg, workdir, results = tiny_run

    def fail(*args, **kwargs):
        raise AssertionError("a cached cell or checkpoint was recomputed")

    monkeypatch.setattr(energy_moe, "serve", fail)
    monkeypatch.setattr(energy_moe, "pretrain", fail)
    again = energy_moe.run(cfg, str(workdir))
    for name, row in results["methods"].items():
        assert again["methods"][name]["bpc"]["mean"] == row["bpc"]["mean"]
        assert again["methods"][name]["uj_per_token"]["mean"] == row["uj_per_token"]["mean"]
    # the trained parameters come back from their checkpoint, not from training
    rt = energy_moe.build_runtime(cfg)
    params, info = energy_moe.trained_params(cfg, rt, 0, None, str(workdir))
    assert info == results["seed_info"][0]
    init = rt.init(0)
    assert jax.tree.structure(params) == jax.tree.structure(init)
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(init), strict=True)
    changed = [not np.allclose(a, b) for a, b in leaves]
    assert any(changed)


def brute_force_front(points):
    front = []
    for i, p in enumerate(points):
        dominated = any(
            q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1]) for q in points
        )
        if not dominated:
            front.append(i)
    return front


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_matches_brute_force_dominance(seed):
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 6, size=(40, 2)).astype(float)  # many ties and duplicates
    points[:10] = rng.normal(size=(10, 2))
    assert energy_moe.pareto_front(points).tolist() == brute_force_front(points.tolist())


def test_pareto_front_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape \\(N, 2\\)"):
        energy_moe.pareto_front(np.ones((3, 3)))


def test_edp_arithmetic():
    rng = np.random.default_rng(0)
    for energy, delay, tokens in zip(rng.uniform(0.1, 5, 5), rng.uniform(1e-6, 1, 5),
                                     rng.integers(1, 1000, 5), strict=True):  # fmt: skip
        assert energy_moe.edp(energy, delay, int(tokens)) == pytest.approx(
            energy * delay / tokens**2, rel=1e-12
        )
    with pytest.raises(ValueError, match="tokens"):
        energy_moe.edp(1.0, 1.0, 0)


def test_static_mask_prunes_the_costliest_experts():
    cfg = energy_config.get_config("tiny")
    rt = energy_moe.build_runtime(cfg)
    for n in range(cfg.model.num_experts - cfg.model.top_k + 1):
        mask = energy_moe.static_mask(rt, n)
        assert (~mask).sum() == n
        # every pruned expert costs at least as much as every kept one
        if 0 < n:
            assert rt.joules[~mask].min() >= rt.joules[mask].max()


def test_matched_accuracy_comparison():
    table = {
        "no_ttt": energy_moe.Method("no_ttt"),
        "energy_ttt/1": energy_moe.Method("energy_ttt", lam=1.0),
        "energy_ttt/2": energy_moe.Method("energy_ttt", lam=2.0),
        "prune/1": energy_moe.Method("prune", prune=1),
        "top_k/1": energy_moe.Method("top_k", top_k=1),
    }
    point = lambda bpc, uj: {"bpc": {"mean": bpc}, "uj_per_token": {"mean": uj}}
    rows = {
        "no_ttt": point(2.0, 1.0),
        "energy_ttt/1": point(2.05, 0.7),
        "energy_ttt/2": point(2.2, 0.5),
        "prune/1": point(2.1, 0.8),
        "top_k/1": point(2.01, 0.6),
    }
    out = energy_moe.matched(rows, table)
    assert out["prune/1"]["best_aware"] == "energy_ttt/1" and out["prune/1"]["beats"]
    assert out["top_k/1"]["best_aware"] is None and out["top_k/1"]["beats"] is None
    rows["top_k/1"] = point(2.3, 0.4)  # cheaper than every aware point that is as accurate
    assert energy_moe.matched(rows, table)["top_k/1"] == {
        "baseline_bpc": 2.3,
        "baseline_uj": 0.4,
        "best_aware": "energy_ttt/2",
        "aware_bpc": 2.2,
        "aware_uj": 0.5,
        "beats": False,
    }


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seeds", (), "seeds is empty"),
        ("monitor.kind", "rapl", "monitor.kind must be one of"),
        ("monitor.utilization", 1.5, "utilization"),
        ("ttt.params", "routr", "routr"),
        ("ttt.lambdas", (0.0, 1.0), "ttt.lambdas must be > 0"),
        ("ttt.windows", 99, "ttt.windows <= data.batch"),
        ("budget.fractions", (1.2,), "budget.fractions"),
        ("baselines.prune", (3,), "baselines.prune"),
        ("baselines.top_k", (2,), "baselines.top_k"),
        ("model.num_heads", 3, "num_heads"),
        ("train.num_steps", 30, "multiple of train.steps_per_call"),
        ("data.heldout_windows", 6, "multiple of data.batch"),
    ],
)
def test_bad_config_values_are_rejected(key, value, message):
    cfg = energy_config.get_config("tiny")
    *sections, field = key.split(".")
    node = cfg
    for s in sections:
        node = node[s]
    node[field] = value
    with pytest.raises(ValueError, match=message):
        energy_moe.validate(cfg)


def test_unknown_variant_and_method_names():
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        energy_config.get_config("huge")
    names = list(energy_moe.methods(energy_config.get_config()))
    assert names[0] == "no_ttt" and len(names) == 2 + 5 + 4 + 3 + 1
    assert sum(name.startswith("budget/") for name in names) == 4
    assert list(itertools.islice(names, 2, 3)) == ["energy_ttt/0.01"]


def test_demo_rows_shape(monkeypatch, tmp_path):
    keys = ("routed_uj_per_token_late", "uj_per_token", "bpc")
    point = lambda *values: {k: {"mean": v} for k, v in zip(keys, values, strict=True)}
    fake = {"methods": {"no_ttt": point(0.1, 0.2, 5.0), "energy_ttt/3": point(0.05, 0.1, 5.1)}}
    monkeypatch.setattr(energy_moe, "run", lambda cfg, workdir: fake)
    rows = energy_moe.demo_rows(str(tmp_path))
    assert [r[3:5] for r in rows] == [(0.1, 0.05), (0.2, 0.1), (5.0, 5.1)]
    assert all(len(r) == 6 and r[0] == "energy-aware MoE TTT" for r in rows)
    assert "µJ" in rows[0][2] and "bits/char" in rows[2][2]


def test_routed_energy_is_the_sum_over_assignments():
    rt = energy_moe.build_runtime(energy_config.get_config("tiny"))
    counts = np.random.default_rng(0).integers(0, 50, size=(3, rt.joules.size))
    expected = 0.0
    for layer in counts:
        for e, n in enumerate(layer):
            expected += n * rt.joules[e]
    assert energy_moe.routed_energy(rt, counts, 7) == pytest.approx(1e6 * expected / 7, rel=1e-12)


@pytest.mark.slow
def test_write_report_renders_the_section_and_figures(tiny_run, monkeypatch, tmp_path):
    cfg, workdir, results = tiny_run
    written = {}
    monkeypatch.setattr(energy_moe.report, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(
        energy_moe.report, "update_section", lambda n, b, *a: written.update({n: b})
    )
    energy_moe.write_report(results, cfg, str(workdir))  # the cells are read back
    body = written["energy_moe"]
    assert "Energy is simulated" in body and "configs/energy_moe.py" in body
    assert energy_moe.summary(results, cfg) in body and "Routing alone" in body
    for plot in ("pareto", "heatmap", "convergence", "budget"):
        assert f"docs/figures/energy_moe_{plot}.png" in body
        assert (tmp_path / "docs" / "figures" / f"energy_moe_{plot}.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "docs" / "results" / "energy_moe.json").read_text())
    assert saved["pareto_front"] == results["pareto_front"]
