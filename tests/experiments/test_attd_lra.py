"""The ATTD-on-LRA experiment: tiny end to end (results, summary, cached rerun), config checks,
shifted test splits, the starting thresholds, the second-order comparison's pieces (method
variants, the meta-gradient of ``+so`` against finite differences, ablation seeds, section and
figures), and a pretraining killed mid-cell that resumes bit-identically."""

import copy
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from attd.dynamics import ADAPTERS
from attd.mamba import init_mamba
from configs import attd_dynamics as dynamics_config
from configs import attd_lra as attd_config
from experiments import attd_lra, harness, report
from experiments.attd_lra import methods, readings, training
from experiments.attd_lra import report as attd_report
from experiments.attd_lra.aggregate import mixture_and_bands, shift_bands
from metattt import objectives, sharding
from tests.metattt.test_stats import brute_force_spearman

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "attd_lra" / "results.json"
N_ID = 16  # test_id.num of the tiny config that wrote the fixture: examples = id then shift


@pytest.fixture
def frozen():
    """results.json of the tiny run (one seed, ListOps, fixed and ATTD; no input adapted)."""
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny run on one device: ``(config, workdir, results)``."""
    cfg = attd_config.get_config("tiny")
    workdir = tmp_path_factory.mktemp("attd_lra") / "attd_lra"
    return cfg, workdir, attd_lra.run(cfg, str(workdir))


def _refuse(*args, **kwargs):
    raise AssertionError("a cached cell was recomputed")


@pytest.mark.slow
def test_tiny_run_end_to_end_caches_its_cells(tiny_run, monkeypatch):
    cfg, workdir, results = tiny_run
    table = results["tasks"]["listops"]
    assert set(table) == set(cfg.methods) == {"fixed", "attd"}
    k_max = cfg.attd.k_max
    n_id, n_shift = cfg.data.listops.test_id.num, cfg.data.listops.test_shift.num
    for name, e in table.items():
        for key in attd_lra.SCALARS:
            assert np.isfinite(e[key]["mean"]), (name, key)
        correct = np.asarray(e["examples"]["correct"])
        assert e["acc_id"]["mean"] == pytest.approx(correct[:n_id].mean())
        assert e["acc_shift"]["mean"] == pytest.approx(correct[n_id:].mean())
        k = np.asarray(e["examples"]["k"])
        hist = np.bincount(k[n_id:], minlength=k_max + 1 if name != "fixed" else 1)
        assert e["k_hist_shift"] == hist.tolist() and len(k) == n_id + n_shift
        assert e["max_rho"] < 1.0  # the adapted transitions stay contractions
        assert e["max_abs_path_diff"] < 1e-4  # masked and grouped paths agree
    fixed = table["fixed"]
    assert fixed["mean_k_shift"]["mean"] == 0.0 and fixed["inner_steps_shift"]["mean"] == 0.0
    assert np.max(np.abs(fixed["examples"]["dlogp"])) < 1e-4  # K = 0: log p does not move
    assert fixed["lint_after_shift"]["mean"] == pytest.approx(fixed["lint_before_shift"]["mean"])
    cell = json.loads((workdir / "listops" / "seed_0" / "attd.json").read_text())
    assert cell["inner_steps_shift"] == sum(cell["examples_shift"]["k"])
    assert len(cell["thresholds"]) == k_max and np.all(np.diff(cell["thresholds"]) > 0)
    assert "| ATTD |" in (workdir / "summary.md").read_text()
    for plot in ("attd_accuracy_vs_k.png", "attd_k_vs_difficulty.png"):
        assert (workdir / plot).stat().st_size > 1000

    monkeypatch.setattr(training, "pretrain", _refuse)
    monkeypatch.setattr(training, "run_cell", _refuse)
    again = attd_lra.run(cfg, str(workdir))["tasks"]["listops"]
    assert json.dumps(again, sort_keys=True) == json.dumps(table, sort_keys=True)  # NaN-safe


def test_summary_table_rows_follow_the_per_input_results(frozen):
    text = attd_lra.summary(frozen, None)
    assert "**listops** (means over seeds [0] ± 95% CI;" in text
    for name, label, rho in (("fixed", "fixed Mamba (K=0)", "-"), ("attd", "ATTD", None)):
        e = frozen["tasks"]["listops"][name]
        correct, k = np.asarray(e["examples"]["correct"]), np.asarray(e["examples"]["k"])
        counts = np.bincount(k[N_ID:], minlength=len(e["k_hist_shift"]))
        hist = " / ".join(f"{100 * c / counts.sum():.0f}" for c in counts)
        row = (
            f"| {label} | {correct[:N_ID].mean():.3f} | {correct[N_ID:].mean():.3f} | "
            f"{k[N_ID:].mean():.2f} | {hist} | {k[N_ID:].sum()} | "
            f"{e['lint_before_shift']['mean']:.4f} → {e['lint_after_shift']['mean']:.4f} | - | "
            f"{e['max_rho']:.6f} | {e['masked_ms_per_example']['mean']:.2f} | "
            f"{e['grouped_ms_per_example']['mean']:.2f} | {rho or 'n/a (K constant)'} |"
        )
        assert row in text.splitlines(), row


def test_reading_of_the_frozen_run_states_no_adaptation(frozen):
    lines = attd_lra.reading(frozen)
    attd = frozen["tasks"]["listops"]["attd"]
    acc = lambda n: np.mean(frozen["tasks"]["listops"][n]["examples"]["correct"][N_ID:])
    assert lines[0] == (
        f"- listops (shifted split, fixed Mamba {acc('fixed'):.3f}): ATTD "
        f"{acc('attd') - acc('fixed'):+.3f} accuracy vs fixed at mean K 0.00 (no input adapted)"
    )
    first = attd["thresholds"][0][0]
    assert lines[1] == (
        "  - ATTD: K histogram over both test splits 100 / 0 / 0 % for K = 0..2; first threshold "
        f"after training {first:.3f} (mean over seeds) vs mean signal s = "
        f"{attd['lint_before_shift']['mean']:.3f} on the shifted split; Spearman of K with "
        "nesting depth: n/a (K constant)."
    )
    assert len(lines) == 2  # no full TTT, no second order: no conclusions


def test_reading_names_the_drop_to_gain_correlation_where_it_was_measured(frozen):
    """A run that measured Spearman(L_int drop, Δ log p) states it with its interval; a kept
    run from before it was measured (no such field) renders without it."""
    ttt = _with_entry(frozen, "ttt", "attd")["tasks"]["listops"]["ttt"]
    ttt["spearman_drop_correct"] = {"estimate": 0.1, "low": -0.2, "high": 0.4}
    ttt["spearman_drop_dlogp"] = {"estimate": 0.32, "low": 0.05, "high": 0.55}
    lines = attd_lra.reading(frozen)
    assert (
        "  - full TTT (K=K_max): Spearman of the per-input L_int drop with the change of "
        "log p(true class) from ψ₀ +0.32 [+0.05, +0.55] (both test splits; does the "
        "self-supervised progress carry to the task?)."
    ) in lines
    del ttt["spearman_drop_dlogp"]
    assert not any("log p(true class)" in line for line in attd_lra.reading(frozen))


def test_reading_names_the_outer_steps_skipped_as_non_finite(frozen):
    """Skipped outer steps are named per method; none (or cells from before they were
    counted) adds no line."""
    before = attd_lra.reading(frozen)
    _with_entry(frozen, "ttt", "attd", skipped_outer_steps=7)
    frozen["tasks"]["listops"]["attd"]["skipped_outer_steps"] = 0
    lines = attd_lra.reading(frozen)
    assert (
        "  - Outer steps skipped because their loss or gradient was not finite (summed over "
        "seeds; the outer step keeps θ, ψ₀ and the thresholds as they were): full TTT "
        "(K=K_max) 7."
    ) in lines
    frozen["tasks"]["listops"]["ttt"]["skipped_outer_steps"] = None
    assert not any("skipped" in line for line in attd_lra.reading(frozen))
    assert not any("skipped" in line for line in before)


def _with_entry(results, name, like, **changes):
    """``results`` with a method ``name`` copied from ``like`` and some fields replaced."""
    table = results["tasks"]["listops"]
    table[name] = {**json.loads(json.dumps(table[like])), **changes}
    return results


def test_conclusions_say_ttt_did_not_help_only_when_it_did_not(frozen):
    acc = frozen["tasks"]["listops"]["fixed"]["acc_shift"]["mean"]
    worse = _with_entry(
        frozen, "ttt", "fixed",
        acc_shift={"mean": acc - 0.05, "ci": 0.0},
        lint_before_shift={"mean": 2.0, "ci": 0.0},
        lint_after_shift={"mean": 1.5, "ci": 0.0},
    )  # fmt: skip
    lines = attd_lra.reading(worse)
    said = [x for x in lines if x.startswith("- Test-time adaptation of the dynamics did not")]
    assert len(said) == 1 and "relative drop after 2 steps: listops 25.0%" in said[0]
    assert any(x.startswith("- ATTD learned to spend little") and "listops" in x for x in lines)
    attd = frozen["tasks"]["listops"]["attd"]
    ratio = attd["grouped_ms_per_example"]["mean"] / attd["masked_ms_per_example"]["mean"]
    assert any(f"takes {ratio:.2f}-{ratio:.2f}x the masked path" in x for x in lines)
    worse["tasks"]["listops"]["ttt"]["acc_shift"]["mean"] = acc + 0.05
    assert not any("did not help" in x for x in attd_lra.reading(worse))


@pytest.mark.parametrize(
    "fixed, second, verdict",
    [([0.1, 0.2, 0.3], [0.3, 0.5, 0.6], "Yes"), ([0.1, 0.2, 0.3], [0.2, 0.1, 0.4], "No")],
)
def test_order_verdict_needs_a_gain_whose_interval_excludes_zero(frozen, fixed, second, verdict):
    seeds = dict(seeds=[0, 1, 2])
    results = _with_entry(frozen, "fixed", "fixed", acc_shift_seeds=fixed, **seeds)
    results = _with_entry(results, "ttt", "fixed", acc_shift_seeds=fixed, **seeds)
    results = _with_entry(results, "ttt+so", "fixed", acc_shift_seeds=second, **seeds)
    diffs = np.subtract(second, fixed)
    half = scipy.stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    assert (np.mean(diffs) - half > 0) == (verdict == "Yes")  # the hand-computed interval
    lines = attd_lra.reading(results)
    line = next(x for x in lines if x.startswith("- listops: does second-order meta-training"))
    assert line.startswith(f"- listops: does second-order meta-training make TTT of the "
                           f"dynamics help? {verdict}: ")  # fmt: skip
    assert f"{np.mean(diffs):+.3f} [{np.mean(diffs) - half:+.3f}, " in line


def test_write_report_uses_the_configured_section_and_figure_prefix(frozen, tmp_path, monkeypatch):
    cfg = attd_config.get_config("tiny")
    cfg.section, cfg.figure_prefix = "attd_lra_probe", "attd_so_probe"
    written = {}
    monkeypatch.setattr(report, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(report, "update_section", lambda n, b, *a: written.update({n: b}))
    attd_lra.write_report(frozen, cfg, str(tmp_path))
    assert list(written) == ["attd_lra_probe"]
    body = written["attd_lra_probe"]
    assert body.startswith("## ATTD (adaptive test-time dynamics) on Mamba, Long Range Arena")
    assert "docs/figures/attd_so_probe_accuracy_vs_k.png" in body and cfg.command in body
    seconds = frozen["base"]["listops"]["0"]["seconds"]
    assert f"(seconds: listops {seconds:.0f})" in body and "Ablation" not in body
    assert body.endswith("\n".join(attd_lra.reading(frozen)))
    saved = json.loads((tmp_path / "docs" / "results" / "attd_lra_probe.json").read_text())
    assert (
        saved["tasks"]["listops"]["attd"]["acc_shift"]
        == frozen["tasks"]["listops"]["attd"]["acc_shift"]
    )
    for plot in ("accuracy_vs_k", "k_vs_difficulty"):
        assert (tmp_path / "docs" / "figures" / f"attd_so_probe_{plot}.png").stat().st_size > 1000


@pytest.mark.slow
def test_the_outer_training_sharded_over_devices_equals_the_one_device_training(
    tiny_run, tmp_path, monkeypatch
):
    """``mesh_devices=2``: ATTD's outer training (the run's dominant cost) with each batch of 8
    inputs split over 2 of the 8 simulated CPU devices (the outer loss's logits hold 4 inputs
    per device, seen inside the compiled step), from the tiny run's base; the reference is the
    tiny run's one-device ATTD cell, read back from its run's final checkpoint (no training).
    The gradient sums the inputs in another order and 4 Adam steps carry that rounding forward:
    every parameter within 1e-5 (measured 7.5e-8, 2026-12-07), and each step's logged loss
    within 1e-5 relative. The parameters come back as this process's own arrays."""
    cfg, workdir, _ = tiny_run
    task, outer = attd_lra.load_task(cfg, "listops", 0)
    mcfg = attd_lra.model_config(cfg, task.vocab_size, task.num_classes)
    apply, theta = init_mamba(mcfg, seed=0)
    cell_dir = workdir / "listops" / "seed_0"
    theta, _ = harness.params_cell(cell_dir / "base", theta, _refuse)  # restored
    psi0 = training.initial_psi("attd", mcfg, cfg, 0)

    def outer_training(config, compiled, run_dir):
        return training.train_outer(config, compiled, "attd", theta, outer, 0, psi0, run_dir)

    single = training.compile_method("attd", apply, mcfg, cfg)
    want, want_log, _ = outer_training(cfg, single, str(cell_dir / "attd_run"))  # at its end
    sharded_cfg = copy.deepcopy(cfg)
    sharded_cfg.mesh_devices = 2
    sharded_cfg.finetune.checkpoint_every = cfg.finetune.steps  # one save: the same steps
    attd_lra.validate(sharded_cfg)
    seen, cross_entropy = [], objectives.cross_entropy
    whole = (cfg.finetune.batch, task.num_classes)  # the outer loss's logits

    def spy(logits, *rest, **kwargs):
        if logits.shape == whole:  # not the next-token losses inside the inner loop's vmap
            jax.debug.inspect_array_sharding(
                logits, callback=lambda s: seen.append(s.shard_shape(whole))
            )
        return cross_entropy(logits, *rest, **kwargs)

    monkeypatch.setattr(objectives, "cross_entropy", spy)
    dp = training.compile_method("attd", apply, mcfg, sharded_cfg, mesh=sharding.data_mesh(2))
    dp = dp._replace(signal=single.signal)  # the same probe, compiled once
    got, got_log, _ = outer_training(sharded_cfg, dp, str(tmp_path))
    assert seen and set(seen) == {(whole[0] // 2, whole[1])}
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        assert a.sharding.device_set == {jax.devices()[0]}
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    losses = [[row["loss"] for row in log] for log in (got_log, want_log)]
    np.testing.assert_allclose(*losses, rtol=1e-5)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seeds", (), "seeds is empty"),
        ("mesh_devices", 3, "mesh_devices=3 must be 0 or divide pretrain.batch=8"),
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
    protocol = attd_config.get_config("protocol")  # issue 17's protocol on LRA
    attd_lra.validate(protocol)
    assert protocol.attd.recalibrate and protocol.finetune.freeze_theta
    assert protocol.attd.inner_opt == "sgd" and protocol.attd.inner_lr_grid


def test_shifted_splits_are_shifted():
    tiny = attd_config.get_config("tiny")
    full = attd_config.get_config()
    # ListOps (default sizes: cheap to generate): every shifted expression is deeper than any
    # training expression, and longer on average; the in-distribution split is not shifted.
    listops, outer = attd_lra.load_task(full, "listops", 0)
    assert outer is listops.train  # LRA tasks: the outer loop trains on the train split
    assert listops.test_shift.difficulty.min() > listops.train.difficulty.max()
    assert listops.test_id.difficulty.max() <= listops.train.difficulty.max()
    length = lambda s: s.mask.sum(1).mean()
    assert length(listops.test_shift) > 1.5 * length(listops.train)
    assert listops.test_shift.tokens.shape[1] == full.data.listops.test_shift.seq_len
    # Pathfinder: longer main paths; Text: held-out files cut into longer passages.
    path, _ = attd_lra.load_task(tiny, "pathfinder", 0)
    assert path.test_shift.difficulty.mean() > path.train.difficulty.max()
    assert path.train.labels.mean() == pytest.approx(0.5, abs=0.05)
    text, _ = attd_lra.load_task(tiny, "text", 0)
    assert text.train.tokens.shape[1] == tiny.data.text.seq_len
    assert text.test_shift.tokens.shape[1] == tiny.data.text.test_length
    assert text.test_shift.difficulty.mean() > text.train.difficulty.max()
    assert len(text.test_shift.labels) == tiny.data.text.num_test


def test_initial_thresholds_follow_the_method():
    signal = np.random.default_rng(2).gamma(2.0, 1.0, 200)
    # gamma(2) samples spread far wider than min_gap: the thresholds are plain quantiles
    for name in ("attd", "attd_nocost+so"):
        thresholds = attd_lra.initial_thresholds(name, signal, 4)
        shares = [np.mean(signal < t) for t in thresholds]  # 1/5, 2/5, ... of s below each
        np.testing.assert_allclose(shares, [0.2, 0.4, 0.6, 0.8], atol=1 / len(signal))
    assert attd_lra.initial_thresholds("gate", signal, 4) == pytest.approx(np.median(signal))
    assert attd_lra.initial_thresholds("ttt", signal, 4) is None
    assert attd_lra.initial_thresholds("fixed+j", signal, 4) is None


# ------------------------------------------------------- method variants, second-order config


def test_parse_method_reads_variants_and_rejects_unknown_ones():
    spec = attd_lra.parse_method
    assert spec("attd") == attd_lra.MethodSpec("attd")
    assert spec("attd_nocost+so") == attd_lra.MethodSpec("attd_nocost", second_order=True)
    assert spec("ttt+so+sgd+r8") == attd_lra.MethodSpec("ttt", True, "sgd", 8)
    assert attd_lra.method_label("ttt+so+r8") == "full TTT (K=K_max), 2nd order, ψ rank 8"
    assert spec("ttt+so+j") == attd_lra.MethodSpec("ttt", second_order=True, joint=True)
    assert attd_lra.method_label("fixed+j") == "fixed Mamba (K=0), joint L_int"
    for bad, message in [
        ("oracle+so", "controller must be one of"),
        ("ttt+fast", "unknown variant 'fast'"),
        ("ttt+r0", "unknown variant 'r0'"),
        ("ttt+so+so", "second_order given twice"),
        ("ttt+sgd+adam", "inner_opt given twice"),
        ("ttt+j+j", "joint given twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            spec(bad)


def test_method_registry_builds_each_controller_with_its_step_range():
    from experiments.attd_lra.methods import BASES

    steps = {name: base.make(3, 0.1).max_steps for name, base in BASES.items()}
    assert steps == {"fixed": 0, "ttt": 3, "gate": 3, "attd": 3, "attd_nocost": 3}
    assert attd_lra.CONTROLLED == ("gate", "attd", "attd_nocost")
    with pytest.raises(ValueError, match=r"^method 'ttt\+q': unknown variant 'q' \(known: so, j, "):
        attd_lra.parse_method("ttt+q")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("methods", ("attd", "attd+xx"), "unknown variant 'xx'"),
        ("ablation_methods", ("attd",), "repeat a name"),
        ("ablation_seeds", (7,), "ablation_seeds"),
        ("section", "attd lra!", "config.section"),
        ("figure_prefix", "../x", "config.figure_prefix"),
        ("attd.adam_eps_root", -1.0, "adam_eps_root must be >= 0"),
        ("attd.adam_eps_root", 0.0, "second order through Adam"),
        ("attd.sgd_lr", 0.0, "attd.sgd_lr"),
        ("attd.joint_weight", -0.5, "joint_weight must be >= 0"),
    ],
)
def test_bad_second_order_config_raises_value_error(key, value, message):
    cfg = attd_config.get_config("second_order")
    section, _, leaf = key.rpartition(".")
    (cfg[section] if section else cfg)[leaf] = value
    with pytest.raises(ValueError, match=message):
        attd_lra.validate(cfg)


def test_second_order_config_pairs_every_adapting_method_with_its_first_order_twin():
    cfg = attd_config.get_config("second_order")
    attd_lra.validate(cfg)
    assert (cfg.section, cfg.figure_prefix) == ("attd_lra_second_order", "attd_so")
    assert "configs/attd_lra.py:second_order" in cfg.command and cfg.attd.first_order
    specs = [attd_lra.parse_method(n) for n in cfg.methods]
    first = {s.base for s in specs if not s.second_order}
    second = {s.base for s in specs if s.second_order}
    assert first == set(attd_lra.METHODS) and second == first - {"fixed"}
    assert all(s.inner_opt is None and s.psi_rank is None for s in specs)  # only the order
    assert cfg.data.text.seq_len <= 32 and cfg.data.listops.train.seq_len <= 32
    assert attd_config.get_config().section == "attd_lra"  # the default run keeps its section


def _tiny_method(name, cfg):
    from attd.dynamics import init_psi
    from attd.mamba import init_mamba

    mcfg = attd_lra.model_config(cfg, 11, 3)
    apply, theta = init_mamba(mcfg, seed=0)
    psi = init_psi(mcfg, cfg.model.psi_rank, jax.random.key(1), 0.5)
    return attd_lra.make_method(name, apply, mcfg, cfg), theta, psi


@pytest.mark.slow
def test_so_variant_gives_the_exact_meta_gradient_and_plain_name_the_first_order_one(x64):
    """``ttt+so`` differentiates through the inner Adam steps: its gradient matches central
    finite differences of the outer loss in float64; first-order ``ttt`` does not."""
    cfg = attd_config.get_config("tiny")
    cfg.attd.adam_eps_root = 1e-16
    cfg.attd.inner_lr = 0.3
    cfg.attd.k_max = 1  # one inner step has the second-order term and compiles fastest
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 11, (2, 6)))
    batch = (tokens, jnp.ones((2, 6), bool), jnp.asarray([0, 2]))
    derivative = {}
    for name in ("ttt", "ttt+so"):  # the same θ, ψ₀ and direction for both
        method, theta, psi = _tiny_method(name, cfg)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), method.init(theta, psi))
        # move V only: with U₀ = 0 the first inner gradient of V stays exactly 0, away from
        # the kink of Adam's g / (√(g² + eps_root) + eps) at g = 0
        v = jnp.asarray(np.random.default_rng(1).normal(size=params.psi.V.shape))
        direction = params.psi._replace(U=jnp.zeros_like(params.psi.U), V=v)

        def along(eps, p=params, d=direction, m=method):
            """The outer loss with ψ₀ moved by eps along d (the same value in both orders)."""
            moved = p._replace(psi=jax.tree.map(lambda a, b: a + eps * b, p.psi, d))
            return m.loss(moved, batch)[0]

        derivative[name] = float(jax.jit(jax.grad(along))(0.0))
    loss = jax.jit(along)
    finite_difference = float((loss(1e-5) - loss(-1e-5)) / 2e-5)
    assert derivative["ttt+so"] == pytest.approx(finite_difference, rel=1e-5)
    gap = abs(derivative["ttt"] - finite_difference)
    assert gap > 1e-3 * abs(finite_difference)  # first order drops a real term


def _fake_cell(rng, name, k_max, n=12):
    adapted = name != "fixed"
    ex = lambda: {
        "k": (np.full(n, k_max) if adapted else np.zeros(n, int)).tolist(),
        "difficulty": rng.integers(1, 5, n).astype(float).tolist(),
        "correct": rng.integers(0, 2, n).tolist(),
        "lint_drop": (rng.normal(0.01, 0.01, n) * adapted).tolist(),
        "dlogp": (rng.normal(0.0, 0.2, n) * adapted).tolist(),
    }
    cell = {k: float(rng.uniform()) for k in attd_lra.SCALARS}
    hist = [0] * k_max + [n] if adapted else [n]
    cell.update(k_hist_id=hist, k_hist_shift=hist, max_rho_id=0.9, max_rho_shift=0.95)
    cell.update(timing_max_abs_diff=0.0, thresholds=[], examples_id=ex(), examples_shift=ex())
    cell.update(final_train_loss=float(rng.uniform()), skipped_outer_steps=int(rng.integers(3)))
    return cell


def test_skipped_outer_steps_sum_over_seeds_and_old_cells_count_by_their_final_loss():
    """A cell from before the count: a finite final loss means no non-finite step was taken
    (it would have left NaN parameters), a NaN one means the count is unknown."""
    cfg = attd_config.get_config("tiny")
    cfg.seeds = (0, 1, 2)
    cfg.eval.bootstrap = 50
    rng = np.random.default_rng(5)
    cells = {"listops": {s: {"attd": _fake_cell(rng, "attd", 2)} for s in cfg.seeds}}
    cfg.methods = ("attd",)
    counts = [cells["listops"][s]["attd"]["skipped_outer_steps"] for s in cfg.seeds]
    entry = lambda: attd_lra.aggregate(cfg, cells, {})["tasks"]["listops"]["attd"]
    assert entry()["skipped_outer_steps"] == sum(counts)
    del cells["listops"][2]["attd"]["skipped_outer_steps"]  # an old, finite cell: none
    assert entry()["skipped_outer_steps"] == sum(counts[:2])
    cells["listops"][2]["attd"]["final_train_loss"] = float("nan")  # an old diverged cell
    assert entry()["skipped_outer_steps"] is None


def test_true_class_log_prob_matches_scipy_on_large_logits():
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 30, (9, 5)).astype(np.float32)  # exp overflows float32 unshifted
    labels = rng.integers(0, 5, 9)
    expected = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)[np.arange(9), labels]
    np.testing.assert_allclose(training.true_class_log_prob(logits, labels), expected, atol=1e-10)


def test_aggregate_keeps_ablation_seeds_and_paired_differences_match_a_loop():
    cfg = attd_config.get_config("second_order")
    cfg.eval.bootstrap = 50
    rng = np.random.default_rng(4)
    cells = {
        "text": {
            s: {m: _fake_cell(rng, m, cfg.attd.k_max) for m in attd_lra.seed_methods(cfg, s)}
            for s in cfg.seeds
        }
    }
    cells["text"][0]["ttt+so+sgd"]["examples_shift"]["lint_drop"][0] = float("nan")  # diverged
    out = attd_lra.aggregate(cfg, cells, {"text": {}})["tasks"]["text"]
    assert out["ttt+so+sgd"]["spearman_drop_correct"] is None  # no correlation of NaNs
    assert out["ttt+so+r8"]["seeds"] == [0] and out["ttt"]["seeds"] == [0, 1, 2]
    assert out["ttt+so+r8"]["acc_shift"]["mean"] == cells["text"][0]["ttt+so+r8"]["acc_shift"]
    # pooled per-input L_int drop vs correctness, brute-force ranks
    rows = [cells["text"][s]["ttt+so"][f"examples_{t}"] for s in cfg.seeds for t in ("id", "shift")]
    drop = [v for r in rows for v in r["lint_drop"]]
    correct = [v for r in rows for v in r["correct"]]
    rho = out["ttt+so"]["spearman_drop_correct"]["estimate"]
    assert rho == pytest.approx(brute_force_spearman(drop, correct), abs=1e-12)
    assert out["fixed"]["spearman_drop_correct"] is None  # nothing adapted
    gain = [v for r in rows for v in r["dlogp"]]
    rho = out["ttt+so"]["spearman_drop_dlogp"]["estimate"]
    assert rho == pytest.approx(brute_force_spearman(drop, gain), abs=1e-12)
    assert out["fixed"]["spearman_drop_dlogp"] is None
    assert out["ttt+so+sgd"]["spearman_drop_dlogp"] is None
    diffs = [
        cells["text"][s]["attd+so"]["acc_shift"] - cells["text"][s]["attd"]["acc_shift"]
        for s in cfg.seeds
    ]
    ci = attd_lra.paired_difference(out, "attd+so", "attd")
    half = scipy.stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    assert ci.mean == pytest.approx(np.mean(diffs)) and ci.half_width == pytest.approx(half)
    one = attd_lra.paired_difference(out, "ttt+so+r8", "fixed")  # only seed 0 is shared
    fixed0 = cells["text"][0]["fixed"]["acc_shift"]
    assert one.mean == pytest.approx(cells["text"][0]["ttt+so+r8"]["acc_shift"] - fixed0)
    assert not np.isfinite(one.half_width)


def test_joint_config_has_its_control_and_its_conclusions_match_a_loop():
    """``:joint`` pairs each adapting ``+j`` method with the jointly trained fixed model; the
    reading's paired differences are those of a loop over seeds."""
    cfg = attd_config.get_config("joint")
    attd_lra.validate(cfg)
    assert (cfg.section, cfg.figure_prefix) == ("attd_lra_joint", "attd_joint")
    assert "fixed+j" in cfg.methods and cfg.attd.joint_weight > 0
    masked = attd_config.get_config("joint_masked")
    attd_lra.validate(masked)
    assert masked.attd.objective == "masked" and cfg.attd.objective == "next_token"
    assert masked.section == "attd_lra_joint_masked" and masked.methods == cfg.methods
    assert {attd_lra.parse_method(n).joint for n in cfg.methods} == {None, True}
    cfg.eval.bootstrap = 50
    rng = np.random.default_rng(5)
    cells = {
        "text": {s: {m: _fake_cell(rng, m, cfg.attd.k_max) for m in cfg.methods} for s in (0, 1, 2)}
    }
    out = attd_lra.aggregate(cfg, cells, {"text": {}})
    lines = readings._joint_conclusions(out)
    acc = lambda m, s: cells["text"][s][m]["acc_shift"]
    want = np.mean([acc("ttt+so+j", s) - acc("fixed+j", s) for s in (0, 1, 2)])
    line = next(x for x in lines if x.startswith("- text, full TTT (K=K_max), 2nd order, joint"))
    assert f"{want:+.3f}" in line
    want = np.mean([acc("ttt+j", s) - acc("ttt", s) for s in (0, 1, 2)])
    line = next(x for x in lines if x.startswith("- text, full TTT (K=K_max): shifted"))
    assert f"{want:+.3f}" in line


def test_pretraining_killed_mid_cell_resumes_bit_identically(tmp_path):
    cfg = attd_config.get_config("tiny")  # 20 steps, a checkpoint every 10
    task, _ = attd_lra.load_task(cfg, "listops", 0)
    mcfg = attd_lra.model_config(cfg, task.vocab_size, task.num_classes)
    apply, theta = init_mamba(mcfg, seed=0)
    step = attd_lra.make_pretrain_step(apply, cfg.pretrain.lr, cfg.pretrain.lm_weight)
    whole, info = attd_lra.pretrain(cfg, theta, task.train, 0, step, str(tmp_path / "a"))

    class DiesAtStep15(np.ndarray):
        calls = 0

        def __getitem__(self, index):
            DiesAtStep15.calls += 1
            if DiesAtStep15.calls == 16:
                raise KeyboardInterrupt("killed")
            return np.asarray(self)[index]

    dying = task.train._replace(tokens=task.train.tokens.view(DiesAtStep15))
    with pytest.raises(KeyboardInterrupt):
        attd_lra.pretrain(cfg, theta, dying, 0, step, str(tmp_path / "b"))
    assert (tmp_path / "b" / "ckpt" / "10").is_dir()
    resumed, info_b = attd_lra.pretrain(cfg, theta, task.train, 0, step, str(tmp_path / "b"))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (info_b["task_loss"], info_b["lm_loss"]) == (info["task_loss"], info["lm_loss"])


def test_dynamics_task_splits_hold_out_the_test_bands_from_outer_training():
    """Time warp: pretraining and the in-distribution test at factor 1, the outer split on
    factor 1 and milder warps, the shifted test on bands the outer split never shows."""
    cfg = dynamics_config.get_config("tiny")
    attd_lra.validate(cfg)
    attd_lra.validate(dynamics_config.get_config())
    task, outer = attd_lra.load_task(cfg, "timewarp", 0)
    d = cfg.data.timewarp
    assert np.all(task.train.difficulty == 0) and np.all(task.test_id.difficulty == 0)
    assert len(outer.labels) == d.num_outer and task.train.tokens.shape == (d.num_train, 24)
    outer_max = max(abs(np.log(b)) for band in d.outer_bands for b in band)
    test_min = min(abs(np.log(b)) for band in d.shift_bands for b in band)
    assert outer.difficulty.max() <= outer_max + 1e-9 and outer_max <= test_min + 1e-9
    assert task.test_shift.difficulty.min() >= test_min - 1e-9
    assert 0 < np.mean(outer.difficulty == 0) < 1  # factor 1 and shifted inputs


def test_shift_bands_merge_mirror_images_and_the_mixture_weights_the_splits():
    cfg = dynamics_config.get_config()
    bands = shift_bands(cfg.data.timewarp)
    np.testing.assert_allclose(np.exp(bands), [[2.0, 2.5], [2.5, 3.0]], rtol=1e-5)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(3):
        d = np.abs(np.log(rng.choice([0.35, 1 / 2.2, 2.2, 2.8], 40)))
        correct = rng.integers(0, 2, 40)
        rows.append({
            "acc_id": rng.uniform(), "acc_shift": correct.mean(), "mean_k_id": rng.uniform(),
            "mean_k_shift": rng.uniform(),
            "examples_shift": {"difficulty": d.tolist(), "correct": correct.tolist()},
        })  # fmt: skip
    out = mixture_and_bands(rows, 0.7, cfg.data.timewarp)
    want = [0.7 * r["acc_id"] + 0.3 * r["acc_shift"] for r in rows]
    assert out["acc_mix"]["mean"] == pytest.approx(np.mean(want))
    for label, lo, hi in (("2.00-2.50", 2.0, 2.5), ("2.50-3.00", 2.5, 3.0)):
        per_seed = []
        for r in rows:
            f = np.exp(np.asarray(r["examples_shift"]["difficulty"]))
            inside = (f > lo - 1e-6) & (f < hi + 1e-6)
            per_seed.append(np.asarray(r["examples_shift"]["correct"])[inside].mean())
        assert out["band_acc"][label]["mean"] == pytest.approx(np.mean(per_seed))


def test_dynamics_methods_parse_and_freezing_theta_keeps_it():
    spec = attd_lra.parse_method("ttt+k2")
    assert (spec.base, spec.steps) == ("ttt", 2)
    assert attd_lra.parse_method("ttt+dt_bias").adapter == "dt_bias"
    assert attd_lra.method_label("ttt+k3") == "uniform TTT (K=3)"
    assert set(methods.ADAPTER_LABELS) == set(ADAPTERS)
    with pytest.raises(ValueError, match="only ttt"):
        attd_lra.parse_method("attd+k2")
    with pytest.raises(ValueError, match="low-rank"):
        attd_lra.parse_method("ttt+a_log+r4")
    cfg = dynamics_config.get_config("tiny")
    params = attd_lra.ATTDParams({"w": jnp.ones(3)}, jnp.ones(2), {"thresholds": jnp.arange(2.0)})
    opt = training.outer_optimizer(cfg)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert np.all(np.asarray(updates.theta["w"]) == 0.0)
    assert np.all(np.asarray(updates.psi) != 0.0)


DYN_FIXTURE = FIXTURE.parents[1] / "attd_dynamics" / "results.json"


def test_each_dynamics_variant_has_a_section_title_naming_its_task():
    """The time-warp, oscillator and recorded sections are told apart by their titles."""
    titles = {
        v: attd_report.shift_title(dynamics_config.get_config(v))
        for v in (None, "oscillator", "recorded")
    }
    assert len(set(titles.values())) == 3
    assert "time-warped" in titles[None] and "oscillators" in titles["oscillator"]
    assert "recordings (UCR GunPoint)" in titles["recorded"]


def test_dynamics_report_of_a_frozen_tiny_run_reads_the_per_input_results(tmp_path, monkeypatch):
    """The attd_dynamics section renders from results.json alone; every mixture and band
    accuracy in its table is recomputed here from the per-input records."""
    monkeypatch.setattr(report, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    results = json.loads(DYN_FIXTURE.read_text())
    cfg = dynamics_config.get_config("tiny")
    attd_lra.write_report(results, cfg, str(tmp_path / "w"))
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- attd_dynamics:start -->" in text and "time-warped periodic waveforms" in text
    n_id = cfg.data.timewarp.num_test
    for name, e in results["tasks"]["timewarp"].items():
        ex = {k: np.asarray(v) for k, v in e["examples"].items()}
        acc_id, shift = ex["correct"][:n_id].mean(), ex["correct"][n_id:]
        mix = 0.7 * acc_id + 0.3 * shift.mean()
        bands = []
        for lo, hi in ((2.0, 2.5), (2.5, 3.0)):
            f = np.exp(ex["difficulty"][n_id:])
            bands.append(shift[(f > lo - 1e-6) & (f < hi + 1e-6)].mean())
        row = f"| {attd_lra.method_label(name)} | {mix:.3f} | "
        assert row in text, row
        line = next(x for x in text.splitlines() if x.startswith(row))
        assert f"| {bands[0]:.3f} | {bands[1]:.3f} | " in line


def test_demo_row_reads_the_mixture_accuracies_and_attds_mean_k(tmp_path, monkeypatch):
    """The `make demo` row on a frozen time-warp run: before/after are the fixed model's and
    ATTD's accuracy on the 70/30 mixture and the method names ATTD's mean K on it, each
    recomputed here from the per-input records."""
    results = json.loads(DYN_FIXTURE.read_text())
    tiny = dynamics_config.get_config("tiny")
    seen = {}

    def fake_run(cfg, workdir):
        seen["cfg"], seen["workdir"] = cfg, workdir
        return results

    monkeypatch.setattr(attd_lra.main, "run", fake_run)
    monkeypatch.setattr(dynamics_config, "get_config", lambda arg=None: tiny)
    [(system, method, metric, before, after, seconds)] = attd_lra.demo_rows(str(tmp_path))
    assert seen["workdir"] == str(tmp_path / "attd_dynamics") and seconds >= 0
    n_id = tiny.data.timewarp.num_test

    def mixture(name, key):
        v = np.asarray(results["tasks"]["timewarp"][name]["examples"][key], float)
        return 0.7 * v[:n_id].mean() + 0.3 * v[n_id:].mean()

    assert system == "ATTD on Mamba (time warp)"
    assert method == f"ATTD, mean K {mixture('attd', 'k'):.2f} of {tiny.attd.k_max}"
    assert metric == "accuracy, 70% in-dist. + 30% warped, K=0 -> adaptive K"
    assert before == pytest.approx(mixture("fixed", "correct"))
    assert after == pytest.approx(mixture("attd", "correct"))


def test_demo_config_is_the_time_warp_task_with_the_fixed_model_and_attd():
    cfg = dynamics_config.get_config("demo")
    assert cfg.tasks == ("timewarp",) and cfg.methods == ("fixed", "attd")
    assert cfg.seeds == (0,) and not cfg.attd.inner_lr_grid  # no rate search
    assert cfg.eval.timing_repeats == 0  # its row shows no wall time per example: none taken
    attd_lra.validate(cfg)
    cfg.eval.timing_repeats = -1
    with pytest.raises(ValueError, match=r"eval.timing_repeats >= 0 \(0: no timing\)"):
        attd_lra.validate(cfg)


def _entry(seeds_acc, band, k_mix=1.0):
    """A results entry with per-seed accuracies (mix, id, shift) and one band."""
    m, i, s = (np.asarray(seeds_acc[k], float) for k in ("mix", "id", "shift"))
    ci = lambda v: {"mean": float(np.mean(v)), "ci": float(scipy.stats.sem(v) * 4.303)}
    return {
        "seeds": [0, 1, 2],
        "acc_mix_seeds": m.tolist(), "acc_id_seeds": i.tolist(), "acc_shift_seeds": s.tolist(),
        "acc_mix": ci(m), "acc_id": ci(i), "acc_shift": ci(s),
        "band_acc": {"2.00-3.00": ci(band)}, "band_acc_seeds": {"2.00-3.00": list(band)},
        "mean_k_mix": {"mean": k_mix, "ci": 0.0},
        "spearman_k_difficulty": {"estimate": 0.7, "low": 0.5, "high": 0.8},
    }  # fmt: skip


def test_dynamics_verdicts_follow_the_paired_differences():
    from experiments.attd_lra import dynamics

    fixed = _entry({"mix": [0.80, 0.82, 0.81], "id": [0.9, 0.9, 0.9], "shift": [0.5, 0.6, 0.55]},
                   [0.4, 0.5, 0.45], 0.0)  # fmt: skip
    t = {
        "fixed": fixed,
        "ttt+k1": _entry({"mix": [0.83, 0.85, 0.84], "id": [0.9] * 3, "shift": [0.6, 0.7, 0.66]},
                         [0.5, 0.6, 0.55], 1.0),
        "ttt": _entry({"mix": [0.85, 0.86, 0.86], "id": [0.9] * 3, "shift": [0.7, 0.75, 0.7]},
                      [0.45, 0.56, 0.5], 2.0),  # the band loses from K = 1 to 2
        "attd": _entry({"mix": [0.85, 0.86, 0.85], "id": [0.89, 0.9, 0.9],
                        "shift": [0.7, 0.74, 0.7]}, [0.6, 0.7, 0.6], 0.9),
        "ttt+d_skip": _entry({"mix": [0.8] * 3, "id": [0.9] * 3, "shift": [0.55, 0.6, 0.6]},
                             [0.45, 0.5, 0.5], 2.0),
    }  # fmt: skip
    lines = dynamics.verdicts({"k_max": 2, "tasks": {"timewarp": t}})
    gain = stats_ci([0.2, 0.15, 0.15])
    assert f"{gain.mean:+.3f} [{gain.low:+.3f}, {gain.high:+.3f}] (met" in lines[0]
    loss = stats_ci([-0.05, -0.04, -0.05])  # ttt+k1 -> ttt on the band, per seed
    assert lines.pop(1).endswith(
        f"the largest paired loss is {loss.mean:+.3f} [{loss.low:+.3f}, {loss.high:+.3f}] "
        "(band ×2.00-3.00, K = 1 → 2): an overshoot (its interval is below 0)."
    )
    worst = min(np.mean(np.subtract(t["attd"][k], fixed[k])) for k in
                ("acc_id_seeds", "acc_shift_seeds"))  # fmt: skip
    assert f"is {max(-worst, 0):.3f} (met" in lines[1]  # 0.003 <= 0.005
    assert "best uniform K on the mixture is K = 2" in lines[2]
    assert "at 45% of its inner steps (met" in lines[2]  # 0.9 / 2 and within the interval
    assert "Spearman(K, shift magnitude) of ATTD +0.70 [+0.50, +0.80] (met" in lines[3]
    d = stats_ci([0.15, 0.15, 0.1])
    assert lines[4].endswith(
        f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] (the dynamics adapter is better)."
    )


def stats_ci(values):
    from metattt import stats

    return stats.mean_ci(values)


def test_recorded_task_without_its_files_is_refused_before_any_work(tmp_path):
    cfg = dynamics_config.get_config("recorded")
    cfg.data.recorded.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no file {tmp_path}/GunPoint/GunPoint_TRAIN.ts"):
        attd_lra.validate(cfg)
