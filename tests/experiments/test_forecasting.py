"""The forecasting experiment end to end (tiny config), its metrics, caching, config checks,
the no-early-target property of its online stream, and its demo rows."""

import json

import jax
import numpy as np
import pytest

from configs import forecasting as fc
from experiments import forecasting as F


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = fc.get_config("tiny")
    workdir = tmp_path_factory.mktemp("forecasting")
    return cfg, workdir, F.run(cfg, str(workdir))


def _finite(tree):
    return all(np.all(np.isfinite(np.asarray(x, float))) for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_tiny_run_end_to_end(tiny_run):
    cfg, workdir, results = tiny_run
    assert list(results["methods"]) == ["finetune", "fomaml", "e2e_ttt"]
    for r in results["methods"].values():
        assert len(r["r2_curve"]) == cfg.test.steps + 1
        for key in ("r2_0", "r2_k", "r2_final", "mse_final", "poco_final", "steps95"):
            assert set(r[key]) == {"mean", "ci", "per_seed"}
        assert 0 <= r["steps95"]["mean"] <= cfg.test.steps and r["seconds_per_step"]["mean"] > 0
    assert _finite(
        {k: v for k, v in results.items() if k not in ("memory", "unadapted_gap", "seeds")}
    )
    # Fine-tuning improves the held-out fit of the freshly registered session.
    ft = results["methods"]["finetune"]
    assert ft["r2_final"]["mean"] > ft["r2_0"]["mean"]
    assert results["unadapted_gap"]["per_seed"][0] == pytest.approx(
        ft["r2_final"]["mean"] - ft["r2_0"]["mean"]
    )
    # The tiny meta-training lowers the post-adaptation query loss on the training sessions.
    for name in cfg.meta.methods:
        m = results["meta"][name]
        assert m["query_after"]["mean"] < m["query_before"]["mean"], name
    assert list(results["online"]) == [str(d) for d in cfg.online.drifts]
    assert {r["remat"] for r in results["memory"]} == {False, True}
    assert all(r["temp_bytes"] > 0 for r in results["memory"])
    text = (workdir / "summary.md").read_text()
    assert "| fomaml |" in text and "| e2e_ttt |" in text and "Data requirement" in text
    assert json.loads((workdir / "results.json").read_text())["seeds"] == [0]
    for name in ("forecasting_curves.png", "forecasting_online.png"):
        assert (workdir / name).stat().st_size > 1000


@pytest.mark.slow
def test_rerun_reuses_cached_cells(tiny_run, monkeypatch):
    cfg, workdir, results = tiny_run

    def refuse(*args, **kwargs):
        raise AssertionError("a cached cell was recomputed")

    for name in ("pretrain", "meta_train", "test_curves", "online_cell", "memory_rows"):
        monkeypatch.setattr(F, name, refuse)
    again = F.run(cfg, str(workdir))
    for name, r in results["methods"].items():
        assert again["methods"][name]["r2_curve"] == r["r2_curve"]
    assert again["online"] == results["online"] and again["memory"] == results["memory"]


def test_metrics_match_a_loop():
    rng = np.random.default_rng(0)
    w, n, c, p = 5, 4, 3, 2
    query = F.S.WindowBatch(
        context=rng.normal(size=(w, n, c)).astype(np.float32),
        target=rng.normal(size=(w, n, p)).astype(np.float32),
        mask=np.broadcast_to(np.array([True, True, False, True]), (w, n)),
        unit_ids=np.zeros((w, n), np.int32),
        session_id=np.zeros(w, np.int32),
        start=np.arange(w, dtype=np.int32),
    )
    pred = rng.normal(size=(w, n, p)).astype(np.float32)
    sse = np.asarray(F.neuron_sse(pred, query.target, query.mask))
    got = F.metrics(sse[None], F.query_stats(query))
    r2s, total, copy, count = [], 0.0, 0.0, 0
    for j in (0, 1, 3):  # the real neurons, one at a time
        y = [float(query.target[i, j, k]) for i in range(w) for k in range(p)]
        yhat = [float(pred[i, j, k]) for i in range(w) for k in range(p)]
        last = [float(query.context[i, j, -1]) for i in range(w) for _ in range(p)]
        mean = sum(y) / len(y)
        err = sum((a - b) ** 2 for a, b in zip(yhat, y, strict=True))
        r2s.append(1 - err / sum((a - mean) ** 2 for a in y))
        total += err
        copy += sum((a - b) ** 2 for a, b in zip(last, y, strict=True))
        count += len(y)
    np.testing.assert_allclose(got["mse"][0], total / count, rtol=1e-5)
    np.testing.assert_allclose(got["r2"][0], np.mean(r2s), rtol=1e-5)
    np.testing.assert_allclose(got["poco"][0], 1 - total / copy, rtol=1e-5)
    assert F.steps_to_fraction(np.array([0.1, 0.5, 0.85, 0.9, 0.9])) == 3
    assert F.steps_to_fraction(np.array([0.1, 0.5, 0.87, 0.95, 0.9])) == 2
    assert F.steps_to_fraction(np.array([0.5, 0.4, 0.3])) == 0


def test_online_never_sees_a_target_early():
    """Changing the recording at time tau changes no prediction whose context ends before tau,
    although the stream does adapt (later predictions differ from the frozen model's)."""
    cfg = fc.get_config("tiny")
    cfg.online.lr = 0.05
    programs = F.Programs(cfg)
    params = programs.init_params(3)
    rec = F.make_recordings(cfg, 0, test=True)[0]
    c, p = cfg.model.context, cfg.model.horizon
    start = 40
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


def test_demo_rows_shape(monkeypatch, tmp_path):
    agg = lambda v: {"mean": v, "ci": 0.0, "per_seed": [v]}
    fake = {
        "methods": {
            "finetune": {"r2_0": agg(0.1), "r2_k": agg(0.3)},
            "fomaml": {"r2_0": agg(0.4), "r2_k": agg(0.5)},
        }
    }
    monkeypatch.setattr(F, "run", lambda cfg, workdir: fake)
    rows = F.demo_rows(str(tmp_path))
    assert [r[1] for r in rows] == ["finetune", "fomaml"]
    assert all(len(r) == 6 and r[0] == "forecasting (POCO-style)" for r in rows)
    assert rows[1][3:5] == (0.4, 0.5) and "0 -> 2 steps" in rows[0][2]


def test_meta_training_killed_mid_cell_resumes_bit_identically(tmp_path, monkeypatch):
    cfg = fc.get_config("tiny")  # 8 meta-steps, a checkpoint every 4
    programs = F.Programs(cfg)
    sessions = F.make_recordings(cfg, 0, test=False)
    params = programs.init_params(0)
    whole, info = F.meta_train(
        programs, "fomaml", cfg.adapt, params, sessions, 0, str(tmp_path / "a")
    )

    real = F.sample_tasks
    calls = []

    def dies_at_step_6(key, *args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt("killed")  # as a kill would: no cleanup beyond finally
        return real(key, *args)

    monkeypatch.setattr(F, "sample_tasks", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        F.meta_train(programs, "fomaml", cfg.adapt, params, sessions, 0, str(tmp_path / "b"))
    monkeypatch.setattr(F, "sample_tasks", real)
    resumed, info_b = F.meta_train(
        programs, "fomaml", cfg.adapt, params, sessions, 0, str(tmp_path / "b")
    )
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert info_b["curve"] == info["curve"] and len(info["curve"]) == cfg.meta.steps
    assert info_b["query_after"] == info["query_after"]
