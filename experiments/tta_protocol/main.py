"""Config -> source training and every ablation cell per seed and shift -> ``results.json``.

With ``train.mesh_devices`` the source training's batches are sharded over that many devices,
the parameters replicated; across several processes (``config.distributed``) that mesh spans
every process's devices and each process runs the same steps. The trained predictor is then
copied to each process's own device, so the adaptation cells run unchanged (the same
computation on every process), and process 0 alone writes files other than the checkpoints.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from experiments import harness
from experiments.tta_protocol.cells import BASELINE, cells
from experiments.tta_protocol.report import plot_rolling, summary_table
from metattt import atomic, multihost, runlog, sharding, stats, train, tta
from metattt.data import controlled
from metattt.models import dynamics as dyn

TEST_SEED = 10_000  # the test clips come from keys no training step uses


def predictor_config(cfg) -> dyn.PredictorConfig:
    """The model section of the config as a :class:`~metattt.models.dynamics.PredictorConfig`."""
    return harness.section_to(dyn.PredictorConfig, cfg.model)


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    if not cfg.seeds:
        raise ValueError("config.seeds is empty")
    predictor_config(cfg)
    for shift in cfg.data.shifts:
        if shift not in controlled.SHIFT_KINDS:
            raise ValueError(f"unknown shift {shift!r}; known: {controlled.SHIFT_KINDS}")
    if not cfg.ablation.settings:
        raise ValueError("config.ablation.settings is empty")
    cells(cfg)  # validates every protocol (mode, presets, steps, lr, clip)
    t = cfg.train
    train.check_counts(
        t.num_steps, t.steps_per_call, t.checkpoint_every, t.steps_per_call, prefix="train."
    )
    harness.check_mesh_devices("train.mesh_devices", t.mesh_devices, {"train.batch": t.batch},
                               "examples")  # fmt: skip


class SourceProgram(NamedTuple):
    """What trains the predictor on the source regime, built once and shared by the seeds."""

    apply: Callable
    step: train.Step
    batch_fn: Callable  # ((key, system, regime), step) -> windows
    mesh: jax.sharding.Mesh | None  # the data-parallel mesh of train.mesh_devices, or None


def source_program(cfg, apply: Callable) -> SourceProgram:
    """The rollout-loss Adam step and its batches (each seed's key and system are data); with
    ``train.mesh_devices`` the step shards each batch over that many devices (all processes')."""
    pcfg = predictor_config(cfg)
    length = pcfg.window + pcfg.horizon

    def loss_fn(p, windows):
        return dyn.rollout_loss(apply, p, windows, pcfg.window)

    def batch_fn(data, step):
        key, system, regime = data
        key = jax.random.fold_in(key, step)
        return controlled.sample_windows(key, system, regime, cfg.train.batch, length)

    step = train.supervised(loss_fn, optax.adam(cfg.train.lr), jit=False)
    mesh = sharding.data_mesh(cfg.train.mesh_devices)
    return SourceProgram(apply, sharding.shard_step(step, mesh), batch_fn, mesh)


def train_source(cfg, seed: int, workdir: str, program: SourceProgram | None = None):
    """Train the predictor on the source regime; returns ``(program, params, seconds)``.

    Resumes from ``workdir``'s checkpoint. ``program`` from an earlier seed may be passed: it is
    the same function of any parameters of this structure, so compiled code is reused. Trained
    on a mesh, the parameters come back as process-local copies.
    """
    pcfg = predictor_config(cfg)
    model = dyn.init_predictor(pcfg, seed=seed)
    program = program or source_program(cfg, model.apply)
    system = controlled.make_system(seed, pcfg.state_dim, pcfg.action_dim)
    data = (jax.random.key(seed), system, controlled.source_regime(pcfg.state_dim))
    start = time.perf_counter()
    t = cfg.train
    with runlog.create_writer(workdir) as writer:
        state = train.fit(
            program.step,
            program.step.init(model.params),
            program.batch_fn,
            data=data,
            num_steps=t.num_steps,
            steps_per_call=t.steps_per_call,
            checkpoint_every=t.checkpoint_every,
            log_every=t.steps_per_call,
            workdir=workdir,
            writer=writer,
        )
    params = state.params if program.mesh is None else sharding.local_copy(state.params)
    return program, params, time.perf_counter() - start


def stream_clips(cfg, seed: int, shift: str | None):
    """The test stream of a seed: shifted sub-populations alternating (or source clips)."""
    pcfg = predictor_config(cfg)
    system = controlled.make_system(seed, pcfg.state_dim, pcfg.action_dim)
    if shift is None:
        regimes = (controlled.source_regime(pcfg.state_dim),)
    else:
        regimes = controlled.shifted_regimes(system, shift, cfg.data.magnitude)
    salt = 0 if shift is None else 1 + controlled.SHIFT_KINDS.index(shift)
    return controlled.sample_clips(
        jax.random.fold_in(jax.random.key(TEST_SEED + seed), salt),
        system,
        regimes,
        cfg.data.num_clips,
        num_adapt=cfg.data.num_adapt,
        num_eval=cfg.data.num_eval,
        length=pcfg.window + pcfg.horizon,
    )


def run(cfg, workdir: str) -> dict[str, Any]:
    """Train per seed, run every cell on every shift, log every clip, write the results.

    A rerun on the same workdir resumes: training from its checkpoints, and each (shift, cell,
    seed) stream that finished is read back from its ``cell.json``.
    """
    validate(cfg)
    pcfg = predictor_config(cfg)
    protocols = cells(cfg)
    per_cell: dict[str, dict[str, list]] = {
        s: {name: [] for name in protocols} for s in cfg.data.shifts
    }
    rolling: dict[str, dict[str, list]] = {
        s: {name: [] for name in protocols} for s in cfg.data.shifts
    }
    source_loss, train_seconds, tta_seconds = [], [], []
    program = losses = eval_fn = None
    for seed in cfg.seeds:
        source_dir = os.path.join(workdir, "source", f"seed_{seed}")
        program, params, seconds = train_source(cfg, seed, source_dir, program)
        train_seconds.append(seconds)
        if losses is None:
            losses, eval_fn = dyn.clip_losses(program.apply, pcfg.window)
        start = time.perf_counter()
        base = tta.run_protocol(
            protocols[BASELINE], losses, params, stream_clips(cfg, seed, None), eval_fn=eval_fn
        )
        source_loss.append(tta.summarize(base)["mean_post"])
        for shift in cfg.data.shifts:
            clips = stream_clips(cfg, seed, shift)
            for name, protocol in protocols.items():
                cell_dir = os.path.join(workdir, shift, name.replace("/", "_"), f"seed_{seed}")
                record = harness.json_cell(
                    os.path.join(cell_dir, "cell.json"),
                    lambda p=protocol, c=clips, d=cell_dir: _adapt_stream(
                        p, losses, params, c, eval_fn, d
                    ),
                )
                per_cell[shift][name].append(record["summary"])
                rolling[shift][name].append(record["rolling_post"])
        tta_seconds.append(time.perf_counter() - start)
    results = {
        "cells": {
            shift: {name: _aggregate(rows) for name, rows in table.items()}
            for shift, table in per_cell.items()
        },
        "rolling_post": {
            shift: {name: np.mean(v, axis=0).tolist() for name, v in table.items()}
            for shift, table in rolling.items()
        },
        "source_baseline_loss": stats.seed_summary(source_loss),
        "train_seconds": train_seconds,
        "tta_seconds": tta_seconds,
        "seeds": list(cfg.seeds),
        "mode": cfg.protocol.mode,
    }
    if multihost.is_primary():  # every process of a multi-process run holds the same results
        atomic.write_json(os.path.join(workdir, "results.json"), results, indent=1)
        text = summary_table(results)
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(text + "\n")
        plot_rolling(results, os.path.join(workdir, "tta_protocol_rolling.png"))
    return results


def _adapt_stream(protocol, losses, params, clips, eval_fn, logdir: str) -> dict[str, Any]:
    """One cell on one seed's stream: every clip logged under ``logdir`` (cleared first, so a
    cell computed again after a kill does not log its clips twice), its summary row and its
    rolling post-adapt loss (process 0 alone clears and writes the log)."""
    if multihost.is_primary():
        shutil.rmtree(logdir, ignore_errors=True)
    result = tta.run_protocol(protocol, losses, params, clips, eval_fn=eval_fn)
    with runlog.create_writer(logdir) as writer:
        tta.write_protocol_metrics(writer, result)
    return {
        "summary": tta.summarize(result),
        "rolling_post": np.asarray(result.metrics.rolling_post).tolist(),
    }


def _aggregate(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Means over seeds (with 95% CIs for the losses) of :func:`metattt.tta.summarize` rows."""
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    for k in ("mean_post", "mean_improvement", "final_rolling_post"):
        out[k + "_ci"] = stats.mean_ci([r[k] for r in rows]).half_width if len(rows) > 1 else 0.0
    out["per_seed_mean_post"] = [r["mean_post"] for r in rows]
    return out


def demo_rows(workdir: str) -> list[tuple[str, str, str, float, float, float]]:
    """``make demo``: baseline vs LayerNorm+MLP-out adaptation on shifted dynamics clips.

    Returns rows ``(system, method, metric, before, after, seconds)``; ``before`` is the mean
    pre-adapt rollout MSE over the clips and ``after`` the mean post-adapt one.
    """
    from configs import tta_protocol as tta_config  # configs are read by experiments only

    cfg = tta_config.get_config("demo")
    start = time.perf_counter()
    results = run(cfg, os.path.join(workdir, "tta_protocol"))
    seconds = time.perf_counter() - start
    rows = []
    for name, r in results["cells"][cfg.data.shifts[0]].items():
        rows.append(
            (
                "TTA protocol (dynamics)",
                name.replace("/", ", "),
                "rollout MSE, shifted clips",
                r["mean_pre"],
                r["mean_post"],
                seconds,
            )
        )
    return rows
