"""Config -> one Mamba per variant, trained on selective copying and scored -> ``results.json``.

Each (variant, seed) is two harness cells in ``workdir/VARIANT/seed_S``: the trained parameters
(:func:`experiments.harness.params_cell`; training checkpoints in ``run/``) and the score
(``eval.json``). With ``train.mesh_devices`` the batches are sharded over that many devices,
the parameters replicated; across several processes (``config.distributed``) that mesh spans
every process's devices, each process runs the same steps, and process 0 alone writes files
other than the checkpoints.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from attd.mamba import MambaConfig, init_mamba
from experiments import harness
from kernels_pallas.selective_scan import BACKENDS as SCAN_BACKENDS
from metattt import atomic, multihost, objectives, runlog, sharding, stats, train
from metattt.data import selective_copy

VARIANTS = ("selective", "time_invariant")
EVAL_SEED = 10_000  # evaluation sequences come from a key no training step uses


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    for variant in cfg.variants:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    if cfg.model.scan_backend not in SCAN_BACKENDS:
        raise ValueError(
            f"model.scan_backend must be one of {SCAN_BACKENDS}, got {cfg.model.scan_backend!r}"
        )
    if not 0 < cfg.task.num_tokens < cfg.task.length // 2:
        raise ValueError("task.num_tokens must be positive and below half the length")
    t = cfg.train
    train.check_counts(t.steps, t.steps_per_call, t.checkpoint_every, t.log_every, prefix="train.")
    sizes = {"train.batch": t.batch, "eval.num_examples": cfg.eval.num_examples}
    harness.check_mesh_devices("train.mesh_devices", t.mesh_devices, sizes, "examples")


def model_config(variant: str, cfg) -> MambaConfig:
    """The Mamba of ``variant``: its vocabulary is the data tokens, noise and the answer marker."""
    return MambaConfig(
        vocab_size=cfg.task.vocab + 1,
        d_model=cfg.model.d_model,
        n_layers=cfg.model.n_layers,
        d_state=cfg.model.d_state,
        selective=variant == "selective",
        scan_backend=cfg.model.scan_backend,
    )


def answer_accuracy(logits: jax.Array, batch: selective_copy.CopyBatch) -> float:
    """The fraction of answer slots whose most likely token is the token to copy."""
    return float(_accuracy(logits, batch))


def _accuracy(logits: jax.Array, batch: selective_copy.CopyBatch) -> jax.Array:
    correct = (jnp.argmax(logits, -1) == batch.targets) & batch.answer
    return jnp.sum(correct) / jnp.sum(batch.answer)


def train_and_eval(variant: str, cfg, seed: int, workdir: str) -> dict[str, float]:
    """Train one model variant with AdamW on fresh batches; its answer-slot accuracy and timing.

    The initial parameters come from ``seed`` and step s trains on the batch drawn from
    ``(seed, s)``; :func:`metattt.train.fit` checkpoints in ``workdir/run``, so a killed run
    resumes bit-identically, and the finished cells (trained parameters, score) are read back.
    """
    apply, params = init_mamba(model_config(variant, cfg), seed=seed)
    draw = functools.partial(
        selective_copy.sample,
        length=cfg.task.length,
        num_tokens=cfg.task.num_tokens,
        vocab=cfg.task.vocab,
    )
    key = jax.random.key(seed)

    def loss_fn(p, batch):
        inputs, targets, weight = batch
        logits = apply(p, inputs, head="lm")
        return objectives.cross_entropy(logits, targets, weight)

    step = train.supervised(loss_fn, optax.adamw(cfg.train.lr, weight_decay=0.01), jit=False)
    mesh = sharding.data_mesh(cfg.train.mesh_devices)
    step = sharding.shard_step(step, mesh)
    initial = step.init(params)

    def fit(run_dir: str):
        start = time.perf_counter()
        with runlog.create_writer(run_dir) as writer:
            state = train.fit(
                step,
                initial,
                lambda s: draw(jax.random.fold_in(key, s), cfg.train.batch),
                num_steps=cfg.train.steps,
                steps_per_call=cfg.train.steps_per_call,
                workdir=run_dir,
                checkpoint_every=cfg.train.checkpoint_every,
                log_every=cfg.train.log_every,
                writer=writer,
            )
        return state.params, {"train_seconds": time.perf_counter() - start}

    trained, info = harness.params_cell(workdir, initial.params, fit)

    def score():
        test = draw(jax.random.key(EVAL_SEED + seed), cfg.eval.num_examples)
        if mesh is not None:  # a global batch, split over the mesh like the training batches
            test = jax.device_put(
                test, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
            )
        accuracy = jax.jit(lambda p, b: _accuracy(apply(p, b.inputs, head="lm"), b))
        return {"accuracy": float(accuracy(trained, test))}

    return {**harness.json_cell(os.path.join(workdir, "eval.json"), score), **info}


def run(cfg, workdir: str) -> dict[str, Any]:
    """Train and score every variant on every seed (in ``workdir/VARIANT/seed_S``); write
    ``results.json``: per variant, the accuracy and the training seconds as
    :func:`metattt.stats.seed_summary` records (mean, 95% t-interval, per seed)."""
    validate(cfg)
    results = {}
    for v in cfg.variants:
        runs = [train_and_eval(v, cfg, s, os.path.join(workdir, v, f"seed_{s}")) for s in cfg.seeds]
        results[v] = {k: stats.seed_summary([r[k] for r in runs]) for k in runs[0]}
    if multihost.is_primary():  # every process of a multi-process run holds the same results
        atomic.write_json(os.path.join(workdir, "results.json"), results, indent=1)
    return results
