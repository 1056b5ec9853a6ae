"""The training contract: a step is ``Step(init, update)``; :func:`fit` runs one, resumably.

Every loop that trains something in metattt has one shape, that of an optax transformation::

    step = train.supervised(loss_fn, optax.adamw(1e-3), clip_norm=1.0)   # Step(init, update)
    state = step.init(params)                                            # a pytree
    state, metrics = step.update(state, batch)                           # pure, jittable
    state = train.fit(step, state, batch_fn, num_steps=N, steps_per_call=100, workdir=wd)

:func:`supervised` builds the ordinary step; :func:`metattt.meta.make_meta_step`, ATTD's outer
step and the adapter step return the same :class:`Step`. ``metrics`` is a flat mapping (or a
NamedTuple) of scalars.

:func:`fit` is the edge of a run, where the side effects live: it chunks ``steps_per_call``
steps into one compiled ``lax.scan``, logs interval means, checkpoints, resumes and shows
progress. The data is ``batch_fn(step)``, a pure function of the step number (the seed bound in
by the caller, e.g. ``jax.random.fold_in(key, step)``); nothing else carries over from one step
to the next, so a run that is killed and restarted on its workdir ends bit-identical to one
that never stopped.

Step numbering counts optimizer steps, whatever ``steps_per_call`` is: steps
``0 .. num_steps - 1`` run; after step ``i`` the run has *done* ``i + 1``, and that count numbers
the checkpoint (``workdir/ckpt/<done>/``), the logged metrics and the progress bar.

Faults a run survives: a kill at any point (the restart resumes from the newest checkpoint,
metrics up to it are on disk because writers are flushed before every save); a corrupted newest
checkpoint (it is refused and moved aside, the one before it is used; see
:meth:`metattt.ckpt.Checkpointer.restore_verified`); SIGINT or SIGTERM (a checkpoint is saved,
then :class:`Interrupted` is raised, whose message is one line); a second run on the same
workdir (refused while the first is alive; the lock of a dead process is taken over).

A run started as several JAX processes (``jax.distributed.initialize``) calls :func:`fit` in
every process with the same arguments: the steps and the checkpoints are collective, process 0
alone holds the lock and shows progress, and a signal to any process stops all of them after
the same step (:mod:`metattt.multihost`). Give process 0 the metric writer
(:func:`metattt.runlog.create_writer` discards on the others).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metattt import ckpt as ckpt_lib
from metattt import multihost, runlog
from metattt.inner import check_clip_norm

__all__ = [
    "Interrupted",
    "Step",
    "TrainState",
    "WorkdirInUse",
    "apply_if_finite",
    "check_counts",
    "fit",
    "supervised",
    "workdir_lock",
]

logger = logging.getLogger(__name__)

PyTree = Any


class TrainState(NamedTuple):
    """The state of an ordinary optimizer step: parameters, optax state and model state.

    ``model_state`` holds what the model updates in its forward pass but no gradient trains
    (e.g. normalisation running statistics); None for stateless models.
    """

    params: PyTree
    opt_state: PyTree
    model_state: PyTree = None


class Step(NamedTuple):
    """A training algorithm as two pure functions (the shape of ``optax.GradientTransformation``).

    Attributes:
      init: ``params -> state``.
      update: ``(state, batch) -> (state, metrics)``; metrics a flat mapping or NamedTuple of
        scalars.
    """

    init: Callable[[PyTree], Any]
    update: Callable[[Any, Any], tuple[Any, Any]]


class Interrupted(Exception):
    """A run stopped by SIGINT or SIGTERM after saving its checkpoint; the message is one line."""


class WorkdirInUse(RuntimeError):
    """Another live process is running :func:`fit` on this workdir."""


def supervised(
    loss_fn: Callable[..., Any],
    opt: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    has_state: bool = False,
    clip_norm: float | None = None,
    skip_nonfinite: bool = False,
    jit: bool = True,
) -> Step:
    """The ordinary step: the gradient of ``loss_fn`` fed to an optax rule.

    ``state`` is :class:`TrainState`; ``metrics`` holds ``loss``, ``grad_norm`` (the global norm
    of the gradient before clipping; NaN when the gradient is not finite), with
    ``skip_nonfinite`` ``skipped`` (1 when the step's update was not applied) and, with
    ``has_aux``, the entries of the loss's auxiliary mapping.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` or, with ``has_aux``, ``-> (loss, aux)`` where
        ``aux`` is a mapping or NamedTuple of scalars (logged). With ``has_state`` it is
        ``loss_fn(params, model_state, batch) -> (loss, new_model_state)`` (with ``has_aux``:
        ``-> (loss, (new_model_state, aux))``), and ``init(params, model_state)``.
      opt: the optax rule.
      has_aux: see ``loss_fn``.
      has_state: see ``loss_fn``.
      clip_norm: clip the gradient to this global norm first (None: no clipping).
      skip_nonfinite: static; a step whose loss or gradient is not finite is not applied
        (parameters and optimizer state are kept, see :func:`apply_if_finite`) and is counted
        in ``metrics["skipped"]``. Off by default: an ordinary run should stop on NaN where a
        meta-learner's outer step (which differentiates through an inner loop that may
        diverge on some batches) should skip it.
      jit: compile ``update`` (turn off only to debug).

    Returns:
      A :class:`Step`.

    Raises:
      ValueError: ``clip_norm`` is not None and not a finite positive number.
    """
    check_clip_norm(clip_norm)
    if clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux or has_state)

    def init(params: PyTree, model_state: PyTree = None) -> TrainState:
        return TrainState(params, opt.init(params), model_state)

    def update(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        model_state = state.model_state
        if has_state:
            (loss, out), grads = value_and_grad(state.params, model_state, batch)
            model_state, aux = out if has_aux else (out, {})
        else:
            out, grads = value_and_grad(state.params, batch)
            loss, aux = out if has_aux else (out, {})
        aux = _as_dict(aux)
        if not isinstance(aux, Mapping):
            raise TypeError(
                f"with has_aux=True, loss_fn must return (loss, aux) with aux a mapping or "
                f"NamedTuple of scalars, got an aux of type {type(aux).__name__}"
            )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, opt_state = apply_if_finite(finite, updates, opt_state, state.opt_state)
            model_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), model_state, state.model_state
            )
            metrics["skipped"] = (~finite).astype(jnp.int32)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, model_state), {**metrics, **aux}

    return Step(init, jax.jit(update) if jit else update)


def apply_if_finite(
    finite: jax.Array, updates: PyTree, new_opt_state: PyTree, opt_state: PyTree
) -> tuple[PyTree, PyTree]:
    """The updates and optimizer state of a step, or zero updates and the old state when
    ``finite`` is False: a skipped step leaves parameters and optimizer state as they were
    (unlike ``optax.apply_if_finite``, no state is added, so checkpoints keep their layout).
    A NaN update becomes 0 rather than propagating (``where``, not a multiplication)."""
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_opt_state, opt_state)
    return updates, opt_state


def _as_dict(metrics: Any) -> Mapping[str, Any]:
    return metrics._asdict() if hasattr(metrics, "_asdict") else metrics


def _mean_metrics(buffer: list[Mapping[str, Any]]) -> dict[str, float]:
    """Means of each metric over a logging interval, with one device-to-host transfer.

    Each entry holds one step's scalars or a compiled call's per-step vectors.
    """
    host = jax.device_get(buffer)
    return {
        k: float(np.mean(np.concatenate([np.ravel(np.asarray(m[k], np.float64)) for m in host])))
        for k in host[0]
    }


def check_counts(
    num_steps: int,
    steps_per_call: int = 1,
    checkpoint_every: int = 1,
    log_every: int = 1,
    *,
    prefix: str = "",
) -> None:
    """Raises a one-line ValueError for :func:`fit` counts that are bad, before any work.

    Each must be a positive int (``num_steps`` may be 0), and ``num_steps``,
    ``checkpoint_every`` and ``log_every`` multiples of ``steps_per_call``. ``prefix`` is put
    before each name in the message (e.g. ``"train."`` to name a config's keys).
    """
    for name, value in (
        ("steps_per_call", steps_per_call),
        ("checkpoint_every", checkpoint_every),
        ("log_every", log_every),
    ):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{prefix}{name} must be a positive int, got {value!r}")
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"{prefix}num_steps must be an int >= 0, got {num_steps!r}")
    for name, value in (
        ("num_steps", num_steps),
        ("checkpoint_every", checkpoint_every),
        ("log_every", log_every),
    ):
        if value % steps_per_call:
            raise ValueError(
                f"{prefix}{name}={value} must be a multiple of {prefix}steps_per_call="
                f"{steps_per_call} (steps run {steps_per_call} per compiled call)"
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(path: str, workdir: str) -> None:
    """Creates the lock file ``path`` recording ``host pid``, taking over a dead process's."""
    me = f"{socket.gethostname()} {os.getpid()}"
    os.makedirs(workdir, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    host, _, pid = f.read().strip().partition(" ")
            except FileNotFoundError:
                continue  # released in between: try again
            if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                logger.warning("Taking over the lock %s of dead process %s.", path, pid)
                os.remove(path)
                continue
            raise WorkdirInUse(
                f"workdir {workdir} is in use by process {pid or '?'} on {host or '?'} (lock "
                f"file {path}); wait for that run to end, or delete the lock if it is gone"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        return


@contextlib.contextmanager
def workdir_lock(workdir: str, name: str = "fit.lock") -> Iterator[None]:
    """Holds ``workdir/<name>`` for the block; refuses while another live process holds it.

    :func:`fit` holds ``fit.lock`` in its own workdir; an entry point may hold another name
    over a whole run (``experiments.run`` holds ``run.lock``, so that a second launch is
    refused before it writes anything).

    The lock file records ``host pid``; a lock left by a dead process on this host (a run
    killed with SIGKILL) is taken over with a warning. In a multi-process run process 0 takes
    the lock for the whole launch and every process learns whether it got it (the launch's
    other processes are not "another run"; a second launch is refused on all its processes).

    Raises:
      WorkdirInUse: a live process holds the lock.
    """
    path = os.path.join(workdir, name)
    multihost.on_primary(lambda: _acquire(path, workdir), (WorkdirInUse,))
    try:
        yield
    finally:
        if multihost.is_primary():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


@contextlib.contextmanager
def _signals_to_flag() -> Iterator[dict[str, str | None]]:
    """While active, SIGINT and SIGTERM set ``flag["signal"]`` instead of stopping the process.

    Only in the main thread (Python allows handlers nowhere else); elsewhere the flag never
    sets and signals keep their usual effect.
    """
    flag: dict[str, str | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        del frame
        flag["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@functools.lru_cache(maxsize=64)
def _chunked(
    update: Callable, batch_fn: Callable | None, steps_per_call: int, with_data: bool, jit: Callable
):
    """``steps_per_call`` steps as one compiled ``lax.scan``; metrics come back per step.

    ``batch_fn`` None: the call scans over host-made stacked batches (``stacked=True``).
    Cached on its arguments, so a later :func:`fit` with the same ``update`` and ``batch_fn``
    (e.g. another seed, whose key travels in ``data``) reuses the compiled program.
    """

    @jit
    def call(state, data, first, stacked):
        def body(s, x):
            if batch_fn is None:
                batch = x
            else:
                batch = batch_fn(data, x) if with_data else batch_fn(x)
            s, metrics = update(s, batch)
            return s, _as_dict(metrics)

        xs = stacked if batch_fn is None else first + jnp.arange(steps_per_call)
        return jax.lax.scan(body, state, xs)

    return call


def fit(
    step: Step | Callable[[Any, Any], tuple[Any, Any]],
    state: Any,
    batch_fn: Callable[[Any], Any],
    *,
    num_steps: int,
    steps_per_call: int = 1,
    workdir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1000,
    log_every: int = 100,
    writer: runlog.MetricWriter | None = None,
    show_progress: bool = True,
    max_to_keep: int = 2,
    data: Any = None,
    stacked: bool = False,
    jit: Callable = jax.jit,
) -> Any:
    """Runs ``num_steps`` steps of ``step``, resuming from ``workdir``'s newest good checkpoint.

    Each step is ``state, metrics = step.update(state, batch_fn(i))``. With ``steps_per_call``
    = C > 1, C steps run as one compiled ``lax.scan`` and ``batch_fn`` is traced (it receives a
    traced int32 step and must be a jax function of it); with C = 1 it is called on the host
    with a Python int and may do anything pure. Every ``log_every`` done steps the metrics'
    means over the interval go to ``writer`` (flushed) and the progress bar. With a
    ``workdir``, the state is checkpointed every ``checkpoint_every`` done steps, after the last
    step and on SIGINT/SIGTERM; a later call on the same ``workdir`` restores the newest good
    checkpoint (``state`` is the template) and continues after it.

    Args:
      step: a :class:`Step` (its ``update`` is used) or an ``update`` function.
      state: the initial state, e.g. ``step.init(params)``; on resume only the template the
        checkpoint is restored into.
      batch_fn: ``step -> batch``; a pure function of the step for resumption to be exact.
      num_steps: the total number of steps of the run, counting those done before a resume.
      steps_per_call: C, the steps per compiled call; ``num_steps``, ``checkpoint_every`` and
        ``log_every`` must be multiples of it.
      workdir: where checkpoints (``workdir/ckpt``) and the lock go; None: no checkpoints.
      checkpoint_every: save after every this many done steps.
      log_every: log the metrics' means after every this many done steps.
      writer: where metrics go; None logs nothing. It is flushed, not closed.
      show_progress: show a progress bar (``METATTT_NO_PROGRESS=1`` hides it anyway).
      max_to_keep: how many checkpoints to keep.
      data: optional arrays ``batch_fn`` draws from (a PRNG key, a dataset, a system's
        matrices); when given, batches are ``batch_fn(data, step)`` and ``data`` is an
        argument of the compiled call, not a constant in it, so runs that differ only in
        ``data`` (seeds) share one compilation.
      stacked: ``batch_fn(first)`` is called on the host once per compiled call and returns
        the batches of steps ``first .. first + C - 1`` stacked on a leading axis of size C
        (for data made by host code, e.g. NumPy; ``data`` is then not used).
      jit: what compiles a chunk of steps (e.g. ``functools.partial(jax.jit,
        compiler_options=...)``); with ``steps_per_call`` = 1 and no ``stacked``, the step's
        own ``update`` is called as it is.

    Returns:
      The state after ``num_steps`` steps.

    Raises:
      ValueError: a count that is not positive or not a multiple of ``steps_per_call``, or a
        checkpoint in ``workdir`` already past ``num_steps``.
      WorkdirInUse: another live process is fitting in ``workdir``.
      Interrupted: SIGINT or SIGTERM arrived; the checkpoint of the last done step is saved.
    """
    check_counts(num_steps, steps_per_call, checkpoint_every, log_every)
    if stacked and data is not None:
        raise ValueError("stacked batches are made on the host: pass data=None with stacked=True")
    update = step.update if isinstance(step, Step) else step
    run = functools.partial(
        _fit,
        update,
        state,
        batch_fn,
        data,
        num_steps,
        steps_per_call,
        stacked=stacked,
        jit=jit,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        writer=writer,
        show_progress=show_progress,
    )
    if workdir is None:
        return run(None)
    workdir = os.path.abspath(os.fspath(workdir))
    with workdir_lock(workdir):
        checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "ckpt"), max_to_keep=max_to_keep)
        try:
            return run(checkpointer)
        finally:
            checkpointer.close()  # waits: the last started save is complete even on an error


def _fit(
    update,
    state,
    batch_fn,
    data,
    num_steps,
    steps_per_call,
    checkpointer,
    *,
    stacked,
    jit,
    checkpoint_every,
    log_every,
    writer,
    show_progress,
):
    """The loop of :func:`fit`, with its checks done and its lock held."""
    start = 0
    last_saved = None  # the step of the newest checkpoint, never saved twice
    if checkpointer is not None:
        template = {"state": state, "step": np.asarray(0, np.int64)}

        def step_matches(folder_step, restored):
            if int(restored["step"]) != folder_step:
                return f"it records step {int(restored['step'])}"
            return None

        found = checkpointer.restore_verified(template, check=step_matches)
        if found is not None:
            last_saved, restored = found
            state, start = restored["state"], last_saved
            if start > num_steps:
                raise ValueError(
                    f"{checkpointer.directory} holds a checkpoint at step {start}, past "
                    f"num_steps={num_steps}; use a new workdir or a larger num_steps"
                )
            if start % steps_per_call:
                raise ValueError(
                    f"{checkpointer.directory} holds a checkpoint at step {start}, not a multiple "
                    f"of steps_per_call={steps_per_call}; resume with the steps_per_call it was "
                    "saved with"
                )
            logger.info(
                "Resumed from %s at step %d of %d.", checkpointer.directory, start, num_steps
            )

    with_data = data is not None
    call = None
    if stacked:
        call = _chunked(update, None, steps_per_call, False, jit)
    elif steps_per_call > 1:
        call = _chunked(update, batch_fn, steps_per_call, with_data, jit)
    buffer: list[Mapping[str, Any]] = []
    # Several processes stop together: a signal to one is shared after each compiled call.
    several = jax.process_count() > 1
    bar = runlog.progress(
        total=num_steps,
        initial=start,
        desc="fit",
        disable=not show_progress or not multihost.is_primary(),
    )

    def log(done: int) -> None:
        means = _mean_metrics(buffer)
        buffer.clear()
        if writer is not None:
            writer.write_scalars(done, means)
            writer.flush()
        bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)

    def save(done: int) -> None:
        nonlocal last_saved
        if writer is not None:
            writer.flush()  # metrics up to the checkpoint survive a kill right after it
        payload = {"state": state, "step": np.asarray(done, np.int64)}
        checkpointer.save(done, payload, force=True)
        last_saved = done

    try:
        with _signals_to_flag() as flag:
            for first in range(start, num_steps, steps_per_call):
                if stacked:
                    state, metrics = call(state, None, np.int32(first), batch_fn(first))
                elif call is not None:
                    state, metrics = call(state, data, np.int32(first), None)
                else:
                    batch = batch_fn(data, first) if with_data else batch_fn(first)
                    state, metrics = update(state, batch)
                done = first + steps_per_call
                buffer.append(_as_dict(metrics))
                if done % log_every == 0:
                    log(done)
                if checkpointer is not None and done % checkpoint_every == 0:
                    save(done)
                bar.update(steps_per_call)
                received = flag["signal"]  # one reading: a later signal waits for the next call
                stop = received is not None
                if several:
                    stop = multihost.any_process(stop)
                if stop:
                    if buffer:
                        log(done)
                    where = "no workdir, nothing saved"
                    if checkpointer is not None:
                        if last_saved != done:
                            save(done)
                        checkpointer.wait()
                        where = f"checkpoint saved in {checkpointer.directory}; rerun to resume"
                    received = received or "a signal to another process"
                    raise Interrupted(
                        f"{received}: stopped after step {done} of {num_steps} ({where})"
                    )
        if buffer:
            log(num_steps)
        if checkpointer is not None and last_saved != num_steps:
            save(num_steps)
    finally:
        bar.close()
        if writer is not None:
            writer.flush()
    return state
