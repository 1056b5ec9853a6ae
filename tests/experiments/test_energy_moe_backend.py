"""``model.backend = "cost_model"``: the run builds every model function with the backend its
stored kernel timings say is cheapest at the serving shape, and reads them back on a rerun
(no timing here: the timings are written by the test, or made by known cost laws)."""

import jax
import jax.numpy as jnp
import pytest

from configs import energy_moe as lm_config
from configs import energy_moe_digits as digits_config
from experiments import energy_moe
from experiments.energy_moe import backend, runtime
from metattt.energy import kernel_costs as kc
from metattt.models import moe


class _Built(Exception):
    """Raised by the spy once the run has built its runtime (nothing is trained)."""


def _cost_model(config):
    cfg = config.get_config("tiny")
    cfg.model.backend = "cost_model"
    return cfg


def _no_measuring(*args, **kwargs):
    raise AssertionError("measured, though the workdir holds every timing")


@pytest.mark.parametrize(
    "config, cheapest", [(lm_config, "reference"), (digits_config, "ragged")], ids=["lm", "digits"]
)
def test_the_run_builds_its_model_functions_with_the_stored_cheapest_backend(
    config, cheapest, tmp_path, monkeypatch
):
    """Timings no measurement could give (the cheap backend 1 µs per 1000 tokens, the other 1 s)
    stored in the workdir: the run measures nothing, and its training step, inference,
    signals, probe and adaptation all dispatch with the cheap backend."""
    cfg = _cost_model(config)
    shapes = backend.dispatch_shapes(cfg)
    assert shapes[0].tokens == cfg.data.batch * cfg.data.length and len(shapes) >= 3
    timings = [kc.KernelTiming(b, s, 1e-9 * s.tokens if b == cheapest else 1.0)
               for s in shapes for b in kc.candidate_backends()]  # fmt: skip
    kc.save_timings(tmp_path / backend.TIMINGS, timings)
    monkeypatch.setattr(kc, "measure_dispatch", _no_measuring)
    built, build = [], runtime.build_runtime

    def spy(cfg, mcfg, head="lm"):
        built.append(build(cfg, mcfg, head))
        raise _Built

    monkeypatch.setattr(runtime, "build_runtime", spy)
    with pytest.raises(_Built):
        energy_moe.run(cfg, str(tmp_path))
    (rt,) = built
    assert rt.mcfg.backend == cheapest
    asked, dispatch = [], moe.moe_dispatch

    def seen(*args, **kwargs):
        asked.append(kwargs["backend"])
        return dispatch(*args, **kwargs)

    monkeypatch.setattr(moe, "moe_dispatch", seen)
    params = jax.eval_shape(lambda: rt.init(0))
    b, length = cfg.data.batch, cfg.data.length
    x = jax.ShapeDtypeStruct((b, length), jnp.int32)
    y = x if config is lm_config else jax.ShapeDtypeStruct((b,), jnp.int32)
    mask = jax.ShapeDtypeStruct((rt.mcfg.num_experts,), jnp.bool_)
    state = jax.eval_shape(rt.train_step.init, params)
    jax.eval_shape(rt.train_step.update, state, (x, y))  # traced, not compiled
    for fn in (*rt.infer.values(), rt.signals):
        jax.eval_shape(fn, params, x, y, mask)
    jax.eval_shape(rt.probe, params, x, mask)
    jax.eval_shape(rt.adapt, params, x, jnp.float32(0.0), mask)
    assert asked and set(asked) == {cheapest}


def test_a_rerun_reads_the_timings_back(tmp_path, monkeypatch):
    """The first resolution measures every shape once (here by known cost laws: the einsum
    1 µs per token, ragged 3 ms flat) and stores them; a rerun on the workdir measures nothing
    and chooses alike; the record is what results.json keeps."""
    calls = []

    def measure(shapes, backends, *, repeats, monitor):
        calls.append([s.key() for s in shapes])
        law = {"reference": lambda s: 1e-6 * s.tokens, "ragged": lambda s: 3e-3}
        return [kc.KernelTiming(b, s, law[b](s)) for s in shapes for b in backends]

    monkeypatch.setattr(kc, "measure_dispatch", measure)
    cfg = _cost_model(lm_config)
    shapes = backend.dispatch_shapes(cfg)
    resolved, first = backend.resolve(cfg, str(tmp_path))
    assert calls == [[s.key() for s in shapes]] and first.measured == 2 * len(shapes)
    assert first.backend == "reference" == resolved.model.backend  # T = 64: 0.064 ms < 3 ms
    assert cfg.model.backend == "cost_model"  # the config asked for is left as it is
    rerun, again = backend.resolve(cfg, str(tmp_path))
    assert len(calls) == 1 and again == first._replace(measured=0)
    assert rerun.model.backend == "reference"
    kept = backend.record(again)
    assert kept["backend"] == "reference" and kept["measured_now"] == 0
    assert kept["measured"] == {"reference": 6.4e-5, "ragged": 3e-3}
    assert kept["shape"] == shapes[0].key() == "T=64,D=16,F=32,E=4,K=2,cf=none"
    assert backend.resolve(lm_config.get_config("tiny"), str(tmp_path))[1] is None  # "auto"


def test_an_unresolved_cost_model_config_builds_no_runtime():
    cfg = _cost_model(lm_config)
    assert energy_moe.task_of(cfg).model_config(cfg).backend == "auto"  # shapes only
    with pytest.raises(ValueError, match="chosen at run start"):
        runtime.build_runtime(cfg, energy_moe.task_of(cfg).model_config(cfg))


@pytest.mark.parametrize("config", [lm_config, digits_config], ids=["lm", "digits"])
def test_the_full_configs_ask_for_the_cost_model_and_the_small_ones_for_auto(config):
    """The full runs choose by measurement at their serving batch (B·L tokens, E, D, F, K of
    the model, dropless); tiny and demo keep "auto" (no measuring in the suite or the demo)."""
    cfg = config.get_config()
    assert cfg.model.backend == "cost_model"
    m = cfg.model
    serving = kc.DispatchShape(cfg.data.batch * cfg.data.length, m.d_model, m.d_ff,
                               m.num_experts, m.top_k)  # fmt: skip
    assert backend.dispatch_shapes(cfg) == [serving, *kc.neighbour_shapes(serving)]
    for variant in ("tiny", "demo"):
        assert config.get_config(variant).model.backend == "auto"
