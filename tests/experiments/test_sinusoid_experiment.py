"""The sinusoid report on a frozen run, its curve statistics, the entry point's error messages,
and the tiny run end to end (with a SIGKILL resume)."""

import copy
import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.stats

from configs import sinusoid as sinusoid_config
from experiments import report, sinusoid
from tests.experiments.compare import assert_close_tree
from tests.experiments.entry import run_cli
from tests.experiments.killing import kill_after

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# results.json of `python -m experiments.run --config configs/sinusoid.py:tiny
# --config.seeds='(0,1)' --config.eval.tune_pretrained_lrs='(0.005,0.02)'`: two seeds, and the
# pretrained baseline also fine-tuned at its validated rate.
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sinusoid" / "results.json"


def _fixture_config():
    cfg = sinusoid_config.get_config("tiny")
    cfg.seeds = (0, 1)
    cfg.eval.tune_pretrained_lrs = (0.005, 0.02)
    return cfg


@pytest.fixture
def frozen():
    return json.loads(FIXTURE.read_text())


def _row(text, first):
    line = next(x for x in text.splitlines() if x.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_step_renders_the_frozen_run(frozen, tmp_path, monkeypatch):
    """Each cell's mean is the mean of the per-seed means (equal task counts per seed), with
    the kept CI; the setup lines are the config's; the kept results render the same section."""
    from experiments import run

    monkeypatch.setattr(report, "BENCHMARKS", tmp_path / "repo" / "BENCHMARKS.md")
    cfg = _fixture_config()
    workdir = tmp_path / "w"
    workdir.mkdir()
    run_info = {"config": cfg.to_dict(), "timestamp_utc": "2026-02-03T04:05:06+00:00"}
    (workdir / "run_info.json").write_text(json.dumps(run_info))
    (workdir / "results.json").write_text(json.dumps(frozen))
    assert run.report_workdir(str(workdir)) == "sinusoid"
    text = (tmp_path / "repo" / "BENCHMARKS.md").read_text()
    assert list(frozen) == ["maml", "pretrained", "pretrained_tuned_lr"]
    assert "| method | MSE after 0 steps | MSE after 1 step | MSE after 10 steps |" in text
    for method, r in frozen.items():
        means = np.mean(r["seed_means"], axis=0)  # (steps + 1,), from the per-seed numbers
        want = [f"{means[k]:.3f} ± {r['curve_ci'][k]:.3f}" for k in cfg.eval.report_steps]
        assert _row(text, method)[1:] == want, method
    tasks = len(cfg.seeds) * cfg.eval.num_tasks
    assert f"- Test: {tasks} new tasks in all ({cfg.eval.num_tasks} per seed)" in text
    assert "- Date: 2026-02-03;" in text and "MLP 1-40-40-1 (ReLU), K=10 support" in text
    times = ", ".join(f"{m} {sum(r['train_seconds']) / 2:.0f} s" for m, r in frozen.items())
    assert f"- Mean training time per seed: {times}." in text
    assert (tmp_path / "repo" / "docs" / "figures" / "sinusoid_curves.png").stat().st_size > 1000
    kept = json.loads((tmp_path / "repo" / "docs" / "results" / "sinusoid.json").read_text())
    assert kept == frozen
    (tmp_path / "repo" / "BENCHMARKS.md").unlink()
    sinusoid.write_report(kept, cfg, str(workdir))
    again = (tmp_path / "repo" / "BENCHMARKS.md").read_text()
    assert again.split("- Command:")[1] == text.split("- Command:")[1]  # all but the date


def test_the_frozen_run_is_consistent(frozen):
    """The fixture's fields agree with each other: per-seed lists, task counts, tuned rates."""
    cfg = _fixture_config()
    for r in frozen.values():
        assert np.shape(r["seed_means"]) == (2, cfg.eval.max_steps + 1)
        assert r["num_test_tasks"] == 2 * cfg.eval.num_tasks and len(r["train_seconds"]) == 2
    assert set(frozen["pretrained_tuned_lr"]["lrs"]) <= set(cfg.eval.tune_pretrained_lrs)
    assert frozen["pretrained_tuned_lr"]["train_seconds"] == frozen["pretrained"]["train_seconds"]


def test_reading_states_the_ratio_first_orders_cost_and_meta_sgds_overshoot(frozen):
    """The reading's numbers are the curves' (recomputed here); the reproduction verdict
    follows the 3x criterion both ways; Meta-SGD's rise after its trained step is named."""
    from experiments.sinusoid.report import reading

    cfg = _fixture_config()
    results = copy.deepcopy(frozen)
    maml, base = results["maml"], results["pretrained"]
    results["fomaml"] = copy.deepcopy(maml)
    results["fomaml"]["seed_means"] = [[5.5] + row[1:] for row in maml["seed_means"]]
    results["meta_sgd"] = copy.deepcopy(maml)
    results["meta_sgd"]["curve_mean"][2:] = [4.5] + [float("nan")] * 8
    lines = reading(results, cfg)
    ratio = np.mean(base["seed_means"], axis=0)[1] / np.mean(maml["seed_means"], axis=0)[1]
    verdict = "met" if ratio >= 3 else "not met"
    assert f": {ratio:.1f}x lower ({verdict}: the criterion is at least 3x;" in lines[0]
    assert f"MAML {maml['curve_mean'][10]:.3f} ± {maml['curve_ci'][10]:.3f}" in lines[0]
    assert "per-seed means 5.5, 5.5)" in lines[1]
    assert "one step more raises the error to 4.5 and it diverges by step 10" in lines[2]
    tuned = results["pretrained_tuned_lr"]
    assert f"tasks: {', '.join(f'{lr:g}' for lr in tuned['lrs'])}): after one step" in lines[3]
    base["curve_mean"][1] = 2.5 * maml["curve_mean"][1]
    assert "2.5x lower (not met" in reading(results, cfg)[0]
    results["meta_sgd"]["curve_mean"][2:] = list(np.linspace(0.1, 0.01, 9))
    assert reading(results, cfg)[2].endswith("further steps keep lowering it.")


def test_table_reports_a_diverged_curve_as_such(frozen):
    edited = copy.deepcopy(frozen)
    edited["maml"]["curve_mean"][1] = float("nan")
    edited["pretrained"]["curve_mean"][10] = 2e3
    text = sinusoid.table(edited, (0, 1, 10))
    assert _row(text, "maml")[2] == "diverges" and _row(text, "maml")[3] != "diverges"
    assert _row(text, "pretrained")[1:] == [
        f"{frozen['pretrained']['curve_mean'][0]:.3f} ± {frozen['pretrained']['curve_ci'][0]:.3f}",
        f"{frozen['pretrained']['curve_mean'][1]:.3f} ± {frozen['pretrained']['curve_ci'][1]:.3f}",
        "diverges",
    ]


def test_summarize_curves_against_a_loop_and_scipy():
    rng = np.random.default_rng(0)
    curves = [rng.gamma(2.0, size=(7, 4)), rng.gamma(2.0, size=(5, 4))]  # unequal task counts
    got = sinusoid.summarize_curves(curves, [3.0, 4.0])
    rows = [row for c in curves for row in c.tolist()]
    for k in range(4):
        column = [row[k] for row in rows]
        n = len(column)
        mean = sum(column) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in column) / (n - 1))
        assert got["curve_mean"][k] == pytest.approx(mean, rel=1e-12)
        half = scipy.stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        assert got["curve_ci"][k] == pytest.approx(half, rel=1e-9)
        for s, c in enumerate(curves):
            assert got["seed_means"][s][k] == pytest.approx(sum(c[:, k]) / len(c), rel=1e-12)
    assert got["num_test_tasks"] == 12 and got["train_seconds"] == [3.0, 4.0]


def test_demo_rows_are_the_curve_before_and_after_one_step(frozen, monkeypatch, tmp_path):
    """Each method runs alone in its own workdir; its row is its mean MSE at steps 0 and 1."""
    seen = []

    def fake_run(cfg, workdir):
        seen.append((tuple(cfg.methods), os.path.basename(workdir)))
        return {m: frozen[m if m in frozen else "maml"] for m in cfg.methods}

    monkeypatch.setattr(sinusoid.main, "run", fake_run)
    rows = sinusoid.demo_rows(str(tmp_path))
    methods = sinusoid_config.get_config("demo").methods
    assert seen == [((m,), f"sinusoid_{m}") for m in methods]
    for (system, method, metric, before, after, seconds), m in zip(rows, methods, strict=True):
        means = np.mean(frozen[m if m in frozen else "maml"]["seed_means"], axis=0)
        assert (system, method, metric) == (
            "sinusoid (MAML 2017)",
            m,
            "query MSE, K=10, 0 -> 1 step",
        )
        assert before == pytest.approx(means[0], rel=1e-6)
        assert after == pytest.approx(means[1], rel=1e-6) and seconds >= 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.train.num_stepz=5"], "unknown config key 'num_stepz'"),
        (["--config.train.num_steps=abc"], "invalid literal for int()"),
        (["--config.methods=('mamll',)"], "unknown sinusoid method 'mamll'"),
        (  # refused before jax.distributed.initialize would wait for other processes
            ["--config.distributed.enabled=True", "--config.distributed.initialization_timeout=0"],
            "config.distributed.initialization_timeout must be a positive int (seconds), got 0",
        ),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, args, message):
    proc = run_cli("--config", "configs/sinusoid.py:tiny", *args, "--workdir", str(tmp_path))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_missing_config_file_is_a_one_line_error(tmp_path):
    proc = run_cli("--config", "configs/no_such.py", "--workdir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config file not found: configs/no_such.py"


def test_a_second_launch_on_a_busy_workdir_is_refused_before_it_writes(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "run.lock").write_text(f"{socket.gethostname()} {holder.pid}")
        proc = run_cli("--config", "configs/sinusoid.py:tiny", "--workdir", str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"is in use by process {holder.pid}" in lines[0]
    assert not (tmp_path / "run_info.json").exists()  # the busy run's record is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["owner.json", "run.lock"]


def test_distributed_initialisation_follows_the_config(monkeypatch):
    import jax

    from experiments import run

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    cfg = sinusoid_config.get_config("tiny")
    run.init_distributed(cfg)
    assert calls == []
    cfg.distributed.enabled = True
    cfg.distributed.coordinator_address = "10.0.0.1:1234"
    cfg.distributed.num_processes = 4
    cfg.distributed.process_id = 2
    run.init_distributed(cfg)
    want = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    assert calls[-1] == {**want, "initialization_timeout": 120}
    cfg = sinusoid_config.get_config("tiny")  # under SLURM: JAX detects all three
    cfg.distributed.enabled = True
    cfg.distributed.initialization_timeout = 30
    run.init_distributed(cfg)
    assert calls[-1] == {"initialization_timeout": 30}
    cfg.train.mesh_devices = 4  # the tiny meta-batch of 10 tasks cannot be split 4 ways
    with pytest.raises(ValueError, match="mesh_devices=4 must be 0 or divide train.meta_batch"):
        sinusoid.validate(cfg)


def test_an_inner_rate_above_one_is_refused():
    """The inner loop runs ``metattt.inner.sgd``, whose cheaper guard needs |lr| <= 1."""
    cfg = sinusoid_config.get_config("tiny")
    cfg.inner.lr = 1.5
    with pytest.raises(ValueError, match=r"config.inner.lr must be in \(0, 1\] \(inner SGD\)"):
        sinusoid.validate(cfg)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sinusoid")
    cfg = sinusoid_config.get_config("tiny")
    return cfg, sinusoid.run(cfg, str(workdir)), workdir


def _numbers(results):
    keys = ("curve_mean", "curve_ci", "seed_means", "num_test_tasks")
    return {m: {k: r[k] for k in keys} for m, r in results.items()}


@pytest.mark.slow
def test_tiny_config_adapted_beats_unadapted(tiny, frozen):
    cfg, results, workdir = tiny
    maml, pretrained = results["maml"]["curve_mean"], results["pretrained"]["curve_mean"]
    assert maml[1] < maml[0] and maml[10] < maml[0]  # adaptation helps the meta-learned model
    assert maml[1] < pretrained[1]  # and it beats the baseline after one step
    assert os.path.getsize(workdir / "sinusoid_curves.png") > 1000
    assert (workdir / "maml" / "seed_0" / "metrics.jsonl").read_text().count("meta_loss") >= 2
    assert json.loads((workdir / "results.json").read_text()) == results
    # The frozen fixture's seed 0 is this run (same RNG streams; another compiled program).
    for method in cfg.methods:
        assert_close_tree(
            results[method]["seed_means"][0], frozen[method]["seed_means"][0], rtol=1e-2
        )


@pytest.mark.slow
def test_the_meta_batch_sharded_over_devices_equals_the_one_device_run(tiny, tmp_path, monkeypatch):
    """``train.mesh_devices=2``: each meta-step's 10 tasks split over 2 of the 8 simulated CPU
    devices, through the same sharded step a multi-process run uses. The meta-gradient sums the
    tasks in another order, and 300 Adam steps carry that rounding forward (measured: 3e-6
    relative with 4 devices over 2 processes, 2026-12-07); the bound is 1e-4."""
    cfg, reference, _ = tiny
    cfg = copy.deepcopy(cfg)
    cfg.train.mesh_devices = 2
    meshes, make_mesh = [], jax.make_mesh
    monkeypatch.setattr(
        jax, "make_mesh", lambda *a, **k: meshes.append(make_mesh(*a, **k)) or meshes[-1]
    )
    sharded = sinusoid.run(cfg, str(tmp_path))
    assert [m.devices.size for m in meshes] == [2] * len(cfg.methods)  # each trained on 2
    for method in cfg.methods:
        for key in ("curve_mean", "curve_ci", "seed_means"):
            np.testing.assert_allclose(
                sharded[method][key], reference[method][key], rtol=1e-4, err_msg=(method, key)
            )


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_results(tiny, tmp_path, caplog):
    """SIGKILL inside MAML's meta-training after its first checkpoint (step 150 of 300); the
    restarted run takes over the dead run's lock, resumes there and ends bit-identical."""
    cfg, reference, _ = tiny
    killed = tmp_path / "killed"
    run_dir = killed / "maml" / "seed_0"
    checkpoint = run_dir / "ckpt" / str(cfg.train.checkpoint_every)
    kill_after(["--config=configs/sinusoid.py:tiny"], killed, checkpoint)
    assert (run_dir / "fit.lock").exists()  # SIGKILL: no handler ran, the lock stays behind
    with caplog.at_level("INFO"):
        resumed = sinusoid.run(cfg, str(killed))
    assert "Taking over the lock" in caplog.text
    assert f"at step {cfg.train.checkpoint_every} of {cfg.train.num_steps}" in caplog.text
    assert _numbers(resumed) == _numbers(reference)  # bit-identical: the same program resumed
