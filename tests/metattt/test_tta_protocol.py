"""The configurable TTA protocol: hand-computed metrics, validation, preset counts, loss modes."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metattt import params as P
from metattt import runlog, tta
from metattt.data import controlled
from metattt.models import dynamics as dyn

# ------------------------------------------------------------------------------------------------
# A one-parameter quadratic: loss(s; x) = 0.5 (s - x)^2, gradient s - x, SGD s <- s - lr (s - x)
# ------------------------------------------------------------------------------------------------

TOY = {"norm": {"scale": jnp.array(0.0)}, "head": {"kernel": jnp.array(2.0)}}
XS = jnp.array([1.0, -1.0, 3.0])  # one clip per entry


def toy_loss(p, x):
    # 0.25 * kernel * (s - x)^2 with kernel = 2: the frozen leaf takes part in the loss.
    return 0.25 * p["head"]["kernel"] * (p["norm"]["scale"] - x) ** 2


def toy_run(**overrides):
    kw = dict(
        mode="rollout",
        num_adaptation_steps=1,
        lr=0.5,
        clip_norm=None,
        reset_per_clip=True,
        adapt_layers="layernorm",
        window=2,
        optimizer="sgd",
    )
    kw.update(overrides)
    return tta.run_protocol(tta.TTAProtocol(**kw), {"rollout": toy_loss}, TOY, XS)


def assert_metrics(result, pre, post, window=2):
    m = result.metrics
    improvement = [a - b for a, b in zip(pre, post, strict=True)]

    def rolling(v):
        return [np.mean(v[max(0, c - window + 1) : c + 1]) for c in range(len(v))]

    np.testing.assert_allclose(m.pre_loss, pre, rtol=1e-6)
    np.testing.assert_allclose(m.post_loss, post, rtol=1e-6)
    np.testing.assert_allclose(m.improvement, improvement, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m.rolling_post, rolling(post), rtol=1e-6)
    np.testing.assert_allclose(m.rolling_improvement, rolling(improvement), rtol=1e-6, atol=1e-7)


def test_reset_one_step_by_hand():
    # s = 0 before every clip: pre = x^2 / 2; one step gives s = x / 2, post = x^2 / 8.
    result = toy_run()
    assert_metrics(result, [0.5, 0.5, 4.5], [0.125, 0.125, 1.125])
    # rolling post over W = 2 clips: 0.125, 0.125, (0.125 + 1.125) / 2 = 0.625
    np.testing.assert_allclose(result.metrics.rolling_post, [0.125, 0.125, 0.625])
    assert result.count == P.ParamCount(1, 2) and result.count.share == 0.5
    assert result.adapted_paths == ("norm/scale",)


def test_reset_two_steps_by_hand():
    # s = x/2, then s = x/2 + (x - x/2)/2 = 3x/4: post = 0.5 (x/4)^2 = x^2 / 32.
    assert_metrics(toy_run(num_adaptation_steps=2), [0.5, 0.5, 4.5], [1 / 32, 1 / 32, 9 / 32])


def test_cumulative_by_hand():
    # s: 0 -> 0.5 (x=1); pre 0.5*(0.5+1)^2 = 1.125, s -> -0.25 (x=-1);
    # pre 0.5*(3.25)^2 = 5.28125, s -> 1.375 (x=3), post 0.5*(1.625)^2 = 1.3203125.
    result = toy_run(reset_per_clip=False)
    assert_metrics(result, [0.5, 1.125, 5.28125], [0.125, 0.28125, 1.3203125])
    np.testing.assert_allclose(result.metrics.params["norm"]["scale"], 1.375)


def test_gradient_clipping_by_hand():
    # grads s - x = -1, 1, -3; clipped to norm 1: -1, 1, -1; s = 0.5, -0.5, 0.5.
    result = toy_run(clip_norm=1.0)
    assert_metrics(result, [0.5, 0.5, 4.5], [0.125, 0.125, 3.125])


@pytest.mark.parametrize(
    "overrides",
    [{"enabled": False}, {"adapt_layers": "none"}, {"num_adaptation_steps": 0}],
)
def test_baseline_changes_nothing(overrides):
    result = toy_run(**overrides)
    assert_metrics(result, [0.5, 0.5, 4.5], [0.5, 0.5, 4.5])
    assert result.count == P.ParamCount(0, 2) and result.adapted_paths == ()


def test_every_clip_is_logged_to_jsonl_and_tensorboard(tmp_path):
    result = toy_run()
    with runlog.create_writer(tmp_path) as writer:
        tta.write_protocol_metrics(writer, result)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {
        "step": 0,
        "trainable_params": 1.0,
        "total_params": 2.0,
        "trainable_share": 0.5,
    }
    assert [r["step"] for r in records[1:]] == [0, 1, 2]
    assert [r["post_loss"] for r in records[1:]] == [0.125, 0.125, 1.125]
    assert [r["rolling_post"] for r in records[1:]] == [0.125, 0.125, 0.625]
    assert set(records[1]) == {"step", "num_skipped", *tta.CLIP_METRICS}
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_summary():
    run = toy_run()
    s = tta.summarize(run)
    assert s["trainable_params"] == 1 and s["total_params"] == 2 and s["num_clips"] == 3
    assert math.isclose(s["mean_post"], (0.125 + 0.125 + 1.125) / 3, rel_tol=1e-6)
    assert math.isclose(s["mean_improvement"], (0.375 + 0.375 + 3.375) / 3, rel_tol=1e-6)
    assert math.isclose(s["final_rolling_post"], 0.625, rel_tol=1e-6)
    table = tta.format_summary_table({"toy": s})
    assert "| toy | 1 (50.00%) |" in table and table.count("\n") == 2
    table = tta.format_summary_table({"toy": s}, run.metric)
    assert table.endswith("\n\npre/post: adaptation loss 'rollout'")  # no eval_fn was given


def test_compiled_runner_is_reused_for_new_parameters():
    protocol = tta.TTAProtocol(
        mode="rollout", num_adaptation_steps=1, lr=0.5, clip_norm=None, window=2
    )
    losses = {"rollout": toy_loss}
    tta.run_protocol(protocol, losses, TOY, XS)
    before = tta._compiled_protocol.cache_info()
    other = jax.tree.map(lambda x: x + 1.0, TOY)
    tta.run_protocol(protocol, losses, other, XS)
    after = tta._compiled_protocol.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mode": ""}, "mode must name a loss"),
        ({"adapt_layers": "layrnorm"}, "unknown adapt_layers preset 'layrnorm'"),
        ({"adapt_layers": "layernorm+mlp"}, "unknown adapt_layers preset 'mlp'"),
        ({"adapt_layers": "re:(norm"}, "adapt_layers pattern 're:\\(norm' is not a regex"),
        ({"adapt_layers": 3}, "adapt_layers must be a selector"),
        ({"num_adaptation_steps": -1}, "num_adaptation_steps must be a non-negative int"),
        ({"num_adaptation_steps": 1.5}, "num_adaptation_steps must be a non-negative int"),
        ({"lr": -1e-3}, "lr must be a finite number >= 0"),
        ({"lr": float("nan")}, "lr must be a finite number >= 0"),
        ({"clip_norm": 0.0}, "clip_norm must be a finite positive number"),
        ({"clip_norm": -1.0}, "clip_norm must be a finite positive number"),
        ({"clip_norm": float("nan")}, "clip_norm must be a finite positive number"),
        ({"window": 0}, "window must be an int >= 1"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"enabled": "yes"}, "enabled must be a bool"),
        ({"reset_per_clip": 1}, "reset_per_clip must be a bool"),
    ],
)
def test_protocol_validation(overrides, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        tta.TTAProtocol(**overrides)


def test_missing_mode_loss_and_empty_selection_are_errors():
    protocol = tta.TTAProtocol(mode="one_step")
    with pytest.raises(ValueError, match="no loss for mode 'one_step'"):
        tta.run_protocol(protocol, {"rollout": toy_loss}, TOY, XS)
    with pytest.raises(ValueError, match="selects no leaf"):
        tta.run_protocol(tta.TTAProtocol(adapt_layers="attn_proj"), toy_loss, TOY, XS)
    with pytest.raises(TypeError, match="TTAProtocol"):
        tta.run_protocol({"mode": "rollout"}, {"rollout": toy_loss}, TOY, XS)


@pytest.mark.parametrize(
    "selector", ["re:^norm/", ("layernorm",), lambda path, leaf: path.startswith("norm/")]
)
def test_any_selector_adapts_what_it_selects(selector):
    """A pattern, a sequence and a callable select the toy's norm like the preset does."""
    got = toy_run(adapt_layers=selector)
    assert got.adapted_paths == ("norm/scale",)
    assert_metrics(got, [0.5, 0.5, 4.5], [0.125, 0.125, 1.125])  # the hand-computed run


def test_one_loss_function_any_optimizer_rule_and_a_zero_rate():
    one = tta.run_protocol(
        tta.TTAProtocol(num_adaptation_steps=1, lr=0.5, clip_norm=None, window=2, optimizer="sgd"),
        toy_loss,  # one function: the mode only names it
        TOY,
        XS,
    )
    assert one.metric == "adaptation loss 'loss'"
    assert_metrics(one, [0.5, 0.5, 4.5], [0.125, 0.125, 1.125])
    momentum = tta.TTAProtocol(
        num_adaptation_steps=2, lr=0.5, clip_norm=None, window=2,
        optimizer=functools.partial(optax.sgd, momentum=0.25),
    )  # fmt: skip
    # two heavy-ball steps from s = 0: s1 = x/2; velocity g1 + 0.25 g0 = -3x/4, s2 = 7x/8
    post = 0.5 * (XS / 8) ** 2
    np.testing.assert_allclose(tta.run_protocol(momentum, toy_loss, TOY, XS).metrics.post_loss,
                               post, rtol=1e-6)  # fmt: skip
    frozen = tta.run_protocol(tta.TTAProtocol(lr=0.0), toy_loss, TOY, XS, eval_fn=toy_loss)
    assert frozen.metric == "eval_fn"
    np.testing.assert_array_equal(frozen.metrics.post_loss, frozen.metrics.pre_loss)


def test_the_defaults_move_the_loss_visibly_where_the_old_ones_did_not(small):
    """On the project's own shifted dynamics (an untrained predictor here; the trained one's
    ratio is in BENCHMARKS.md), the default protocol moves the adapted loss over ten times as
    far as the former defaults (1 step at 1e-4, clipped at 1)."""
    apply, params, _ = small
    system = controlled.make_system(5)
    clips = controlled.sample_clips(
        jax.random.key(8), system, controlled.shifted_regimes(system, "representational"), 3,
        num_adapt=2, num_eval=1, length=SMALL.window + SMALL.horizon,
    )  # fmt: skip
    losses, _ = dyn.clip_losses(apply, SMALL.window)
    ratio = {}
    for name, protocol in {
        "default": tta.TTAProtocol(mode="rollout"),
        "former": tta.TTAProtocol(
            mode="rollout", num_adaptation_steps=1, lr=1e-4, clip_norm=1.0, optimizer="sgd"
        ),
    }.items():
        m = tta.run_protocol(protocol, losses, params, clips).metrics
        ratio[name] = float(m.post_loss.mean() / m.pre_loss.mean())
    assert 1 - ratio["default"] > 10 * (1 - ratio["former"]) > 0, ratio


def test_clips_and_eval_fn_shapes_are_checked_in_one_line():
    protocol = tta.TTAProtocol(num_adaptation_steps=1, lr=0.5, window=2)
    with pytest.raises(ValueError, match="clips is a list; stack it"):
        tta.run_protocol(protocol, toy_loss, TOY, [XS[0], XS[1]])
    with pytest.raises(ValueError, match="leading clip axis"):
        tta.run_protocol(protocol, toy_loss, TOY, {"x": jnp.array(1.0)})
    with pytest.raises(ValueError, match=r"must return a scalar per clip, got shape \(2,\)"):
        tta.run_protocol(protocol, toy_loss, TOY, XS, eval_fn=lambda p, x: jnp.stack([x, x]))


def test_protocol_is_frozen_and_hashable():
    p = tta.TTAProtocol()
    with pytest.raises(AttributeError):
        p.lr = 1.0
    assert hash(p) == hash(tta.TTAProtocol())


# ------------------------------------------------------------------------------------------------
# The predictor: preset counts from the layer sizes
# ------------------------------------------------------------------------------------------------

CFG = dyn.PredictorConfig(
    state_dim=4, action_dim=2, dim=8, num_heads=2, num_layers=2, mlp_ratio=3, window=5, horizon=3
)


@pytest.fixture(scope="module")
def predictor():
    apply, params = dyn.init_predictor(CFG, seed=0)
    return apply, params, jax.jit(apply)  # the jitted one for Python-loop references


def test_preset_counts_from_layer_sizes(predictor):
    params = predictor[1]
    d, n, r, z, a, w = CFG.dim, CFG.num_layers, CFG.mlp_ratio, CFG.state_dim, CFG.action_dim, 5
    norms = (2 * n + 1) * 2 * d  # norm1, norm2 per block + norm_out; scale and bias each
    attn_out = n * (d * d + d)  # out kernel (heads, head_dim, D) = D x D, bias D
    mlp_out = n * (r * d * d + d)
    # biases: per block q, k, v, out (D each), norm1, norm2 (D each), mlp hidden (rD), out (D);
    # then embed (D), norm_out (D), head (Z).
    biases = n * (7 * d + r * d) + 2 * d + z
    per_block = 2 * 2 * d + 4 * (d * d + d) + (d * r * d + r * d) + (r * d * d + d)
    total = (z + a) * d + d + w * d + n * per_block + 2 * d + d * z + z
    expected = {
        "layernorm": norms,
        "layernorm+attn_proj": norms + attn_out,
        "layernorm+bias": norms + biases - (2 * n + 1) * d,  # norm biases counted once
        "layernorm+mlp_out": norms + mlp_out,
    }
    assert set(expected) == set(tta.ADAPT_PRESETS)
    for preset, trainable in expected.items():
        got = P.count(params, P.select(params, preset))
        assert got == P.ParamCount(trainable, total), preset
        assert math.isclose(got.share, trainable / total)


def test_preset_paths_follow_the_naming_contract(predictor):
    params = predictor[1]
    paths = P.selected_paths(params, P.select(params, "layernorm+attn_proj"))
    assert "blocks/0/attn/out/kernel" in paths and "norm_out/scale" in paths
    assert not any("query" in p or "mlp" in p for p in paths)
    mlp = P.selected_paths(params, P.select(params, "mlp_out"))
    assert mlp == [f"blocks/{i}/mlp/out/{k}" for i in range(2) for k in ("bias", "kernel")]


def test_predictor_is_causal(predictor):
    _, params, apply = predictor
    z = jax.random.normal(jax.random.key(1), (CFG.window, CFG.state_dim))
    a = jax.random.normal(jax.random.key(2), (CFG.window, CFG.action_dim))
    out = apply(params, z, a)
    out2 = apply(params, z.at[3:].add(1.0), a.at[3:].add(1.0))
    np.testing.assert_allclose(out[:3], out2[:3], rtol=1e-6)
    assert not np.allclose(out[3:], out2[3:])
    with pytest.raises(ValueError, match="z must end in"):
        apply(params, z[:-1], a[:-1])


# ------------------------------------------------------------------------------------------------
# Loss modes against a plain Python loop
# ------------------------------------------------------------------------------------------------


SMALL = dyn.PredictorConfig(dim=8, num_heads=1, num_layers=1, window=3, horizon=2)


@pytest.fixture(scope="module")
def small():
    apply, params = dyn.init_predictor(SMALL, seed=0)
    return apply, params, jax.jit(apply)


@pytest.fixture(scope="module")
def windows():
    system = controlled.make_system(3)
    sample = jax.jit(controlled.sample_windows, static_argnums=(3, 4))
    return sample(
        jax.random.key(4), system, controlled.source_regime(), 3, SMALL.window + SMALL.horizon
    )


def _reference_losses(apply, params, windows, w):
    rollout_err, one_step_err = [], []
    for b in range(windows.z.shape[0]):
        z, a = np.asarray(windows.z[b]), np.asarray(windows.a[b])
        hz, ha = list(z[:w]), list(a[:w])
        for h in range(z.shape[0] - w):
            pred = np.asarray(apply(params, jnp.stack(hz[-w:]), jnp.stack(ha[-w:])))[-1]
            rollout_err.append(np.mean((pred - z[w + h]) ** 2))
            hz.append(pred)
            ha.append(a[w + h])
            teacher = np.asarray(apply(params, z[h : h + w], a[h : h + w]))[-1]
            one_step_err.append(np.mean((teacher - z[w + h]) ** 2))
    return np.mean(rollout_err), np.mean(one_step_err)


def test_modes_match_python_loop(small, windows):
    apply, params, jitted = small
    w = SMALL.window
    ref_rollout, ref_one = _reference_losses(jitted, params, windows, w)
    rollout_loss = jax.jit(dyn.rollout_loss, static_argnums=(0, 3))
    one_step_loss = jax.jit(dyn.one_step_loss, static_argnums=(0, 3))
    got_rollout = rollout_loss(apply, params, windows, w)
    got_one = one_step_loss(apply, params, windows, w)
    np.testing.assert_allclose(got_rollout, ref_rollout, rtol=1e-5)
    np.testing.assert_allclose(got_one, ref_one, rtol=1e-5)
    assert abs(float(got_rollout) - float(got_one)) > 1e-4  # the modes differ beyond H = 1
    short = controlled.Trajectories(windows.z[:, : w + 1], windows.a[:, : w + 1])  # H = 1
    np.testing.assert_allclose(
        rollout_loss(apply, params, short, w), one_step_loss(apply, params, short, w), rtol=1e-6
    )


def test_protocol_mode_selects_the_adaptation_loss(small):
    apply, params, _ = small
    system = controlled.make_system(5)
    clips = controlled.sample_clips(
        jax.random.key(6),
        system,
        controlled.shifted_regimes(system, "representational"),
        2,
        num_adapt=2,
        num_eval=1,
        length=SMALL.window + SMALL.horizon,
    )
    losses, eval_fn = dyn.clip_losses(apply, SMALL.window)
    for mode in ("rollout", "one_step"):
        protocol = tta.TTAProtocol(
            mode=mode, num_adaptation_steps=2, lr=1e-2, window=2, optimizer="sgd", clip_norm=1.0
        )
        result = tta.run_protocol(protocol, losses, params, clips)  # reports the mode's loss
        expected = jax.jit(jax.vmap(losses[mode], in_axes=(None, 0)))(params, clips)
        np.testing.assert_allclose(result.metrics.pre_loss, expected, rtol=1e-5)
        assert np.all(result.metrics.improvement > 0)  # the adapted loss falls on its own clip
    scored = tta.run_protocol(protocol, losses, params, clips, eval_fn=eval_fn)
    expected = jax.jit(jax.vmap(eval_fn, in_axes=(None, 0)))(params, clips)
    np.testing.assert_allclose(scored.metrics.pre_loss, expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The synthetic system
# ------------------------------------------------------------------------------------------------


def test_sub_populations_are_opposite_and_alternate():
    system = controlled.make_system(0)
    plus, minus = controlled.shifted_regimes(system, "offset")
    np.testing.assert_allclose(plus.offset, -minus.offset)
    plus, minus = controlled.shifted_regimes(system, "representational")
    np.testing.assert_allclose(plus.action_angle, -minus.action_angle)
    assert float(plus.gain) > 0.5 > float(minus.gain)
    clips = controlled.sample_clips(
        jax.random.key(1), system, (plus, minus), 4, num_adapt=1, num_eval=1, length=6
    )
    simulate = jax.jit(controlled.simulate)
    for c in range(4):
        z, a = clips.eval.z[c, 0], clips.eval.a[c, 0]
        follows = [
            np.allclose(simulate(system, r, z[0], a[:-1]), z, atol=1e-5) for r in (plus, minus)
        ]
        assert follows == [c % 2 == 0, c % 2 == 1], c
    with pytest.raises(ValueError, match="unknown shift kind"):
        controlled.shifted_regimes(system, "rotation")
