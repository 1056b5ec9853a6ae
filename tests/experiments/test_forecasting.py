"""The forecasting experiment: its report on a frozen two-seed tiny run (tables, reading, demo
rows and the BENCHMARKS.md section, checked against the run's raw per-seed numbers without
training), config checks, the memory table's rows, and one slow end-to-end tiny run whose
compiled programs two more slow tests reuse (compiling is nearly all of their time): the
no-early-target property of its online stream, and a meta-training cell killed mid-training
that resumes bit-identically to the run's own cell."""

import copy
import json
import math
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from configs import forecasting as fc
from experiments import forecasting as F
from experiments import harness, report
from experiments.forecasting import cells, main
from metattt.data import steps_to_fraction

# results.json of `python -m experiments.run --config configs/forecasting.py:tiny
# --config.seeds='(0,1)' --config.meta.methods='("fomaml","e2e_ttt")'
# --config.memory.inner_steps='(1,)'`: two seeds, so every table cell has an interval, both meta
# methods and the memory table (the tiny config leaves out E2E-TTT and the memory table).
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "forecasting" / "results.json"


@pytest.fixture
def frozen():
    return json.loads(FIXTURE.read_text())


def _config():
    """The config of the frozen run (see FIXTURE)."""
    cfg = fc.get_config("tiny")
    cfg.seeds = (0, 1)
    cfg.meta.methods = ("fomaml", "e2e_ttt")
    cfg.memory.inner_steps = (1,)
    return cfg


def _cell(values, digits=3):
    """A table cell from per-seed values: mean ± Student-t 95% half-width (a loop, scipy)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = scipy.stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _row(text, first, table="| method |"):
    """The cells of the row starting with ``first`` in the table whose header starts ``table``."""
    lines = text.split(table, 1)[1].splitlines()
    line = next(x for x in lines if x.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _steps_to_level(curve, level):
    return next((i for i, v in enumerate(curve) if v >= level), len(curve))


def test_without_an_online_comparison_the_report_leaves_out_its_table_reading_and_plot(
    frozen, tmp_path
):
    """``online.drifts = ()`` (the demo's setting) gives an empty online record: the summary
    loses exactly the online table, the reading its online line, and no online plot is drawn."""
    cfg, without = _config(), dict(frozen, online={})
    full, text = F.summary(frozen, cfg).splitlines(), F.summary(without, cfg).splitlines()
    dropped = [line for line in full if line not in text]
    assert dropped[0].startswith("**Online vs offline under drift**")
    assert dropped[1:3] == [
        "| drift | unadapted | offline | online | online - offline |",
        "|---|---|---|---|---|",
    ]
    assert [row.split(" | ")[0] for row in dropped[3:]] == [f"| {d}" for d in frozen["online"]]
    start = full.index(dropped[0]) - 1  # the blank line before the section
    assert full[:start] + full[start + 2 + len(dropped) :] == text  # and the one after its title
    online_lines = [x for x in F.reading(frozen, cfg) if x.startswith("- Online minus offline")]
    assert len(online_lines) == 1 and F.reading(without, cfg) == [
        x for x in F.reading(frozen, cfg) if x not in online_lines
    ]
    F.plot_online(without, str(tmp_path / "online.png"))
    assert not (tmp_path / "online.png").exists()


def test_summary_cells_follow_the_per_seed_curves(frozen):
    cfg = _config()
    text = F.summary(frozen, cfg)
    k, methods = cfg.meta.inner_steps, frozen["methods"]
    assert list(methods) == ["finetune", "fomaml", "e2e_ttt"]
    ft_final = [c[-1] for c in methods["finetune"]["r2_curve_per_seed"]]
    for name, r in methods.items():
        curves = r["r2_curve_per_seed"]
        assert len(curves) == 2 and all(len(c) == cfg.test.steps + 1 for c in curves)
        cells_ = _row(text, name)
        assert cells_[1:4] == [_cell([c[i] for c in curves]) for i in (0, k, -1)], name
        to_ft = [_steps_to_level(c, 0.95 * f) for c, f in zip(curves, ft_final, strict=True)]
        assert cells_[7] == _cell(to_ft, 1), name
        # The seed-mean curves the plots draw are the per-seed curves' means.
        np.testing.assert_allclose(r["r2_curve"], np.mean(curves, axis=0), rtol=1e-12)
    gaps = [c[-1] - c[0] for c in methods["finetune"]["r2_curve_per_seed"]]
    assert (
        f"per seed): {gaps[0]:.3f}, {gaps[1]:.3f} (required >= 0.1: "
        + ("holds" if min(gaps) >= 0.1 else "does NOT hold")
    ) in text
    for drift, r in frozen["online"].items():
        diff = [
            a - b for a, b in zip(r["online"]["per_seed"], r["offline"]["per_seed"], strict=True)
        ]
        assert _row(text, drift, "| drift |")[4] == _cell(diff), drift
    for name, r in frozen["meta"].items():
        assert _row(text, name, "| meta-training |")[1:3] == [
            _cell(r["query_before"]["per_seed"], 4),
            _cell(r["query_after"]["per_seed"], 4),
        ]
    memory_rows = [x for x in text.splitlines() if x.startswith("| float32 |")]
    assert len(memory_rows) == len(frozen["memory"]) == 2
    for line, mem in zip(memory_rows, frozen["memory"], strict=True):
        assert line.startswith(
            f"| float32 | {mem['inner_steps']} | {'on' if mem['remat'] else 'off'} | "
            f"{mem['temp_bytes'] / 2**20:.2f} | {mem['argument_bytes'] / 2**20:.2f} |"
        )


def test_reading_states_the_verdict_the_numbers_give(frozen):
    cfg = _config()
    lines = F.reading(frozen, cfg)
    ft = frozen["methods"]["finetune"]
    for method in cfg.meta.methods:
        r = frozen["methods"][method]
        line = next(x for x in lines if x.startswith(f"- {method}: "))
        ratio = ft["steps_to_ft95"]["mean"] / max(r["steps_to_ft95"]["mean"], 1.0)
        diff = np.mean(r["r2_final"]["per_seed"]) - np.mean(ft["r2_final"]["per_seed"])
        assert f"(ratio fine-tuning / method = {ratio:.1f})" in line
        assert f"({diff:+.3f})" in line
        holds = ratio >= 2.0 and diff >= -max(ft["r2_final"]["ci"], 0.005)
        assert line.endswith("The claim holds here.") == holds, line
    online = next(x for x in lines if x.startswith("- Online minus offline"))
    for drift, r in frozen["online"].items():
        diff = np.mean(r["online"]["per_seed"]) - np.mean(r["offline"]["per_seed"])
        assert f"{drift}: {diff:+.3f}" in online


@pytest.mark.parametrize(
    "steps, final_shift, verdict",
    [
        (1.0, 0.0, "The claim holds here."),
        (None, 0.0, "fewer than 2x fewer steps"),
        (1.0, -0.2, "lower final R²"),
    ],
)
def test_reading_flips_with_speed_and_final_fit(frozen, steps, final_shift, verdict):
    """Edited numbers: 2x faster at equal final R² holds; slower or worse does not."""
    cfg = _config()
    edited = copy.deepcopy(frozen)
    ft = edited["methods"]["finetune"]
    ft["steps_to_ft95"]["mean"] = 4.0
    ft["r2_final"]["ci"] = 0.01  # "equal" final R²: within max(CI, 0.005) of fine-tuning's
    r = edited["methods"]["fomaml"]
    r["steps_to_ft95"]["mean"] = steps if steps is not None else 3.0
    r["r2_final"]["per_seed"] = [v + final_shift for v in ft["r2_final"]["per_seed"]]
    line = next(x for x in F.reading(edited, cfg) if x.startswith("- fomaml: "))
    assert verdict in line


def test_report_step_renders_the_frozen_run(frozen, tmp_path, monkeypatch):
    from experiments import run

    monkeypatch.setattr(report, "BENCHMARKS", tmp_path / "repo" / "BENCHMARKS.md")
    workdir = tmp_path / "w"
    workdir.mkdir()
    run_info = {"config": _config().to_dict(), "timestamp_utc": "2026-02-03T04:05:06+00:00"}
    (workdir / "run_info.json").write_text(json.dumps(run_info))
    (workdir / "results.json").write_text(json.dumps(frozen))
    assert run.report_workdir(str(workdir)) == "forecasting"
    text = (tmp_path / "repo" / "BENCHMARKS.md").read_text()
    assert "<!-- forecasting:start -->" in text and "- Date: 2026-02-03;" in text
    assert F.summary(frozen, _config()) in text
    assert (
        text.split("<!-- forecasting:end -->")[0]
        .rstrip()
        .endswith("\n".join(F.reading(frozen, _config())))
    )
    loss = frozen["pretrain"]["loss_first"]["per_seed"]
    assert f"loss {_cell(loss)} -> " in text
    # The kept results drop only what is not rendered: the section renders again from them.
    kept = json.loads((tmp_path / "repo" / "docs" / "results" / "forecasting.json").read_text())
    assert kept == F.kept_results(frozen) and "r2_curve_per_seed" not in kept["methods"]["fomaml"]
    (tmp_path / "repo" / "BENCHMARKS.md").unlink()
    F.write_report(kept, _config(), str(workdir))
    again = (tmp_path / "repo" / "BENCHMARKS.md").read_text()
    assert again.split("- Command:")[1] == text.split("- Command:")[1]
    for name in ("forecasting_curves.png", "forecasting_online.png"):
        assert (tmp_path / "repo" / "docs" / "figures" / name).stat().st_size > 1000


def test_demo_rows_are_the_seed_means_before_and_after_k_steps(frozen, monkeypatch, tmp_path):
    monkeypatch.setattr(main, "run", lambda cfg, workdir: frozen)
    rows = F.demo_rows(str(tmp_path))
    k = fc.get_config("tiny").meta.inner_steps
    assert [r[1] for r in rows] == list(frozen["methods"])
    for (system, _, metric, before, after, seconds), r in zip(
        rows, frozen["methods"].values(), strict=True
    ):
        curves = r["r2_curve_per_seed"]
        assert (system, metric) == ("forecasting (POCO-style)", f"held-out R², 0 -> {k} steps")
        assert before == pytest.approx(np.mean([c[0] for c in curves]), rel=1e-12)
        assert after == pytest.approx(np.mean([c[k] for c in curves]), rel=1e-12)
        assert seconds >= 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run, shared by the end-to-end and resume tests, with the programs it compiled:
    the resume test reruns one of its cells with the very same compiled programs."""
    cfg = fc.get_config("tiny")
    workdir = tmp_path_factory.mktemp("forecasting")
    built = []

    def recorded(cfg):
        built.append(F.Programs(cfg))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(main, "Programs", recorded)
        results = F.run(cfg, str(workdir))
    return types.SimpleNamespace(cfg=cfg, workdir=workdir, results=results, programs=built[0])


@pytest.mark.slow
def test_online_never_sees_a_target_early(tiny_run):
    """Changing the recording at time tau changes no prediction whose context ends before tau,
    although the stream does adapt (later predictions differ from the frozen model's). With
    the tiny run's programs, on a stream of the online cell's shape (the query half): the
    cell compiled them."""
    cfg, programs = tiny_run.cfg, tiny_run.programs
    params = programs.init_params(3)
    rec = F.recordings(cfg, 0, test=True)[0]
    c, p = cfg.model.context, cfg.model.horizon
    start = int(cfg.data.num_steps * cfg.data.support_fraction)
    preds, windows = F.stream_predictions(programs, params, rec, cfg.adapt, delay=p, start=start)
    frozen = F.frozen_predictions(programs, params, windows)
    # No target has arrived yet, so the stream predicts with the initial parameters. The stream
    # and the frozen forward are two compiled programs whose fusions (and so roundings) differ
    # by CPU, so they agree to float32 tolerance, not bit for bit (seen: 3.6e-7 on an AMD EPYC).
    np.testing.assert_allclose(preds[:p], frozen[:p], rtol=1e-5, atol=1e-5)
    assert not np.allclose(preds[p + 2 :], frozen[p + 2 :])  # then it adapts
    tau = start + c - 1 + 12  # the last context step of window 12
    data = rec.data.copy()
    data[rec.mask, tau] += 5.0
    perturbed, _ = F.stream_predictions(
        programs, params, rec._replace(data=data), cfg.adapt, delay=p, start=start
    )
    ends = windows.start + c - 1
    np.testing.assert_array_equal(perturbed[ends < tau], preds[ends < tau])
    assert not np.allclose(perturbed[ends == tau], preds[ends == tau])
    with pytest.raises(ValueError, match="before its last step is observed"):
        F.stream_predictions(programs, params, rec, cfg.adapt, delay=p - 1, start=start)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("meta.methods", ("maml2",), "unknown meta method 'maml2'"),
        ("adapt", "everything", "unknown adapt set 'everything'"),
        ("meta.micro_batches", 3, "divisible by meta.micro_batches"),
        ("mesh_devices", 2, "mesh_devices=2 must be 0 or divide meta.tasks_per_step/meta.micro"),
        ("model.max_units", 10, "model.max_units >= "),
        ("data.num_steps", 12, "leaves no support or query window"),
        ("online.method", "maml", "online.method 'maml'"),
        ("meta.dtype", "int8", "floating dtype"),
        ("model.num_heads", 3, "num_heads \\(3\\) must divide dim"),
        ("pretrain.steps", 120, "pretrain.steps must be 1..50 or a multiple of 50"),
        ("meta.checkpoint_every", 0, "meta.checkpoint_every must be a positive int"),
    ],
)
def test_bad_config_values_are_rejected(key, value, message):
    cfg = fc.get_config("tiny")
    *sections, field = key.split(".")
    node = cfg
    for s in sections:
        node = node[s]
    node[field] = value
    with pytest.raises(ValueError, match=message):
        F.validate(cfg)


def test_unknown_variant_and_default_config_validate():
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        fc.get_config("huge")
    F.validate(fc.get_config())
    F.validate(fc.get_config("gpu"))


def test_memory_rows_measure_each_compiled_meta_gradient(monkeypatch):
    """One row per (dtype, K, remat), in that order, from XLA's memory analysis of the compiled
    meta-gradient of E2E-TTT's meta-loss on one task micro-batch: its arguments are the
    parameters and the micro-batch, its output the parameters' gradient. A cheap stand-in
    meta-loss that reads every input keeps the compilations short; the Perceiver's own
    second-order program and remat's saving are tested in tests/metattt/test_perceiver.py."""
    cfg = fc.get_config("tiny")
    cfg.memory.inner_steps = (1, 3)
    cfg.memory.dtypes = ("bfloat16",)
    programs = F.Programs(cfg)
    params = programs.init_params(0)
    built = []

    def meta_loss(method, mask, *, inner_steps, remat, dtype):
        built.append((method, inner_steps, remat, dtype))

        def loss(p, task):  # every parameter times every task leaf: the gradient reads both
            squares = [jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(task)]
            return inner_steps * sum(jnp.sum(x**2) for x in jax.tree.leaves(p)) * sum(squares), None

        return loss

    monkeypatch.setattr(programs, "meta_loss", meta_loss)
    rows = cells.memory_rows(programs, params, F.recordings(cfg, 0, test=False), cfg)
    expected = [("bfloat16", k, r) for k in (1, 3) for r in (False, True)]
    assert built == [("e2e_ttt", k, r, d) for d, k, r in expected]
    assert [(r["dtype"], r["inner_steps"], r["remat"]) for r in rows] == expected
    per = cfg.meta.tasks_per_step // cfg.meta.micro_batches
    windows = (per, cfg.meta.support_windows) + (per, cfg.meta.query_windows)
    param_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    task = F.recordings(cfg, 0, test=False)[0].task
    window_bytes = [  # bytes of one window of the support and of the query leaves
        sum(np.asarray(x).nbytes // x.shape[0] for x in jax.tree.leaves(b))
        for b in (task.support, task.query)
    ]
    key_bytes = per * jax.random.key_data(jax.random.key(0)).nbytes
    task_bytes = (
        windows[0] * windows[1] * window_bytes[0] + windows[2] * windows[3] * window_bytes[1]
    )
    for r in rows:
        assert r["argument_bytes"] == param_bytes + task_bytes + key_bytes, r
        # The output holds the gradient of every parameter (and XLA's tuple of pointers).
        assert param_bytes <= r["output_bytes"] < 2 * param_bytes and r["temp_bytes"] >= 0, r


def _restored_cells(tiny_run):
    """``(pretrained parameters, FOMAML's meta-trained ones, its info)`` of the tiny run's seed
    0, restored from its cells (no training)."""
    seed_dir = tiny_run.workdir / "seed_0"
    template = tiny_run.programs.init_params(0)

    def refuse(run_dir):
        raise AssertionError(f"the tiny run left {run_dir} incomplete")

    params, _ = harness.params_cell(seed_dir / "pretrain", template, refuse)
    meta_dir = seed_dir / f"meta_fomaml_{tiny_run.cfg.adapt}"
    return params, *harness.params_cell(meta_dir, template, refuse)


@pytest.mark.slow
def test_meta_training_killed_mid_cell_resumes_bit_identically(
    tiny_run, tmp_path, monkeypatch, caplog
):
    """Killed at step 7 of 8, after the checkpoint of step 4: the rerun resumes from step 4
    and ends with the parameters, loss curve and query loss of the tiny run's uninterrupted
    FOMAML cell, computed by the same jitted functions (the run's programs)."""
    cfg, programs = tiny_run.cfg, tiny_run.programs  # 8 meta-steps, a checkpoint every 4
    assert (cfg.meta.steps, cfg.meta.checkpoint_every) == (8, 4)
    params, whole, info = _restored_cells(tiny_run)
    sessions = F.recordings(cfg, 0, test=False)

    real = cells.sample_tasks
    calls = []

    def dies_at_step_7(key, *args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt("killed")  # as a kill would: fit saves nothing more
        return real(key, *args)

    monkeypatch.setattr(cells, "sample_tasks", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        F.meta_train(programs, "fomaml", cfg.adapt, params, sessions, 0, str(tmp_path))
    saved = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert saved == [4]  # killed inside training, after one checkpoint
    monkeypatch.setattr(cells, "sample_tasks", real)
    with caplog.at_level("INFO"):
        resumed, info_b = F.meta_train(
            programs, "fomaml", cfg.adapt, params, sessions, 0, str(tmp_path)
        )
    assert "at step 4 of 8" in caplog.text
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert info_b["curve"] == info["curve"] and len(info["curve"]) == cfg.meta.steps
    assert info_b["query_after"] == info["query_after"]


@pytest.mark.slow
def test_the_meta_training_sharded_over_devices_equals_the_one_device_training(tiny_run, tmp_path):
    """``mesh_devices=2``: FOMAML's meta-training (the run's dominant cost) with each meta-step's
    2 tasks split over 2 of the 8 simulated CPU devices, in one micro-batch (the run's 2
    micro-batches of 1 task cannot be split; the mean gradient is the same), from the tiny run's
    pretrained parameters; the reference is the tiny run's one-device cell, restored (no
    training). The gradient sums in another order and 8 Adam steps carry that rounding forward:
    every parameter within 1e-5 (measured 7.5e-8, 2026-12-07) but the attention key biases,
    whose exact gradient is zero (softmax removes them) and which Adam moves by rounding noise
    (measured up to 9e-4); so the model is also compared as a function: each step's query loss
    and the query loss after training within 1e-5 relative. The compiled sharded meta-step
    all-reduces (each device's share of the meta-gradient summed); a replicated one needs no
    collective."""
    cfg = tiny_run.cfg
    params, want, want_info = _restored_cells(tiny_run)
    sharded_cfg = copy.deepcopy(cfg)
    sharded_cfg.mesh_devices = 2
    sharded_cfg.meta.micro_batches = 1
    F.validate(sharded_cfg)
    dp = F.Programs(sharded_cfg)
    sessions = F.recordings(cfg, 0, test=False)
    got, got_info = F.meta_train(dp, "fomaml", cfg.adapt, params, sessions, 0, str(tmp_path))
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(dp.local(got)), jax.tree.leaves(want), strict=True
    ):
        assert a.sharding.device_set == {jax.devices()[0]}
        key = jax.tree_util.keystr(path)
        if not key.endswith("['key']['bias']"):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=key)
    for key in ("curve", "query_before", "query_after"):
        np.testing.assert_allclose(got_info[key], want_info[key], rtol=1e-5, err_msg=key)
    step = dp.meta_step("fomaml", cfg.adapt, params)  # the one meta_train compiled
    m = cfg.meta
    tasks = cells.stack_tasks([r.task for r in sessions])
    batch = cells.sample_tasks(
        jax.random.key(0), tasks, m.tasks_per_step, m.support_windows, m.query_windows
    )
    hlo = step.update.lower(step.init(params), batch).compile().as_text()
    assert "all-reduce" in hlo


def _finite(tree):
    return all(np.all(np.isfinite(np.asarray(x, float))) for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_tiny_run_end_to_end_and_cached_rerun(tiny_run, monkeypatch):
    cfg, workdir, results = tiny_run.cfg, tiny_run.workdir, tiny_run.results
    assert list(results["methods"]) == ["finetune", "fomaml"]
    assert _finite({k: v for k, v in results.items() if k not in ("memory", "unadapted_gap")})
    ft = results["methods"]["finetune"]
    # Fine-tuning improves the held-out fit of the freshly registered session.
    assert ft["r2_final"]["mean"] > ft["r2_0"]["mean"]
    # The per-seed statistics are those of the cached per-session curves.
    for name, r in results["methods"].items():
        sessions = json.loads((workdir / "seed_0" / f"test_{name}_{cfg.adapt}.json").read_text())[
            "sessions"
        ]
        curve = np.mean([s["r2"] for s in sessions], axis=0)
        assert r["r2_curve"] == curve.tolist() and len(curve) == cfg.test.steps + 1
        steps95 = np.mean([steps_to_fraction(s["r2"]) for s in sessions])
        assert r["steps95"]["per_seed"] == [steps95]
        assert r["seconds_per_step"]["mean"] > 0
    # The tiny meta-training lowers the post-adaptation query loss on the training sessions.
    for name in cfg.meta.methods:
        m = results["meta"][name]
        assert m["query_after"]["mean"] < m["query_before"]["mean"], name
    assert list(results["online"]) == [str(d) for d in cfg.online.drifts]
    assert results["memory"] == [] and "Compiled memory" not in F.summary(results, cfg)
    assert (workdir / "summary.md").read_text() == F.summary(results, cfg) + "\n"
    assert json.loads((workdir / "results.json").read_text())["seeds"] == [0]
    for name in ("forecasting_curves.png", "forecasting_online.png"):
        assert (workdir / name).stat().st_size > 1000

    def refuse(*args, **kwargs):
        raise AssertionError("a cached cell was recomputed")

    for name in ("pretrain", "meta_train", "adaptation_curves", "online_cell", "memory_rows"):
        monkeypatch.setattr(cells, name, refuse)
    again = F.run(cfg, str(workdir))
    for key in ("methods", "unadapted_gap", "pretrain", "meta", "online", "memory"):
        assert again[key] == results[key], key
