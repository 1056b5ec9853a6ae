"""Config -> backbone, drift streams and the TENT comparison per seed -> ``results.json``.

With ``backbone.mesh_devices`` the backbone's training batches are sharded over that many
devices, the parameters replicated; across several processes (``config.distributed``) that
mesh spans every process's devices and each process runs the same steps. The trained backbone
is then copied to each process's own device, so the streams and the TENT comparison run
unchanged (the same computation on every process), and process 0 alone writes files other
than the checkpoints.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import harness
from experiments.drift_adapters.report import plot_stream, stream_table
from experiments.drift_adapters.stream import (
    OBJECTIVES,
    StreamRunner,
    num_stream_steps,
    parse_method,
    schedule,
    summarize,
)
from experiments.drift_adapters.tent import summarize_tent, tent_comparison
from metattt import atomic, multihost, objectives, runlog, sharding, train
from metattt.data import digits_c
from metattt.models.digits_net import digits_net

logger = logging.getLogger(__name__)

BACKBONE_STEPS_PER_CALL = 100


@functools.lru_cache(maxsize=4)
def _backbone_program(
    hidden: int, momentum: float, lr: float, weight_decay: float, mesh_devices: int
):
    """``(net, step, mesh)``: the backbone and its AdamW cross-entropy step, the normalisation's
    running statistics carried as model state; with ``mesh_devices`` the step shards the batch
    over a data-parallel mesh of that many devices (all processes'), else ``mesh`` is None.
    Cached so that the seeds share a compilation."""
    net = digits_net(hidden=hidden, momentum=momentum)

    def loss_fn(params, norm, batch):
        x, y = batch
        logits, norm = net.apply(params, norm, x, batch_stats=True)
        return objectives.cross_entropy(logits, y), norm

    opt = optax.adamw(lr, weight_decay=weight_decay)
    step = train.supervised(loss_fn, opt, has_state=True, jit=False)
    mesh = sharding.data_mesh(mesh_devices)
    return net, sharding.shard_step(step, mesh), mesh


def train_backbone(x_train: np.ndarray, y_train: np.ndarray, seed: int, cfg, workdir: str):
    """Train the backbone with cross-entropy on clean images: ``(net, params, norm_stats)``.

    ``cfg.backbone.train_steps`` AdamW steps on batches drawn from ``(seed, 1)``, with the
    normalisation layer in training mode (batch statistics, running statistics updated);
    :func:`metattt.train.fit` checkpoints in ``workdir``, so a killed run resumes. With
    ``cfg.backbone.mesh_devices`` each batch is split over the mesh (the batch statistics are
    still those of the whole batch) and the trained arrays come back as process-local copies.
    """
    b = cfg.backbone
    net, step, mesh = _backbone_program(
        b.hidden, b.norm_momentum, b.lr, b.weight_decay, b.mesh_devices
    )
    params, norm = net.init(jax.random.key(seed))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    idx = np.stack(
        [rng.choice(len(x_train), b.batch_size, replace=False) for _ in range(b.train_steps)]
    )
    flat = x_train.reshape(len(x_train), -1)
    chunk = BACKBONE_STEPS_PER_CALL

    def batches(first: int):
        rows = idx[first : first + chunk]
        stacked = flat[rows], y_train[rows]
        return stacked if mesh is None else sharding.shard_stacked(stacked, mesh)

    memory = runlog.MemoryWriter()
    state = train.fit(
        step,
        step.init(params, norm),
        batches,
        stacked=True,
        num_steps=b.train_steps,
        steps_per_call=chunk,
        checkpoint_every=chunk,
        log_every=chunk,
        workdir=workdir,
        writer=memory,
        show_progress=False,
    )
    if memory.history:
        logger.info("backbone seed %d: last train loss %.4f", seed, memory.last("loss"))
    if mesh is None:
        return net, state.params, state.model_state
    return net, *sharding.local_copy((state.params, state.model_state))


# ------------------------------------------------------------------------------- drift stream


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    if not cfg.seeds:
        raise ValueError("config.seeds is empty")
    for name in (*cfg.stream.corruptions, *cfg.tent.corruptions):
        if name not in digits_c.CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; known: {list(digits_c.CORRUPTIONS)}")
    a = cfg.adapter
    for method in cfg.methods:
        kind, rank = parse_method(method)
        if rank > a.max_rank:
            raise ValueError(f"method {method!r}: rank exceeds adapter.max_rank = {a.max_rank}")
    for objective in cfg.objectives:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {list(OBJECTIVES)}")
    if not 1 <= a.init_rank <= a.max_rank:
        raise ValueError(
            f"adapter.init_rank ({a.init_rank}) must be in [1, adapter.max_rank = {a.max_rank}]"
        )
    if cfg.stream.clean_steps <= cfg.detector.warmup:
        raise ValueError(
            f"stream.clean_steps ({cfg.stream.clean_steps}) must exceed detector.warmup "
            f"({cfg.detector.warmup})"
        )
    b = cfg.backbone
    sizes = {"backbone.batch_size": b.batch_size}
    harness.check_mesh_devices("backbone.mesh_devices", b.mesh_devices, sizes, "examples")
    if cfg.tent.steps_per_batch < 1:
        raise ValueError(f"tent.steps_per_batch must be >= 1, got {cfg.tent.steps_per_batch}")


def run(cfg, workdir: str) -> dict[str, Any]:
    """Every seed: train, run the drift streams and the TENT comparison; write results."""
    validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    timing = {"backbone": 0.0, "streams": 0.0, "tent": 0.0}
    streams: dict[str, dict[str, dict[str, list]]] = {
        o: {m: {} for m in cfg.methods} for o in cfg.objectives
    }
    tent: list[dict[str, Any]] = []
    backbone_acc = []
    runner = None
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        x_tr, y_tr, x_te, y_te = digits_c.load_digits_split(seed, cfg.data.test_fraction)
        backbone_dir = os.path.join(workdir, "backbone", f"seed_{seed}")
        net, params, norm = train_backbone(x_tr, y_tr, seed, cfg, backbone_dir)
        logits, _ = net.apply(params, norm, x_te, batch_stats=False)
        backbone_acc.append(float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y_te))))
        t1 = time.perf_counter()
        runner = runner or StreamRunner(net, cfg)
        for i, corruption in enumerate(cfg.stream.corruptions):
            stream = digits_c.make_stream(
                x_te,
                y_te,
                schedule(corruption, cfg),
                num_steps=num_stream_steps(cfg),
                batch_size=cfg.stream.batch_size,
                seed=seed * 1000 + i,
            )
            for objective in cfg.objectives:
                for method in cfg.methods:
                    first = cfg.objectives[0]
                    if method == "none" and objective != first:  # the objective plays no part
                        one = streams[first][method][corruption][-1]
                    else:
                        key = jax.random.key(seed * 1000 + i)
                        cell = f"{objective}_{method.replace(':', '_')}_{corruption}.json"
                        one = harness.json_cell(
                            os.path.join(workdir, "streams", f"seed_{seed}", cell),
                            lambda m=method, o=objective, s=stream, k=key: runner.run(
                                m, o, params, norm, s, k
                            ),
                        )
                    streams[objective][method].setdefault(corruption, []).append(one)
        t2 = time.perf_counter()
        if cfg.tent.enabled:
            tent.append(tent_comparison(net, params, norm, x_te, y_te, seed, cfg))
        t3 = time.perf_counter()
        for name, dt in (("backbone", t1 - t0), ("streams", t2 - t1), ("tent", t3 - t2)):
            timing[name] += dt
    results = {
        "backbone_clean_accuracy": backbone_acc,
        "streams": streams,
        "summary": {o: summarize(by_method, cfg) for o, by_method in streams.items()},
        "tent": tent,
        "tent_summary": summarize_tent(tent) if tent else {},
        "step_traces": runner.traces,
        "seconds": time.perf_counter() - start,
        "timing": timing,
    }
    if multihost.is_primary():  # every process of a multi-process run holds the same results
        atomic.write_json(os.path.join(workdir, "results.json"), results, indent=1)
        plot_stream(results, cfg, os.path.join(workdir, "drift_adapters_stream.png"))
    for objective, per_method in results["summary"].items():
        logger.info("objective %s:\n%s", objective, stream_table(per_method))
    return results


def demo_rows(workdir: str) -> list[tuple[str, str, str, float, float, float]]:
    """A seconds-long run for ``make demo``: one seed, one short stream, a small TENT table.

    Rows are ``(system, method, metric, before, after, seconds)``: post-drift accuracy
    without adaptation -> with each adapter (entropy objective), and digits-C error of the
    source model -> norm statistics / TENT (mean over the demo's corruptions and severities).
    """
    from configs import drift_adapters as config

    cfg = config.get_config("demo")
    results = run(cfg, os.path.join(workdir, "drift_adapters"))
    timing = results["timing"]
    per_method = (timing["backbone"] + timing["streams"]) / len(cfg.methods)
    by_method = results["summary"][cfg.objectives[0]]
    before = by_method["none"]["acc_post_drift"]["mean"]
    rows = [
        (
            "digits-C drift (dynamic LoRA)",
            method,
            "post-drift accuracy",
            before,
            by_method[method]["acc_post_drift"]["mean"],
            per_method,
        )
        for method in cfg.methods
        if method != "none"
    ]
    t = results["tent_summary"]
    keys = [k for k in t if k != "clean"]
    source = float(np.mean([t[k]["source"]["mean"] for k in keys]))
    for method in ("norm", "tent"):
        after = float(np.mean([t[k][method]["mean"] for k in keys]))
        rows.append(("digits-C (TENT 2021)", method, "error", source, after, timing["tent"] / 2))
    return rows
