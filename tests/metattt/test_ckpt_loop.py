"""Tests of metattt.ckpt and metattt.loop: round trips, and a resumed run equals an unbroken one."""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metattt import loop, runlog
from metattt.ckpt import Checkpointer

D = 4  # input features
B = 8  # batch size


def _params(key):
    kw, kb = jax.random.split(key)
    return {"w": jax.random.normal(kw, (D,)), "b": jax.random.normal(kb, ())}


def test_round_trip_optax_state_and_typed_keys(tmp_path):
    params = _params(jax.random.key(0))
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    # Take one step so that the adam moments are random, not zeros.
    grads = _params(jax.random.key(1))
    _, opt_state = opt.update(grads, opt_state, params)
    state = {
        "params": params,
        "opt": opt_state,
        "key": jax.random.key(42),
        "keys": jax.random.split(jax.random.key(3, impl="rbg"), 3),
    }
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.latest_step() is None
    assert not (tmp_path / "ckpt").exists()  # reading never creates the directory
    ckpt.save(5, state)
    ckpt.close()

    restored = Checkpointer(tmp_path / "ckpt").restore(state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    adam_state = restored["opt"][0]
    assert isinstance(adam_state, optax.ScaleByAdamState)
    assert isinstance(restored["opt"][1], optax.EmptyState)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.dtype == want.dtype
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert jax.random.key_impl(restored["keys"]) == jax.random.key_impl(state["keys"])
    # The restored key still draws the same numbers.
    np.testing.assert_array_equal(
        jax.random.normal(restored["key"], (3,)), jax.random.normal(state["key"], (3,))
    )

    # An abstract template works as well, with the latest step chosen by default.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    again = Checkpointer(tmp_path / "ckpt").restore(abstract)
    np.testing.assert_array_equal(
        jax.random.key_data(again["keys"]), jax.random.key_data(state["keys"])
    )


def test_restore_missing_raises(tmp_path):
    template = {"w": jnp.ones(3)}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Checkpointer(tmp_path / "nowhere").restore(template)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, {"w": jax.random.normal(jax.random.key(0), (3,))})
    with pytest.raises(FileNotFoundError, match="step 3"):
        ckpt.restore(template, step=3)
    ckpt.close()


# ------------------------------------------------------------------------------------------------
# The interruption test
# ------------------------------------------------------------------------------------------------

SEED = 123
TRUE_W = np.array([1.5, -2.0, 0.5, 3.0], np.float32)
OPT = optax.adam(3e-2)


def _loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


@functools.partial(jax.jit, donate_argnums=0)  # donation must not corrupt async saves
def _step(state, batch):
    loss, grads = jax.value_and_grad(_loss)(state["params"], batch)
    updates, opt_state = OPT.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt": opt_state}, {"loss": loss}


def _init_state():
    params = _params(jax.random.key(SEED + 1))
    return {"params": params, "opt": OPT.init(params)}


class _Interrupt(Exception):
    pass


def _make_batch_fn(calls: list[int], fail_at: int | None = None):
    key = jax.random.key(SEED)

    def batch_fn(step: int):
        calls.append(step)
        if step == fail_at:
            raise _Interrupt(f"interrupted at step {step}")
        kx, kn = jax.random.split(jax.random.fold_in(key, step))
        x = jax.random.normal(kx, (B, D))
        y = x @ TRUE_W + 0.1 * jax.random.normal(kn, (B,))
        return x, y

    return batch_fn


def test_resumed_run_is_bit_identical(tmp_path, caplog):
    kwargs = dict(num_steps=30, checkpoint_every=10, log_every=5, show_progress=False)

    calls1: list[int] = []
    with runlog.JsonlWriter(tmp_path / "run1" / "metrics.jsonl") as writer:
        final1 = loop.fit(
            _step,
            _init_state(),
            _make_batch_fn(calls1),
            workdir=tmp_path / "run1",
            writer=writer,
            **kwargs,
        )
    assert calls1 == list(range(30))
    assert Checkpointer(tmp_path / "run1" / "ckpt").all_steps() == [20, 30]  # max_to_keep=2

    calls2: list[int] = []
    with pytest.raises(_Interrupt):
        loop.fit(
            _step,
            _init_state(),
            _make_batch_fn(calls2, fail_at=17),
            workdir=tmp_path / "run2",
            **kwargs,
        )
    assert calls2 == list(range(18))
    assert Checkpointer(tmp_path / "run2" / "ckpt").latest_step() == 10

    calls3: list[int] = []
    with caplog.at_level(logging.INFO, logger="metattt.loop"):
        final2 = loop.fit(
            _step, _init_state(), _make_batch_fn(calls3), workdir=tmp_path / "run2", **kwargs
        )
    assert calls3 == list(range(10, 30))  # resumed after the checkpoint at 10, not from 0
    assert "Resumed" in caplog.text and "step 10" in caplog.text

    assert jax.tree.structure(final2) == jax.tree.structure(final1)
    for a, b in zip(jax.tree.leaves(final1), jax.tree.leaves(final2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The model did learn something, so the comparison is not between two untouched states.
    assert not np.array_equal(final1["params"]["w"], _init_state()["params"]["w"])

    lines = [json.loads(s) for s in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20, 25, 30]
    assert lines[-1]["loss"] < lines[0]["loss"]

    # Calling fit again on a finished run does no step and returns the same state.
    calls4: list[int] = []
    final3 = loop.fit(
        _step, _init_state(), _make_batch_fn(calls4), workdir=tmp_path / "run2", **kwargs
    )
    assert calls4 == []
    np.testing.assert_array_equal(final3["params"]["w"], final1["params"]["w"])
    with pytest.raises(ValueError, match="past num_steps"):
        loop.fit(
            _step,
            _init_state(),
            _make_batch_fn([]),
            workdir=tmp_path / "run2",
            **{**kwargs, "num_steps": 20},
        )


def test_fit_without_workdir_logs_partial_interval(tmp_path):
    calls: list[int] = []
    with runlog.JsonlWriter(tmp_path / "m.jsonl") as writer:
        loop.fit(
            _step,
            _init_state(),
            _make_batch_fn(calls),
            num_steps=7,
            log_every=5,
            writer=writer,
            show_progress=False,
        )
    steps = [json.loads(s)["step"] for s in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert steps == [5, 7]
    assert calls == list(range(7))
