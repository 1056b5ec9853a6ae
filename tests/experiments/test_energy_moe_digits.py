"""The energy-aware MoE TTT experiment, digits-C task: its data, config checks and report on a
frozen tiny run without training; the tiny run end to end (slow)."""

import json
import math
import os

import jax
import numpy as np
import pytest

from configs import energy_moe_digits as digits_config
from experiments import energy_moe
from experiments.energy_moe import digits, runtime, serving
from metattt.data import digits_c
from metattt.models import moe

FIXTURE = os.path.join(
    os.path.dirname(__file__), "fixtures", "energy_moe", "digits", "results.json"
)


def _cell(workdir, name):
    return json.loads((workdir / "cells" / "seed_0" / f"{name.replace('/', '_')}.json").read_text())


def test_the_config_is_the_digits_task_of_energy_moe():
    cfg = digits_config.get_config()
    assert cfg.experiment == "energy_moe" and energy_moe.task_of(cfg) is energy_moe.TASKS["digits"]
    assert energy_moe.task_of(cfg).section == "energy_moe_digits"
    energy_moe.validate(digits_config.get_config("demo"))
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        digits_config.get_config("huge")


def test_tokens_quantise_pixels_row_major():
    rng = np.random.default_rng(0)
    images = rng.uniform(-0.1, 1.1, size=(5, 8, 8))
    out = digits.tokens(images)
    assert out.shape == (5, 64) and out.dtype == np.int32
    for n in range(5):
        for r in range(8):
            for c in range(8):
                expected = round(min(max(images[n, r, c], 0.0), 1.0) * 16)
                assert out[n, 8 * r + c] == expected
    # the clean digits are integers 0..16 scaled by 1/16: tokens give them back exactly
    from sklearn.datasets import load_digits

    raw = load_digits().images[:20]
    assert np.array_equal(digits.tokens(raw / 16.0), raw.reshape(20, 64).astype(np.int32))


def test_schedule_partitions_the_stream_over_every_pair():
    cfg = digits_config.get_config()
    segments = digits.schedule(cfg)
    pairs = {(c, s) for _, _, c, s in segments}
    assert pairs == {(c, s) for c in cfg.data.corruptions for s in cfg.data.severities}
    covered = [t for start, end, _, _ in segments for t in range(start, end)]
    assert covered == list(range(cfg.data.stream_batches))


def test_shifted_stream_is_the_corrupted_test_split():
    cfg = digits_config.get_config("tiny")
    _, _, x_te, y_te = digits_c.load_digits_split(0, cfg.data.test_fraction)
    stream = digits.shifted_stream(cfg, x_te, y_te, 3)
    n = cfg.data.stream_batches * cfg.data.batch
    assert stream.inputs.shape == (n, 64) and stream.targets.shape == (n,)
    assert stream.inputs.min() >= 0 and stream.inputs.max() <= 16
    # the first batch is gaussian_noise at severity 5 of some test images: not clean tokens
    clean = {tuple(t) for t in digits.tokens(x_te)}
    assert not any(tuple(t) in clean for t in stream.inputs[: cfg.data.batch])
    again = digits.shifted_stream(cfg, x_te, y_te, 3)
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
        ("int8.lambdas", (-1.0,), "int8.lambdas must be > 0"),
        ("train.num_steps", 30, "multiple of train.steps_per_call"),
        ("train.mesh_devices", 5, "train.mesh_devices=5 must be 0 or divide train.batch=16"),
        ("expert.methods", ("energy_ttt/0.3:masked",), "needs a trained token head"),
        ("expert.methods", ("lora_ttt/2:next_token",), "needs a trained token head"),
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
        energy_moe.validate(cfg)


def test_report_renders_a_frozen_tiny_run_without_training(tmp_path, monkeypatch):
    """The digits section from a kept tiny run: error changes in accuracy points, energy per
    image = 64 x per token, and every figure drawn from results.json alone."""
    from experiments import report, run

    monkeypatch.setattr(report, "BENCHMARKS", tmp_path / "repo" / "BENCHMARKS.md")
    cfg = digits_config.get_config("tiny")
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "run_info.json").write_text(json.dumps({"config": cfg.to_dict()}))
    with open(FIXTURE) as f:
        results = json.load(f)
    (workdir / "results.json").write_text(json.dumps(results))
    assert run.report_workdir(str(workdir)) == "energy_moe"
    text = (tmp_path / "repo" / "BENCHMARKS.md").read_text()
    assert "<!-- energy_moe_digits:start -->" in text and "<!-- energy_moe:start -->" not in text
    assert "configs/energy_moe_digits.py" in text and "bits/char" not in text
    rows = results["methods"]
    base = rows["no_ttt"]["error"]["mean"]
    for name, row in rows.items():
        line = next(x for x in text.splitlines() if x.startswith(f"| {name} | "))
        cells = line.split(" | ")
        assert cells[1] == f"{row['error']['mean']:.3f}"
        assert cells[2] == f"{100 * (row['error']['mean'] - base):.1f} pp"
    per_image = f"no_ttt {64 * rows['no_ttt']['uj_per_token']['mean']:.3f}"
    assert per_image in text
    assert "masked reconstruction is not run on digits" in text
    for name in cfg.expert.methods:  # the expert-level table (after the methods'), in points
        line = [x for x in text.splitlines() if x.startswith(f"| {name} | ")][1]
        assert line.split(" | ")[7] == f"{100 * (rows[name]['error']['mean'] - base):.1f} pp"
    for plot in ("pareto", "heatmap", "convergence", "budget"):
        assert f"![{plot}](docs/figures/energy_moe_digits_{plot}.png)" in text
        path = tmp_path / "repo" / "docs" / "figures" / f"energy_moe_digits_{plot}.png"
        assert path.stat().st_size > 1000


@pytest.mark.slow
def test_tiny_run_end_to_end_matches_a_direct_evaluation(tmp_path, monkeypatch):
    """The tiny run: the no_ttt cell's prequential error equals argmax of the trained model
    applied batch by batch; a rerun reads every cell and the parameters back."""
    cfg = digits_config.get_config("tiny")
    results = energy_moe.run(cfg, str(tmp_path))
    assert list(results["methods"]) == list(energy_moe.methods(cfg))
    for row in results["methods"].values():
        for key in energy_moe.scalars(energy_moe.ERROR):
            assert math.isfinite(row[key]["mean"]), key
    for plot in ("pareto", "heatmap", "convergence", "budget"):
        assert (tmp_path / f"energy_moe_digits_{plot}.png").stat().st_size > 1000
    rt = runtime.build_runtime(cfg, digits.model_config(cfg), head="class")
    params, info = runtime.trained_params(rt, 0, str(tmp_path), fit=None)
    assert info == results["seed_info"][0]
    _, _, x_te, y_te = digits_c.load_digits_split(0, cfg.data.test_fraction)
    stream = digits.shifted_stream(cfg, x_te, y_te, 0)
    apply = jax.jit(moe.init_moe(digits.model_config(cfg)).apply)
    b = cfg.data.batch
    wrong = 0
    for i in range(0, len(stream.targets), b):
        logits = np.asarray(apply(params, stream.inputs[i : i + b]).class_logits)
        wrong += int(np.sum(logits.argmax(-1) != stream.targets[i : i + b]))
    assert _cell(tmp_path, "no_ttt")["error"] == pytest.approx(wrong / len(stream.targets))
    assert results["methods"]["no_ttt"]["error"]["mean"] == _cell(tmp_path, "no_ttt")["error"]
    adapted = _cell(tmp_path, "energy_ttt/3")
    assert adapted["adapt_calls"] == math.ceil(cfg.data.stream_batches / cfg.ttt.every)

    def fail(*args, **kwargs):
        raise AssertionError("a cached cell or checkpoint was recomputed")

    monkeypatch.setattr(serving, "serve", fail)
    monkeypatch.setattr(runtime, "pretrain", fail)
    again = energy_moe.run(cfg, str(tmp_path))
    assert json.dumps(again) == json.dumps(results)
