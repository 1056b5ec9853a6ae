"""metattt.ckpt and metattt.train: round trips, the training contract, resume and faults."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metattt import runlog, train
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


def test_a_restored_state_reuses_the_programs_compiled_for_the_fresh_one(tmp_path):
    """Restored arrays are placed like the template's (uncommitted fresh arrays stay
    uncommitted), so a jitted step traced on the fresh state is not traced again on resume."""
    state = {"w": jax.random.normal(jax.random.key(0), (4,)), "key": jax.random.key(1)}
    traces = []

    @jax.jit
    def step(s):
        traces.append(1)
        return {"w": s["w"] * 2.0, "key": jax.random.split(s["key"])[0]}

    step(state)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, state)
    ckpt.close()
    restored = Checkpointer(tmp_path / "ckpt").restore(state)
    assert not restored["w"].committed
    step(restored)
    assert len(traces) == 1
    placed = jax.device_put(state, jax.devices()[0])  # a template placed on purpose stays so
    assert Checkpointer(tmp_path / "ckpt").restore(placed)["w"].committed


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
        final1 = train.fit(
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
        train.fit(
            _step,
            _init_state(),
            _make_batch_fn(calls2, fail_at=17),
            workdir=tmp_path / "run2",
            **kwargs,
        )
    assert calls2 == list(range(18))
    assert Checkpointer(tmp_path / "run2" / "ckpt").latest_step() == 10

    calls3: list[int] = []
    with caplog.at_level(logging.INFO, logger="metattt.train"):
        final2 = train.fit(
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
    final3 = train.fit(
        _step, _init_state(), _make_batch_fn(calls4), workdir=tmp_path / "run2", **kwargs
    )
    assert calls4 == []
    np.testing.assert_array_equal(final3["params"]["w"], final1["params"]["w"])
    with pytest.raises(ValueError, match="past num_steps"):
        train.fit(
            _step,
            _init_state(),
            _make_batch_fn([]),
            workdir=tmp_path / "run2",
            **{**kwargs, "num_steps": 20},
        )


def test_fit_without_workdir_logs_partial_interval(tmp_path):
    calls: list[int] = []
    with runlog.JsonlWriter(tmp_path / "m.jsonl") as writer:
        train.fit(
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


# ------------------------------------------------------------------------------------------------
# The training contract: supervised() against a closed form, chunked fit, faults
# ------------------------------------------------------------------------------------------------


def test_supervised_sgd_step_matches_the_closed_form_gradient():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.normal(size=B).astype(np.float32)
    params = {"w": rng.normal(size=D).astype(np.float32), "b": np.float32(rng.normal())}

    def loss_with_aux(p, batch):
        loss = _loss(p, batch)
        return loss, {"loss_x2": 2 * loss}

    step = train.supervised(loss_with_aux, optax.sgd(0.1), has_aux=True)
    state, metrics = step.update(step.init(params), (x, y))
    residual = x.astype(np.float64) @ params["w"] + params["b"] - y
    grad_w, grad_b = 2 / B * x.T @ residual, 2 * residual.mean()
    np.testing.assert_allclose(state.params["w"], params["w"] - 0.1 * grad_w, rtol=1e-5)
    np.testing.assert_allclose(state.params["b"], params["b"] - 0.1 * grad_b, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], np.mean(residual**2), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_x2"], 2 * np.mean(residual**2), rtol=1e-5)
    norm = np.sqrt(np.sum(grad_w**2) + grad_b**2)
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)

    # Clipped: the applied SGD update has norm lr * clip_norm, in the gradient's direction.
    clipped = train.supervised(_loss, optax.sgd(0.1), clip_norm=0.01 * norm)
    state, _ = clipped.update(clipped.init(params), (x, y))
    np.testing.assert_allclose(
        state.params["w"], params["w"] - 0.1 * 0.01 * grad_w, rtol=1e-4, atol=1e-7
    )
    with pytest.raises(ValueError, match="clip_norm must be a finite positive number"):
        train.supervised(_loss, optax.sgd(0.1), clip_norm=float("nan"))


def test_supervised_skip_nonfinite_keeps_params_and_adam_state_on_a_nan_batch():
    """A planted NaN batch: the guarded step applies nothing and counts it; a finite batch
    then trains as a step that never saw the bad one (Adam's moments and count kept)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.normal(size=B).astype(np.float32)
    params = {"w": rng.normal(size=D).astype(np.float32), "b": np.float32(rng.normal())}
    bad_x = x.copy()
    bad_x[3, 1] = np.nan
    guarded = train.supervised(_loss, optax.adam(0.05), skip_nonfinite=True)
    plain = train.supervised(_loss, optax.adam(0.05))

    state0 = guarded.init(params)
    skipped_state, metrics = guarded.update(state0, (bad_x, y))
    assert int(metrics["skipped"]) == 1 and np.isnan(metrics["grad_norm"])
    for got, want in zip(jax.tree.leaves(skipped_state), jax.tree.leaves(state0), strict=True):
        np.testing.assert_array_equal(got, want)
    # The plain step lets the NaN through (what the guard is for).
    assert np.isnan(plain.update(plain.init(params), (bad_x, y))[0].params["w"]).all()

    after_skip, metrics = guarded.update(skipped_state, (x, y))
    never_bad, _ = plain.update(plain.init(params), (x, y))
    assert int(metrics["skipped"]) == 0
    for got, want in zip(jax.tree.leaves(after_skip), jax.tree.leaves(never_bad), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # An overflowing loss (finite inputs) is skipped too.
    _, metrics = guarded.update(state0, (x * np.float32(1e30), y))
    assert int(metrics["skipped"]) == 1


def _pure_batch(step):
    """A traceable batch of the regression task at ``step`` (for steps_per_call > 1)."""
    kx, kn = jax.random.split(jax.random.fold_in(jax.random.key(SEED), step))
    x = jax.random.normal(kx, (B, D))
    return x, x @ TRUE_W + 0.1 * jax.random.normal(kn, (B,))


CHUNKED = dict(num_steps=30, steps_per_call=5, checkpoint_every=10, log_every=5)


def test_chunked_fit_matches_single_steps_and_counts_optimizer_steps(tmp_path):
    single = train.fit(_step, _init_state(), _pure_batch, num_steps=30, show_progress=False)
    with runlog.JsonlWriter(tmp_path / "m.jsonl") as writer:
        chunked = train.fit(
            _step, _init_state(), _pure_batch, workdir=tmp_path, writer=writer,
            show_progress=False, **CHUNKED,
        )  # fmt: skip
    # Two compiled programs (a scan and single steps): equal to float32 rounding, not bitwise.
    chex_close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree.map(chex_close, chunked["params"], single["params"])
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [20, 30]  # optimizer steps, not calls
    steps = [json.loads(s)["step"] for s in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_steps": 12, "steps_per_call": 5}, "num_steps=12 must be a multiple of"),
        ({"num_steps": 10, "steps_per_call": 5, "log_every": 3}, "log_every=3 must be a multi"),
        ({"num_steps": 10, "steps_per_call": 0}, "steps_per_call must be a positive int"),
        ({"num_steps": 10, "checkpoint_every": 0}, "checkpoint_every must be a positive int"),
        ({"num_steps": -1}, "num_steps must be an int >= 0"),
    ],
)
def test_bad_counts_are_one_line_errors_before_any_step(kwargs, message):
    calls: list[int] = []
    with pytest.raises(ValueError, match=message):
        train.fit(_step, _init_state(), _make_batch_fn(calls), show_progress=False, **kwargs)
    assert calls == []


def test_sigint_saves_and_the_resumed_run_is_bit_identical(tmp_path):
    reference = train.fit(_step, _init_state(), _pure_batch, show_progress=False, **CHUNKED)

    class SignalAt15(runlog.MetricWriter):
        def write_scalars(self, step, scalars):
            if step == 15:
                os.kill(os.getpid(), signal.SIGINT)

        def write_image(self, step, name, image):
            pass

        def flush(self):
            pass

        def close(self):
            pass

    with pytest.raises(train.Interrupted) as info:
        train.fit(
            _step, _init_state(), _pure_batch, workdir=tmp_path, writer=SignalAt15(),
            show_progress=False, **CHUNKED,
        )  # fmt: skip
    assert "SIGINT: stopped after step 15 of 30" in str(info.value)
    assert "\n" not in str(info.value)
    assert Checkpointer(tmp_path / "ckpt").latest_step() == 15
    assert not (tmp_path / "fit.lock").exists()
    resumed = train.fit(_step, _init_state(), _pure_batch, workdir=tmp_path, **CHUNKED)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _data_files(step_dir):
    return sorted(
        (p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )


def _corrupt(step_dir, how):
    if how == "zero_byte":
        for p in _data_files(step_dir):
            p.write_bytes(b"")
    elif how == "truncated":
        for p in _data_files(step_dir):
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif how == "garbled":
        p = _data_files(step_dir)[-1]
        data = bytearray(p.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = np.random.default_rng(0).bytes(64)
        p.write_bytes(bytes(data))
    elif how == "unsealed_zero_byte":  # killed before sealing: orbax itself reads it and fails
        (step_dir / "manifest.sha256.json").unlink()
        for p in _data_files(step_dir):
            p.write_bytes(b"")
    elif how == "missing_metadata":
        (step_dir / "default" / "_METADATA").unlink()
    elif how == "empty_folder":
        for p in sorted(step_dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()


@pytest.mark.parametrize(
    "how",
    ["zero_byte", "truncated", "garbled", "unsealed_zero_byte", "missing_metadata", "empty_folder"],
)
def test_a_corrupted_newest_checkpoint_falls_back_to_the_one_before(tmp_path, how, caplog):
    kwargs = dict(checkpoint_every=10, log_every=10, show_progress=False)
    calls: list[int] = []
    reference = train.fit(_step, _init_state(), _make_batch_fn(calls), num_steps=30, **kwargs)
    train.fit(_step, _init_state(), _make_batch_fn([]), num_steps=20, workdir=tmp_path, **kwargs)
    _corrupt(tmp_path / "ckpt" / "20", how)
    calls = []
    with caplog.at_level(logging.WARNING, logger="metattt.ckpt"):
        resumed = train.fit(
            _step, _init_state(), _make_batch_fn(calls), num_steps=30, workdir=tmp_path, **kwargs
        )
    assert calls == list(range(10, 30))  # from the checkpoint before the corrupted one
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    warnings = [r.getMessage() for r in caplog.records if "is unusable" in r.getMessage()]
    assert len(warnings) == 1 and "/20 is unusable" in warnings[0], caplog.text
    assert len(warnings[0].splitlines()) == 1
    assert (tmp_path / "ckpt_rejected" / "20").is_dir()  # kept, not deleted


def test_a_second_live_run_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    lock = tmp_path / "fit.lock"
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process
    with pytest.raises(train.WorkdirInUse, match="is in use by process"):
        train.fit(_step, _init_state(), _make_batch_fn([]), num_steps=2, workdir=tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid}")
    train.fit(_step, _init_state(), _make_batch_fn([]), num_steps=2, workdir=tmp_path)
    assert not lock.exists()


def test_runs_that_differ_only_in_data_share_one_compilation():
    traces: list[int] = []

    def batch_fn(key, step):
        traces.append(1)  # runs once per trace of the compiled call
        kx, kn = jax.random.split(jax.random.fold_in(key, step))
        x = jax.random.normal(kx, (B, D))
        return x, x @ TRUE_W + 0.1 * jax.random.normal(kn, (B,))

    finals = [
        train.fit(
            _step,
            _init_state(),
            batch_fn,
            num_steps=10,
            steps_per_call=5,
            log_every=5,
            show_progress=False,
            data=jax.random.key(seed),
        )  # fmt: skip
        for seed in (1, 2)
    ]
    assert len(traces) == 1
    assert not np.allclose(finals[0]["params"]["w"], finals[1]["params"]["w"])


def test_stacked_host_batches_resume_bit_identically(tmp_path):
    def stacked(first, fail_at=None):
        if first == fail_at:
            raise _Interrupt(f"interrupted at step {first}")
        steps = [_make_batch_fn([])(s) for s in range(first, first + 5)]
        return jax.tree.map(lambda *b: np.stack(b), *steps)

    single = train.fit(_step, _init_state(), _make_batch_fn([]), num_steps=30, log_every=5)
    whole = train.fit(_step, _init_state(), stacked, stacked=True, **CHUNKED)
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), whole, single
    )  # a scan over stacked batches vs single steps: two programs, float32 tolerance
    with pytest.raises(_Interrupt):
        train.fit(
            _step, _init_state(), functools.partial(stacked, fail_at=15), stacked=True,
            workdir=tmp_path, **CHUNKED,
        )  # fmt: skip
    assert Checkpointer(tmp_path / "ckpt").latest_step() == 10
    resumed = train.fit(_step, _init_state(), stacked, stacked=True, workdir=tmp_path, **CHUNKED)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_supervised_with_model_state_carries_it_and_trains_as_without():
    rng = np.random.default_rng(3)
    batch = (rng.normal(size=(B, D)).astype(np.float32), rng.normal(size=B).astype(np.float32))
    params = {"w": rng.normal(size=D).astype(np.float32), "b": np.float32(0.5)}

    def with_state(p, count, batch):
        return _loss(p, batch), count + 1  # e.g. a running statistic the forward pass updates

    stateful = train.supervised(with_state, optax.adam(0.1), has_state=True)
    plain = train.supervised(_loss, optax.adam(0.1))
    s, p = stateful.init(params, np.int32(7)), plain.init(params)
    for _ in range(2):
        s, ms = stateful.update(s, batch)
        p, mp = plain.update(p, batch)
    assert int(s.model_state) == 9 and p.model_state is None
    np.testing.assert_allclose(s.params["w"], p.params["w"], rtol=1e-6)
    np.testing.assert_allclose(ms["loss"], mp["loss"], rtol=1e-6)
