"""One seed's cells: pretraining, meta-training, held-out adaptation curves, the online
comparison and the memory table. Each returns what the run caches (parameters and a JSON-able
record); training cells resume from their checkpoints in ``run_dir``."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.forecasting.configure import compute_dtype, recordings
from experiments.forecasting.programs import Programs
from metattt import meta, multihost, runlog, train
from metattt.data import sessions as S
from metattt.data.session_metrics import forecast_metrics, neuron_sse, query_stats
from metattt.data.session_tasks import (
    Recording,
    ResetTask,
    concat_windows,
    sample_tasks,
    stack_tasks,
)
from metattt.models import perceiver as M

logger = logging.getLogger(__name__)


def pretrain(programs: Programs, sessions: list[Recording], seed: int, run_dir: str):
    """Multi-session pretraining of every parameter; returns ``(params, info)``, the
    parameters as the training leaves them (replicated over ``programs.mesh``, if any).

    Resumable: :func:`metattt.train.fit` checkpoints in ``run_dir``.
    """
    cfg = programs.cfg
    chunk = min(50, cfg.pretrain.steps)
    step, batch_fn = programs.pretrain_program(chunk)
    windows = concat_windows(
        [
            S.session_windows(
                r.data,
                context=cfg.model.context,
                horizon=cfg.model.horizon,
                stride=cfg.data.stride,
                mask=r.mask,
                unit_ids=r.unit_ids,
                session_id=r.session_id,
            )
            for r in sessions
        ]
    )
    windows = jax.tree.map(jnp.asarray, windows)
    start = time.perf_counter()
    with runlog.create_writer(run_dir) as writer:
        state = train.fit(
            step,
            step.init(programs.init_params(seed)),
            batch_fn,
            data=(windows, jax.random.key(seed)),
            num_steps=cfg.pretrain.steps,
            steps_per_call=chunk,
            checkpoint_every=chunk,
            log_every=chunk,
            workdir=run_dir,
            writer=writer,
            jit=programs.jit,
        )
    losses = [r["loss"] for r in _metrics(run_dir)]
    info = {"loss_first": losses[0], "loss_last": losses[-1], "steps": cfg.pretrain.steps}
    info["seconds"] = time.perf_counter() - start
    logger.info("seed %d: pretraining loss %.4f -> %.4f", seed, losses[0], losses[-1])
    return state.params, info


def meta_train(
    programs: Programs,
    method: str,
    adapt_set: str,
    params,
    sessions: list[Recording],
    seed: int,
    run_dir: str,
):
    """Meta-train ``method`` from ``params`` (this process's own) on the training sessions;
    ``(params, info)``, the parameters as the training leaves them (see :func:`pretrain`).

    ``info`` holds the post-adaptation query loss over every training session (fixed reset
    keys and all windows) before and after meta-training, and the per-step curve. Resumable:
    :func:`metattt.train.fit` checkpoints in ``run_dir`` every ``meta.checkpoint_every`` steps.
    """
    cfg = programs.cfg
    step = programs.meta_step(method, adapt_set, params)
    evaluate = programs.meta_evaluate(adapt_set, params)
    tasks = stack_tasks([r.task for r in sessions])
    full = ResetTask(
        tasks.support,
        tasks.query,
        jax.random.key_data(jax.random.split(jax.random.key(10_000 + seed), len(sessions))),
    )
    before = float(evaluate(params, full))
    key = jax.random.key(seed + 1)

    def batch_fn(i):
        m = cfg.meta
        return sample_tasks(
            jax.random.fold_in(key, i), tasks, m.tasks_per_step, m.support_windows, m.query_windows
        )

    start = time.perf_counter()
    with runlog.create_writer(run_dir) as writer:
        state = train.fit(
            step,
            step.init(params),
            batch_fn,
            num_steps=cfg.meta.steps,
            checkpoint_every=cfg.meta.checkpoint_every,
            log_every=1,
            workdir=run_dir,
            writer=writer,
        )
    seconds = time.perf_counter() - start
    curve = [r["query_loss"] for r in _metrics(run_dir)]
    after = float(evaluate(programs.local(state.params), full))
    logger.info("seed %d %s/%s: query loss %.4f -> %.4f", seed, method, adapt_set, before, after)
    info = {"query_before": before, "query_after": after, "seconds": seconds, "curve": curve}
    return state.params, info


def _metrics(run_dir: str) -> list[dict[str, Any]]:
    """Every logged row of a training in ``run_dir`` (process 0 writes the file; the others
    read it once it is closed)."""
    multihost.barrier(f"metrics {run_dir}")
    return runlog.read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def register(programs: Programs, params, rec: Recording, seed: int):
    """Fresh embedding rows for a held-out session (the reset of every method)."""
    key = jax.random.fold_in(jax.random.key(20_000 + seed), rec.session_id)
    return M.register_session(
        params,
        rec.session_id,
        rec.unit_ids,
        key,
        mask=rec.mask,
        init_std=programs.pcfg.emb_init_std,
    )


def adaptation_curves(
    programs: Programs, params, test: list[Recording], adapt_set: str, opt_name: str, seed: int
) -> dict[str, Any]:
    """Adaptation curves (MSE, R², POCO per step) on each held-out session, and timing."""
    run, adapt_only = programs.curve(adapt_set, params, opt_name)
    out: dict[str, Any] = {"sessions": []}
    for rec in test:
        fresh = register(programs, params, rec, seed)
        support = jax.tree.map(jnp.asarray, rec.task.support)
        query = jax.tree.map(jnp.asarray, rec.task.query)
        sse, _ = run(fresh, support, query)
        stats = query_stats(rec.task.query)
        m = {k: v.tolist() for k, v in forecast_metrics(np.asarray(sse), stats).items()}
        jax.block_until_ready(adapt_only(fresh, support))  # compiled; time the steps alone
        start = time.perf_counter()
        jax.block_until_ready(adapt_only(fresh, support))
        m["seconds"] = time.perf_counter() - start
        out["sessions"].append(m)
    return out


def stream_predictions(
    programs: Programs, params, rec: Recording, adapt_set: str, *, delay: int, start: int
) -> tuple[np.ndarray, S.WindowBatch]:
    """Online adaptation over every window (stride 1) starting at ``start`` or later.

    The window starting at t predicts steps t+C .. t+C+P-1 from steps t .. t+C-1; its target
    arrives ``delay`` windows (= time steps) later, when the last of those steps has been
    observed, which needs ``delay`` >= P. Returns the predictions (W, N, P) made before each
    update and the windows.

    Raises:
        ValueError: ``delay`` < P (a target would be used before it is observed).
    """
    horizon = programs.pcfg.horizon
    if delay < horizon:
        raise ValueError(
            f"delay = {delay} < horizon P = {horizon}: a target would arrive before its last "
            "step is observed"
        )
    windows = S.session_windows(
        rec.data,
        context=programs.pcfg.context,
        horizon=horizon,
        stride=1,
        offset=start,
        mask=rec.mask,
        unit_ids=rec.unit_ids,
        session_id=rec.session_id,
    )
    stream = {k: jnp.asarray(v) for k, v in windows._asdict().items() if k != "start"}
    preds = programs.online(adapt_set, params, delay)(params, stream)
    return np.asarray(preds[:, 0]), windows


def frozen_predictions(programs: Programs, params, windows: S.WindowBatch) -> np.ndarray:
    """Predictions of fixed parameters on every window (the offline protocol)."""
    return np.asarray(programs.frozen()(params, jax.tree.map(jnp.asarray, windows)))


def online_cell(programs: Programs, meta_params, cfg, seed: int) -> dict[str, Any]:
    """Experiment 5: offline (adapt once on the support half, frozen) vs online (then keep
    adapting with labels P steps late) on held-out sessions per drift magnitude."""
    out = {}
    for drift in cfg.online.drifts:
        rows = {"offline": [], "online": [], "unadapted": []}
        for rec in recordings(cfg, seed, test=True, drift=drift):
            fresh = register(programs, meta_params, rec, seed)
            # Offline adaptation: the meta-trained K inner steps on the support half.
            support = jax.tree.map(jnp.asarray, rec.task.support)
            adapted = programs.adapt_k(cfg.adapt, fresh)(fresh, support)
            cut = int(cfg.data.num_steps * cfg.data.support_fraction)
            online_pred, windows = stream_predictions(
                programs, adapted, rec, cfg.adapt, delay=programs.pcfg.horizon, start=cut
            )
            stats = query_stats(windows)
            for name, pred in (
                ("online", online_pred),
                ("offline", frozen_predictions(programs, adapted, windows)),
                ("unadapted", frozen_predictions(programs, fresh, windows)),
            ):
                sse = neuron_sse(jnp.asarray(pred), windows.target, windows.mask)
                rows[name].append(float(forecast_metrics(np.asarray(sse), stats)["r2"]))
        out[str(drift)] = {k: float(np.mean(v)) for k, v in rows.items()}
    return out


def memory_rows(programs: Programs, params, sessions: list[Recording], cfg) -> list[dict[str, Any]]:
    """Compiled memory of one E2E-TTT meta-gradient (second order) on one task micro-batch,
    per inner step count, remat off / on and compute dtype."""
    per = cfg.meta.tasks_per_step // cfg.meta.micro_batches
    tasks = sample_tasks(
        jax.random.key(0),
        stack_tasks([r.task for r in sessions]),
        per,
        cfg.meta.support_windows,
        cfg.meta.query_windows,
    )
    mask = programs.mask(params, cfg.adapt)
    rows = []
    for dtype in cfg.memory.dtypes:
        for k in cfg.memory.inner_steps:
            for remat in (False, True):
                loss = programs.meta_loss(
                    "e2e_ttt", mask, inner_steps=k, remat=remat, dtype=compute_dtype(dtype)
                )
                grad = jax.grad(lambda p, t, loss=loss: meta.batch_meta_loss(loss, p, t)[0])
                start = time.perf_counter()
                compiled = programs.jit(grad).lower(params, tasks).compile()
                mem = compiled.memory_analysis()
                rows.append(
                    {
                        "dtype": dtype or "float32",
                        "inner_steps": int(k),
                        "remat": remat,
                        "temp_bytes": int(mem.temp_size_in_bytes),
                        "argument_bytes": int(mem.argument_size_in_bytes),
                        "output_bytes": int(mem.output_size_in_bytes),
                        "compile_seconds": time.perf_counter() - start,
                    }
                )
                logger.info("memory %s", rows[-1])
    return rows
