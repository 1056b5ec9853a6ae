"""The ATTD-on-LRA experiment: tiny end to end (results, summary, cached rerun), config checks,
the Spearman/bootstrap helper against a brute-force rank correlation, shifted test splits,
and the starting thresholds."""

import json

import numpy as np
import pytest

from attd.controller import threshold_controller
from configs import attd_lra as attd_config
from experiments import attd_lra


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = attd_config.get_config("tiny")
    workdir = tmp_path_factory.mktemp("demo") / "attd_lra"  # where demo_rows looks too
    return cfg, workdir, attd_lra.run(cfg, str(workdir))


@pytest.mark.slow
def test_tiny_run_gives_finite_results_and_a_summary(tiny_run):
    cfg, workdir, results = tiny_run
    table = results["tasks"]["listops"]
    assert set(table) == set(cfg.methods) == {"fixed", "attd"}
    k_max = cfg.attd.k_max
    for name, e in table.items():
        for key in attd_lra.SCALARS:
            assert np.isfinite(e[key]["mean"]), (name, key)
        assert 0.0 <= e["acc_shift"]["mean"] <= 1.0 and 0.0 <= e["acc_id"]["mean"] <= 1.0
        assert len(e["k_hist_shift"]) == (1 if name == "fixed" else k_max + 1)  # K = 0..K_max
        assert sum(e["k_hist_shift"]) == cfg.data.listops.test_shift.num
        assert 0.0 < e["max_rho"] <= 1.0  # the adapted transitions stay contractions
        assert e["max_abs_path_diff"] < 1e-4  # masked and grouped paths agree
        assert e["masked_ms_per_example"]["mean"] > 0 and e["grouped_ms_per_example"]["mean"] > 0
    fixed = table["fixed"]
    assert fixed["mean_k_shift"]["mean"] == 0.0 and fixed["inner_steps_shift"]["mean"] == 0.0
    assert fixed["lint_after_shift"]["mean"] == pytest.approx(fixed["lint_before_shift"]["mean"])
    cell = json.loads((workdir / "listops" / "seed_0" / "attd.json").read_text())
    assert cell["inner_steps_shift"] == sum(cell["examples_shift"]["k"])
    assert len(cell["thresholds"]) == k_max
    assert np.all(np.diff(cell["thresholds"]) > 0)
    text = attd_lra.summary(results, cfg)
    assert "| ATTD |" in text and "| fixed Mamba (K=0) |" in text
    assert (workdir / "summary.md").read_text().strip() == text
    for plot in ("attd_accuracy_vs_k.png", "attd_k_vs_difficulty.png"):
        assert (workdir / plot).stat().st_size > 1000
    assert any("ATTD" in line for line in attd_lra.reading(results))


@pytest.mark.slow
def test_rerun_reuses_cached_cells(tiny_run, monkeypatch):
    cfg, workdir, results = tiny_run

    def refuse(*args, **kwargs):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr(attd_lra, "pretrain", refuse)
    monkeypatch.setattr(attd_lra, "run_cell", refuse)
    again = attd_lra.run(cfg, str(workdir))
    assert (
        again["tasks"]["listops"]["attd"]["acc_shift"]
        == (results["tasks"]["listops"]["attd"]["acc_shift"])
    )


@pytest.mark.slow
def test_demo_rows_have_the_demo_table_format(tiny_run, monkeypatch):
    cfg, workdir, results = tiny_run
    monkeypatch.setattr(attd_config, "get_config", lambda arg=None: cfg)  # the cached tiny run
    rows = attd_lra.demo_rows(str(workdir.parent))
    table = results["tasks"]["listops"]
    assert len(rows) == 1 and len(rows[0]) == 6
    system, method, metric, before, after, seconds = rows[0]
    assert (system, method) == ("ATTD on Mamba (ListOps)", "ATTD") and "accuracy" in metric
    assert before == table["fixed"]["acc_shift"]["mean"]
    assert after == table["attd"]["acc_shift"]["mean"] and seconds > 0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seeds", (), "seeds is empty"),
        ("tasks", ("imagenet",), "config.tasks must be"),
        ("methods", ("attd", "oracle"), "config.methods must be"),
        ("attd.k_max", 0, "attd.k_max"),
        ("attd.inner_opt", "rmsprop", "attd.inner_opt"),
        ("attd.objective", "contrastive", "attd.objective"),
        ("attd.inner_lr", 0.0, "attd.inner_lr"),
        ("finetune.steps", 0, "finetune.steps"),
        ("model.psi_rank", 0, "model.psi_rank"),
        ("model.d_model", 0, "d_model"),
    ],
)
def test_bad_config_raises_value_error(key, value, message):
    cfg = attd_config.get_config("tiny")
    section, _, leaf = key.rpartition(".")
    (cfg[section] if section else cfg)[leaf] = value
    with pytest.raises(ValueError, match=message):
        attd_lra.validate(cfg)


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        attd_config.get_config("huge")
    attd_lra.validate(attd_config.get_config())  # the default and the GPU sizes are valid
    attd_lra.validate(attd_config.get_config("lra_full"))


def brute_force_spearman(x, y):
    """Pearson correlation of average ranks, with the ranks counted in a Python loop."""

    def ranks(v):
        out = []
        for a in v:
            below = sum(1 for b in v if b < a)
            ties = sum(1 for b in v if b == a)
            out.append(below + (ties + 1) / 2)  # 1-based average rank of a tie group
        return np.asarray(out)

    rx, ry = ranks(list(x)), ranks(list(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float(np.sum(rx * ry) / np.sqrt(np.sum(rx**2) * np.sum(ry**2)))


def test_spearman_matches_brute_force_ranks():
    rng = np.random.default_rng(0)
    for n in (5, 17, 60):
        k = rng.integers(0, 4, n)  # many ties, as a step count has
        difficulty = k + rng.integers(0, 3, n) + rng.normal(0, 0.01, n).round(1)
        assert attd_lra.spearman(k, difficulty) == pytest.approx(
            brute_force_spearman(k, difficulty), abs=1e-12
        )
    assert np.isnan(attd_lra.spearman(np.ones(6), np.arange(6)))  # constant K: undefined


def test_spearman_bootstrap_ci_matches_a_resampling_loop():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, 40).astype(float)
    y = x + rng.normal(0, 2.0, 40)
    ci = attd_lra.spearman_ci(x, y, num_resamples=200, seed=3)
    idx = np.random.default_rng(3).integers(0, 40, (200, 40))
    boot = []
    for i in idx:
        xi, yi = x[i], y[i]
        boot.append(np.nan if np.ptp(xi) == 0 or np.ptp(yi) == 0 else brute_force_spearman(xi, yi))
    low, high = np.quantile(boot, [0.025, 0.975])
    assert ci.estimate == pytest.approx(brute_force_spearman(x, y), abs=1e-12)
    assert ci.low == pytest.approx(low, abs=1e-12) and ci.high == pytest.approx(high, abs=1e-12)
    assert ci.low < ci.estimate < ci.high
    with pytest.raises(ValueError, match="same length"):
        attd_lra.spearman_ci(x, y[:-1])


def test_shifted_splits_are_shifted():
    tiny = attd_config.get_config("tiny")
    full = attd_config.get_config()
    # ListOps (default sizes: cheap to generate): every shifted expression is deeper than any
    # training expression, and longer on average; the in-distribution split is not shifted.
    listops = attd_lra.load_task(full, "listops", 0)
    assert listops.test_shift.difficulty.min() > listops.train.difficulty.max()
    assert listops.test_id.difficulty.max() <= listops.train.difficulty.max()
    length = lambda s: s.mask.sum(1).mean()
    assert length(listops.test_shift) > 1.5 * length(listops.train)
    assert listops.test_shift.tokens.shape[1] == full.data.listops.test_shift.seq_len
    # Pathfinder: longer main paths; Text: held-out files cut into longer passages.
    path = attd_lra.load_task(tiny, "pathfinder", 0)
    assert path.test_shift.difficulty.mean() > path.train.difficulty.max()
    assert path.train.labels.mean() == pytest.approx(0.5, abs=0.05)
    text = attd_lra.load_task(tiny, "text", 0)
    assert text.train.tokens.shape[1] == tiny.data.text.seq_len
    assert text.test_shift.tokens.shape[1] == tiny.data.text.test_length
    assert text.test_shift.difficulty.mean() > text.train.difficulty.max()
    assert len(text.test_shift.labels) == tiny.data.text.num_test


def test_initial_thresholds_spread_k_evenly():
    signal = np.random.default_rng(2).gamma(2.0, 1.0, 1000)
    ctrl = threshold_controller(4)
    t = attd_lra.initial_thresholds("attd", signal, 4)
    assert np.all(np.diff(t) > 0)
    k = np.asarray(ctrl.hard_steps(ctrl.init(t), signal))
    np.testing.assert_allclose(np.bincount(k, minlength=5) / 1000, 0.2, atol=0.01)
    assert attd_lra.initial_thresholds("gate", signal, 4) == pytest.approx(np.median(signal))
    assert attd_lra.initial_thresholds("ttt", signal, 4) is None
