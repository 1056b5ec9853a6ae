"""Window adaptation (issue 15 item 7): token windows on a tiny MoE LM and windows of W images on
a tiny MoE classifier (``axis=0``). The scanned path against a Python loop over windows that calls
the model and ``EnergyTTT.adapt`` by hand (float32, rtol 1e-5 / atol 1e-6), causality (no score
depends on tokens or images after its window), and the work serving charges per window."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metattt.energy import (
    SimulatedDevice,
    SimulatedMonitor,
    Work,
    energy_tent,
    serve_stream,
    serve_windows,
)
from metattt.models import moe

CFG = moe.MoEConfig(vocab_size=16, d_model=8, num_heads=2, num_layers=2, num_experts=4, d_ff=8,
                    top_k=2, max_len=12, capacity_factor=None)  # fmt: skip
B, L, W, ROWS = 3, 12, 4, 2
MODEL = moe.init_moe(CFG, seed=1)
TTT = energy_tent(MODEL.apply, np.array([1.0, 2.0, 3.0, 4.0]), top_k=2, task="next_token",
                  max_steps=2)  # fmt: skip
MASK = jnp.ones((4,), bool)
LAM = jnp.float32(0.5)
TOL = dict(rtol=1e-5, atol=1e-6)


def token_infer(p, x, y, mask):
    out = MODEL.apply(p, x, expert_mask=mask)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(out.logits), y[..., None], -1)[..., 0]
    return nll, jnp.sum(jax.nn.one_hot(out.aux["expert_ids"], 4, dtype=jnp.int32), -2)


@jax.jit
def adapt(p, tokens, lam, mask):
    res = TTT.adapt(p, tokens, lam, mask, diagnostics=False)
    return res.params, res.inner.aux


WINDOWED = jax.jit(
    functools.partial(serve_windows, token_infer, adapt, window=W, rows=ROWS),
    static_argnames="adapting",
)
APPLY = jax.jit(lambda p, x: MODEL.apply(p, x, expert_mask=MASK))
BY_HAND_ADAPT = jax.jit(TTT.adapt, static_argnames="diagnostics")  # the same call, one compile


def _batch(seed):
    x = np.random.default_rng(seed).integers(0, 16, (B, L + 1)).astype(np.int32)
    return x[:, :-1], x[:, 1:]


def _by_hand(p, x, y):
    """Chunk by chunk in Python: score with the current parameters, then adapt on the chunk."""
    scores, counts = [], []
    for c in range(L // W):
        out = APPLY(p, x)
        logp = np.asarray(jax.nn.log_softmax(out.logits), np.float64)
        nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
        scores.append(nll[:, c * W : (c + 1) * W].mean())
        ids = np.asarray(out.aux["expert_ids"])[:, :, c * W : (c + 1) * W]  # (layers, B, W, K)
        counts.append(np.stack([np.bincount(i.ravel(), minlength=4) for i in ids]))
        p = BY_HAND_ADAPT(p, x[:ROWS, c * W : (c + 1) * W], LAM, MASK, diagnostics=False).params
    return np.array(scores), np.array(counts), p


def _assert_served_as_by_hand(got, by_hand, params, steps_shape):
    """``got`` (a WindowServed) equals the Python loop's (scores, counts, final parameters), and
    the adaptation moved the parameters; ``steps_shape`` is (C, K steps, layers, E)."""
    scores, counts, final = by_hand
    np.testing.assert_allclose(got.scores, scores, **TOL)
    np.testing.assert_array_equal(got.counts, counts)
    assert got.stats.expert_counts.shape == steps_shape
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got.params, final)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), final, params))
    assert max(moved) > 1e-4  # the adaptation changed the parameters


def test_windows_equal_a_loop_over_chunks_that_adapts_by_hand():
    x, y = _batch(0)
    got = WINDOWED(MODEL.params, x, y, LAM, MASK, adapting=True)
    by_hand = _by_hand(MODEL.params, x, y)
    _assert_served_as_by_hand(got, by_hand, MODEL.params, (L // W, 2, 2, 4))
    scores = by_hand[0]
    plain = WINDOWED(MODEL.params, x, y, LAM, MASK, adapting=False)  # every chunk at θ_0
    np.testing.assert_allclose(plain.scores[0], scores[0], **TOL)
    assert np.abs(plain.scores[1:] - scores[1:]).max() > 1e-5


@pytest.mark.parametrize("chunk", [0, 1])
def test_tokens_after_a_chunk_change_no_score_up_to_it(chunk):
    x, y = _batch(1)
    x2, y2 = x.copy(), y.copy()
    later = slice((chunk + 1) * W, None)
    x2[:, later], y2[:, later] = (x[:, later] + 5) % 16, (y[:, later] + 3) % 16
    a = WINDOWED(MODEL.params, x, y, LAM, MASK, adapting=True)
    b = WINDOWED(MODEL.params, x2, y2, LAM, MASK, adapting=True)
    np.testing.assert_allclose(a.scores[: chunk + 1], b.scores[: chunk + 1], **TOL)
    assert np.abs(a.scores[chunk + 1 :] - b.scores[chunk + 1 :]).min() > 1e-6


def test_a_window_that_does_not_divide_the_length_is_refused():
    x, y = _batch(2)
    with pytest.raises(ValueError, match="window must be a positive divisor of the sequence"):
        serve_windows(token_infer, adapt, MODEL.params, x, y, LAM, MASK, window=5, rows=1)
    with pytest.raises(ValueError, match="rows must be in"):
        serve_windows(token_infer, adapt, MODEL.params, x, y, LAM, MASK, window=4, rows=4)


def test_serving_charges_every_chunk_and_every_adaptation_step():
    """dynamic J = Σ_batches Σ_chunks [E(chunk pass) + Σ_steps 3·E(step on ROWS×W tokens)]."""
    device = SimulatedDevice(idle_power_w=50.0, joules_per_flop=1e-9, joules_per_byte=1e-10)
    dense = Work(1e4, 2e3)
    work = lambda counts, rows: dense.scaled(rows / B) + Work(1e3 * float(np.sum(counts)), 7.0)
    batches = [_batch(s) for s in (3, 4)]
    inputs, targets = (np.stack(a) for a in zip(*batches, strict=True))
    monitor = SimulatedMonitor(device)
    served = serve_stream(None, None, MODEL.params, inputs, targets, work=work, dense=dense,
                          device=device, monitor=monitor, period_s=1.0, top_k=2, mask=MASK,
                          lam=0.5, adapting=True, adapt_windows=ROWS, backward_factor=2.0,
                          windowed=WINDOWED)  # fmt: skip
    monitor.close()
    p, want, want_adapt, want_scores = MODEL.params, 0.0, 0.0, []
    for x, y in batches:
        scores, counts, _ = _by_hand(p, x, y)
        want_scores.append(scores.mean())
        for c in range(L // W):
            want += device.work_energy(*work(counts[c], B))
            chunk = x[:ROWS, c * W : (c + 1) * W]
            res = BY_HAND_ADAPT(p, chunk, LAM, MASK, diagnostics=False)
            for step_counts in np.asarray(res.inner.aux.expert_counts):
                want_adapt += device.work_energy(*work(step_counts, ROWS).scaled(3.0))
            p = res.params
    assert served.dynamic_j == pytest.approx(want + want_adapt, rel=1e-9)
    assert served.adapt_dynamic_j == pytest.approx(want_adapt, rel=1e-9)
    np.testing.assert_allclose(served.scores, want_scores, **TOL)
    assert served.adapt_calls == 2 * (L // W)
    assert len(served.curve_loss) == 2 * (L // W) * 2


# Windows of W images of a classifier (axis=0): a window is scored from the parameters before its
# update, then adapted on (its first CROWS images).
CCFG = CFG._replace(num_classes=3, num_layers=1, max_len=4)
CB, CL, CW, CROWS = 6, 4, 2, 2
CMODEL = moe.init_moe(CCFG, seed=2)
CTTT = energy_tent(CMODEL.apply, np.array([1.0, 2.0, 3.0, 4.0]), top_k=2, params="router+layernorm",
                   task="entropy", head="class", max_steps=2)  # fmt: skip


def image_infer(p, x, y, mask):
    """Each image's class NLL (continuous, so that any dependence shows) and its assignments."""
    out = CMODEL.apply(p, x, expert_mask=mask)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(out.class_logits), y[:, None], -1)[:, 0]
    return nll, jnp.sum(jax.nn.one_hot(out.aux["expert_ids"], 4, dtype=jnp.int32), -2)


@jax.jit
def class_adapt(p, images, lam, mask):
    res = CTTT.adapt(p, images, lam, mask, diagnostics=False)
    return res.params, res.inner.aux


IMAGE_WINDOWED = jax.jit(
    functools.partial(serve_windows, image_infer, class_adapt, window=CW, rows=CROWS, axis=0),
    static_argnames="adapting",
)
CAPPLY = jax.jit(lambda p, x: CMODEL.apply(p, x, expert_mask=MASK))
CLASS_BY_HAND = jax.jit(CTTT.adapt, static_argnames="diagnostics")


def _images(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 16, (CB, CL)).astype(np.int32), rng.integers(0, 3, CB).astype(np.int32)


def _images_by_hand(p, x, y):
    """Window by window in Python: score its W images with the current parameters, then adapt."""
    scores, counts = [], []
    for c in range(CB // CW):
        xs, ys = x[c * CW : (c + 1) * CW], y[c * CW : (c + 1) * CW]
        out = CAPPLY(p, xs)
        logp = np.asarray(jax.nn.log_softmax(out.class_logits), np.float64)
        scores.append(-logp[np.arange(CW), ys].mean())
        ids = np.asarray(out.aux["expert_ids"])  # (layers, W, L, K)
        counts.append(np.stack([np.bincount(i.ravel(), minlength=4) for i in ids]))
        p = CLASS_BY_HAND(p, xs[:CROWS], LAM, MASK, diagnostics=False).params
    return np.array(scores), np.array(counts), p


def test_image_windows_equal_a_loop_that_adapts_by_hand_and_ignore_later_images():
    x, y = _images(6)
    got = IMAGE_WINDOWED(CMODEL.params, x, y, LAM, MASK, adapting=True)
    by_hand = _images_by_hand(CMODEL.params, x, y)
    _assert_served_as_by_hand(got, by_hand, CMODEL.params, (CB // CW, 2, 1, 4))
    # The images after window 0 change: window 0's score does not; the later ones do.
    x2, y2 = x.copy(), y.copy()
    x2[CW:], y2[CW:] = (x[CW:] + 5) % 16, (y[CW:] + 1) % 3
    other = IMAGE_WINDOWED(CMODEL.params, x2, y2, LAM, MASK, adapting=True)
    np.testing.assert_allclose(other.scores[0], got.scores[0], **TOL)
    assert np.abs(other.scores[1:] - got.scores[1:]).min() > 1e-6


def test_image_windows_are_charged_a_pass_of_w_images_and_every_step():
    """dynamic J = Σ_batches Σ_windows [E(pass of W images) + Σ_steps 3·E(step on CROWS images)]."""
    device = SimulatedDevice(idle_power_w=50.0, joules_per_flop=1e-9, joules_per_byte=1e-10)
    dense = Work(1e4, 2e3)
    work = lambda counts, rows: dense.scaled(rows / CB) + Work(1e3 * float(np.sum(counts)), 7.0)
    batches = [_images(s) for s in (7, 8)]
    inputs, targets = (np.stack(a) for a in zip(*batches, strict=True))
    monitor = SimulatedMonitor(device)
    # serve_stream's pass without adaptation only times the batch (its outputs are replaced by
    # the adapting pass's): run the adapting program for it too, one compilation less.
    windowed = lambda *args, adapting: IMAGE_WINDOWED(*args, adapting=True)
    served = serve_stream(None, None, CMODEL.params, inputs, targets, work=work,
                          dense=dense.scaled(CW / CB), device=device, monitor=monitor,
                          period_s=1.0, top_k=2, mask=MASK, lam=LAM, adapting=True,
                          adapt_windows=CROWS, backward_factor=2.0, windowed=windowed,
                          window_rows=CW)  # fmt: skip
    monitor.close()
    p, want, want_adapt, want_scores = CMODEL.params, 0.0, 0.0, []
    for x, y in batches:
        scores, counts, _ = _images_by_hand(p, x, y)
        want_scores.append(scores.mean())
        for c in range(CB // CW):
            want += device.work_energy(*work(counts[c], CW))
            res = CLASS_BY_HAND(p, x[c * CW : c * CW + CROWS], LAM, MASK, diagnostics=False)
            for step_counts in np.asarray(res.inner.aux.expert_counts):
                want_adapt += device.work_energy(*work(step_counts, CROWS).scaled(3.0))
            p = res.params
    assert served.dynamic_j == pytest.approx(want + want_adapt, rel=1e-9)
    assert served.adapt_dynamic_j == pytest.approx(want_adapt, rel=1e-9)
    np.testing.assert_allclose(served.scores, want_scores, **TOL)
    assert served.adapt_calls == 2 * (CB // CW)


def test_image_windows_refuse_a_bad_axis_window_or_rows():
    x, y = _images(9)
    call = functools.partial(serve_windows, image_infer, class_adapt, CMODEL.params, x, y, LAM,
                             MASK)  # fmt: skip
    with pytest.raises(ValueError, match="window must be a positive divisor of the batch 6"):
        call(window=4, rows=1, axis=0)
    with pytest.raises(ValueError, match=r"rows must be in \[1, 2\]"):
        call(window=2, rows=3, axis=0)
    with pytest.raises(ValueError, match="axis must be 0"):
        call(window=2, rows=1, axis=2)
