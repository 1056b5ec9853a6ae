"""One of the two processes of ``test_multiprocess.py``: the sharded meta-step, multi-process.

    python -m tests.metattt.two_process_meta_step PROCESS_ID PORT OUT_DIR

Starts JAX's distributed runtime with a coordinator on ``localhost:PORT`` (process 0 hosts it),
two processes, CPU collectives over gloo and the local CPU devices ``XLA_FLAGS`` asks for; builds
a mesh over every process's devices; runs one :func:`metattt.meta.make_meta_step` update on the
sinusoid MAML problem of :func:`problem`; and writes the new parameters and metrics to
``OUT_DIR/process_<ID>.npz``. The test runs the same problem in one process and compares.
Then it records what the processes agree on (:func:`agreement`) in
``OUT_DIR/agreement_<ID>.npz``.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys

import numpy as np

NUM_PROCESSES = 2
META_BATCH = 8  # tasks: 2 per device with 2 devices per process
OUTER_LR = 0.5  # plain SGD, so new params = params - OUTER_LR * meta-gradient


def problem():
    """``(params, tasks, meta_loss)``: a 1-5-1 tanh MLP's parameters (NumPy, random), a batch of
    sinusoid tasks (NumPy) and the MAML meta-loss with 2 inner SGD steps on every leaf."""
    import jax
    import jax.numpy as jnp
    import optax

    from metattt import meta
    from metattt import params as P
    from metattt.data import sinusoid
    from metattt.inner import InnerConfig

    rng = np.random.default_rng(11)
    width = 5
    params = {
        "l0": {"kernel": rng.standard_normal((1, width)), "bias": 0.3 * rng.standard_normal(width)},
        "l1": {
            "kernel": rng.standard_normal((width, 1)) / np.sqrt(width),
            "bias": 0.3 * rng.standard_normal(1),
        },
    }
    params = jax.tree.map(lambda a: a.astype(np.float32), params)
    tasks = jax.tree.map(np.asarray, sinusoid.sample_tasks(jax.random.key(12), META_BATCH, 5, 5))

    def loss_fn(p, batch):
        x, y = batch
        h = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"])
        return jnp.mean((h @ p["l1"]["kernel"] + p["l1"]["bias"] - y) ** 2)

    inner = InnerConfig(optax.sgd(0.05), max_steps=2)
    meta_loss = functools.partial(
        meta.maml_loss, loss_fn, mask=P.select(params, "re:."), inner=inner
    )
    return params, tasks, meta_loss


def flat(tree) -> dict[str, np.ndarray]:
    """``{"l0/kernel": array, ...}``: a params tree as named NumPy arrays (for ``np.savez``)."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): np.asarray(leaf) for path, leaf in leaves}


def main(process_id: int, port: int, out_dir: str) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=NUM_PROCESSES,
        process_id=process_id,
        initialization_timeout=60,
    )
    import optax

    from metattt import meta

    params, tasks, meta_loss = problem()  # after initialize: no JAX computation before it
    mesh = jax.make_mesh((jax.device_count(),), ("tasks",))
    step = meta.make_meta_step(meta_loss, optax.sgd(OUTER_LR), mesh=mesh)
    state, metrics = step.update(step.init(params), tasks)
    np.savez(
        os.path.join(out_dir, f"process_{process_id}.npz"),
        meta_loss=np.asarray(metrics.meta_loss),
        grad_norm=np.asarray(metrics.grad_norm),
        devices=np.array([jax.device_count(), jax.local_device_count(), jax.process_count()]),
        **flat(state.params),
    )
    np.savez(os.path.join(out_dir, f"agreement_{process_id}.npz"), **agreement(mesh, out_dir))
    jax.distributed.shutdown()


def agreement(mesh, out_dir: str) -> dict[str, np.ndarray]:
    """What the processes agree on (:mod:`metattt.multihost`), as seen by this process: a flag
    raised by process 1 only; the text of a lock that process 0 takes for both, read inside
    it; the refusal of a lock held by a live process (``OUT_DIR/held/fit.lock``, written by the
    test); an array sharded over both processes, checkpointed by both and restored; and a fit
    stopped by a signal to one process (:func:`interrupted_fit`). Folders go into
    ``OUT_DIR/agreement/``, emptied first."""
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from metattt import ckpt, multihost, train

    base = os.path.join(out_dir, "agreement")  # this launch's folders, fresh
    if multihost.is_primary():
        shutil.rmtree(base, ignore_errors=True)
    multihost.barrier("tests: the folders are fresh")
    raised = [multihost.any_process(jax.process_index() == 1), multihost.any_process(False)]
    free = os.path.join(base, "free")
    with train.workdir_lock(free):
        with open(os.path.join(free, "fit.lock"), encoding="utf-8") as f:
            lock_text = f.read()
        multihost.barrier("tests: every process has read the lock")
    refused = ""
    try:
        with train.workdir_lock(os.path.join(out_dir, "held")):
            pass
    except train.WorkdirInUse as error:
        refused = str(error)
    rows = np.arange(16, dtype=np.float32).reshape(8, 2) + 0.5
    sharded = jax.device_put(rows, NamedSharding(mesh, PartitionSpec("tasks")))
    with ckpt.Checkpointer(os.path.join(base, "ckpt")) as checkpointer:
        checkpointer.save(3, {"x": sharded})
        checkpointer.wait()
        found = checkpointer.restore_verified({"x": sharded})
    restored = multihost_utils.process_allgather(found[1]["x"], tiled=True)
    message, resumed, straight = interrupted_fit(mesh, os.path.join(base, "fit"))
    return {
        "interrupted": np.array(message),
        "resumed": resumed,
        "straight": straight,
        "raised": np.array(raised),
        "lock_text": np.array(lock_text),
        "refused": np.array(refused),
        "restored_step": np.array(found[0]),
        "restored": np.asarray(restored),
        "restored_is_sharded": np.array(not found[1]["x"].is_fully_addressable),
    }


def interrupted_fit(mesh, workdir: str) -> tuple[str, np.ndarray, np.ndarray]:
    """A data-parallel linear regression fitted for 6 steps, interrupted by a SIGTERM that only
    process 1 receives (while it makes step 2's batch), then resumed; and the same fit without
    a stop. Returns this process's ``Interrupted`` message and the two final weights."""
    import signal

    import jax
    import jax.numpy as jnp
    import optax

    from metattt import sharding, train

    def loss_fn(w, batch):
        x, y = batch
        return jnp.mean((x @ w - y) ** 2)

    def batch_fn(i):  # the global batch of step i, the same in every process
        data = np.random.default_rng(i).standard_normal((8, 4)).astype(np.float32)
        return data[:, :3], data[:, 3]

    def signalling_batch_fn(i):
        if i == 2 and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch_fn(i)

    step = sharding.shard_step(train.supervised(loss_fn, optax.sgd(0.1)), mesh)
    w0 = np.random.default_rng(3).standard_normal(3).astype(np.float32)
    common = {"num_steps": 6, "show_progress": False, "checkpoint_every": 6, "log_every": 6}
    message = ""
    try:
        train.fit(step, step.init(w0), signalling_batch_fn, workdir=workdir, **common)
    except train.Interrupted as error:
        message = str(error)
    resumed = train.fit(step, step.init(w0), batch_fn, workdir=workdir, **common)
    straight = train.fit(step, step.init(w0), batch_fn, **common)
    return message, np.asarray(resumed.params), np.asarray(straight.params)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
