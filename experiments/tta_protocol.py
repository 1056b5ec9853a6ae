"""The configurable TTA protocol: an ablation of adapted layers, reset and step settings.

A small action-conditioned transformer predictor (:mod:`metattt.models.dynamics`) is trained
on the source regime of a synthetic controlled system (H-step rollout loss, Adam, with
:func:`metattt.train.fit`: checkpointed under ``workdir/source/seed_<s>``, resumed on a
rerun). It is then adapted clip by clip with :func:`metattt.tta.run_protocol` on shifted
regimes whose clips alternate between two opposite sub-populations. Every cell of the matrix
(adapted layers x reset/cumulative x setting, plus the unadapted baseline) logs every clip to
tensorboardX and JSON lines under ``workdir/<shift>/<cell>/seed_<s>``; ``results.json``, a
summary table and a rolling-loss plot go into ``workdir``; ``python -m experiments.run --report
--workdir W`` renders them into BENCHMARKS.md and docs/.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from experiments import report
from metattt import runlog, stats, train, tta
from metattt.data import controlled
from metattt.models import dynamics as dyn

logger = logging.getLogger(__name__)
BASELINE = "baseline"
TEST_SEED = 10_000  # the test clips come from keys no training step uses


def predictor_config(cfg) -> dyn.PredictorConfig:
    """The model section of the config as a :class:`~metattt.models.dynamics.PredictorConfig`."""
    m = cfg.model
    return dyn.PredictorConfig(
        state_dim=m.state_dim,
        action_dim=m.action_dim,
        dim=m.dim,
        num_heads=m.num_heads,
        num_layers=m.num_layers,
        mlp_ratio=m.mlp_ratio,
        window=m.window,
        horizon=m.horizon,
    ).validate()


def protocol_from_config(
    cfg, adapt_layers: str, reset: bool, setting: str, mode: str | None = None
) -> tta.TTAProtocol:
    """One cell of the ablation as a :class:`metattt.tta.TTAProtocol` (validated)."""
    s = cfg.ablation.settings[setting]
    return tta.TTAProtocol(
        enabled=adapt_layers != "none",
        mode=mode or cfg.protocol.mode,
        num_adaptation_steps=int(s.steps),
        lr=float(s.lr),
        clip_norm=float(s.clip_norm) if s.clip_norm else None,
        reset_per_clip=bool(reset),
        adapt_layers=adapt_layers,
        window=int(cfg.protocol.window),
        optimizer=cfg.protocol.optimizer,
    )


def cells(cfg) -> dict[str, tta.TTAProtocol]:
    """``{name: protocol}``: the baseline, layers x reset x setting, then the other mode.

    Names are ``layers/reset|cumulative/setting`` (the config's mode) and
    ``layers/reset/setting/<other mode>`` for the other-mode cells.
    """
    out = {BASELINE: protocol_from_config(cfg, "none", True, next(iter(cfg.ablation.settings)))}
    for layers in cfg.ablation.adapt_layers:
        for reset in cfg.ablation.resets:
            for setting in cfg.ablation.settings:
                name = f"{layers}/{'reset' if reset else 'cumulative'}/{setting}"
                out[name] = protocol_from_config(cfg, layers, reset, setting)
    if cfg.ablation.other_mode:
        for layers in cfg.ablation.adapt_layers:
            for setting in cfg.ablation.other_mode_settings:
                name = f"{layers}/reset/{setting}/{cfg.ablation.other_mode}"
                out[name] = protocol_from_config(
                    cfg, layers, True, setting, mode=cfg.ablation.other_mode
                )
    return out


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


class SourceProgram(NamedTuple):
    """What trains the predictor on the source regime, built once and shared by the seeds."""

    apply: Callable
    step: train.Step
    batch_fn: Callable  # ((key, system, regime), step) -> windows


def source_program(cfg, apply: Callable) -> SourceProgram:
    """The rollout-loss Adam step and its batches (each seed's key and system are data)."""
    pcfg = predictor_config(cfg)
    length = pcfg.window + pcfg.horizon

    def loss_fn(p, windows):
        return dyn.rollout_loss(apply, p, windows, pcfg.window)

    def batch_fn(data, step):
        key, system, regime = data
        key = jax.random.fold_in(key, step)
        return controlled.sample_windows(key, system, regime, cfg.train.batch, length)

    step = train.supervised(loss_fn, optax.adam(cfg.train.lr), jit=False)
    return SourceProgram(apply, step, batch_fn)


def train_source(cfg, seed: int, workdir: str, program: SourceProgram | None = None):
    """Train the predictor on the source regime; returns ``(program, params, seconds)``.

    Resumes from ``workdir``'s checkpoint. ``program`` from an earlier seed may be passed: it is
    the same function of any parameters of this structure, so compiled code is reused.
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
    return program, state.params, time.perf_counter() - start


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
    """Train per seed, run every cell on every shift, log every clip, write the results."""
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
                result = tta.run_protocol(protocol, losses, params, clips, eval_fn=eval_fn)
                with runlog.create_writer(
                    os.path.join(workdir, shift, name.replace("/", "_"), f"seed_{seed}")
                ) as writer:
                    tta.write_protocol_metrics(writer, result)
                per_cell[shift][name].append(tta.summarize(result))
                rolling[shift][name].append(np.asarray(result.metrics.rolling_post).tolist())
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
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = summary_table(results)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(text + "\n")
    plot_rolling(results, os.path.join(workdir, "tta_protocol_rolling.png"))
    return results


def _aggregate(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Means over seeds (with 95% CIs for the losses) of :func:`metattt.tta.summarize` rows."""
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    for k in ("mean_post", "mean_improvement", "final_rolling_post"):
        out[k + "_ci"] = stats.mean_ci([r[k] for r in rows]).half_width if len(rows) > 1 else 0.0
    out["per_seed_mean_post"] = [r["mean_post"] for r in rows]
    return out


def _fmt(mean: float, ci: float) -> str:
    return f"{mean:.4f} ± {ci:.4f}" if ci and np.isfinite(ci) else f"{mean:.4f}"


def _relative(row: dict[str, Any], baseline: np.ndarray) -> str:
    """Mean over seeds of the post-adapt loss divided by that seed's baseline (± 95% CI)."""
    ratios = np.asarray(row["per_seed_mean_post"]) / baseline
    ci = stats.mean_ci(ratios).half_width if ratios.size > 1 else 0.0
    return f"{ratios.mean():.3f} ± {ci:.3f}" if ratios.size > 1 else f"{ratios.mean():.3f}"


def summary(results: dict[str, Any], cfg) -> str:
    """The table :mod:`experiments.run` prints at the end."""
    del cfg
    return summary_table(results)


def summary_table(results: dict[str, Any]) -> str:
    """Markdown tables, one per shift: final mean rollout loss, improvement, trainable share.

    Losses are means over seeds ± 95% CI; since seeds draw different systems, whose losses
    differ in scale, "post / baseline" (per seed, then averaged) is the comparable number.
    """
    parts = []
    for shift, table in results["cells"].items():
        parts += [
            f"**Shift: {shift}** (clips alternate between the two opposite sub-populations)",
            "",
            "| adapted layers | reset | setting | mode | trainable (share) | mean rollout loss "
            "(post-adapt) | post / baseline | mean improvement | final rolling loss "
            "(last 50 clips) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        base = np.asarray(table[BASELINE]["per_seed_mean_post"])
        for name, r in table.items():
            layers, reset, setting, *other = (
                (name, "-", "-") if name == BASELINE else name.split("/")
            )
            mode = other[0] if other else results.get("mode", "-")
            parts.append(
                f"| {layers} | {reset} | {setting} | {mode} | {int(r['trainable_params'])} "
                f"({100 * r['trainable_share']:.2f}%) | "
                f"{_fmt(r['mean_post'], r['mean_post_ci'])} | {_relative(r, base)} | "
                f"{r['mean_improvement']:+.2e} | {r['final_rolling_post']:.4f} |"
            )
        parts.append("")
    return "\n".join(parts).strip()


def plot_rolling(results: dict[str, Any], path: str) -> None:
    """Rolling mean (50 clips) of the post-adapt rollout loss per cell, one panel per shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = list(results["rolling_post"])
    fig, axes = plt.subplots(1, len(shifts), figsize=(6.0 * len(shifts), 4.0), squeeze=False)
    for ax, shift in zip(axes[0], shifts, strict=True):
        curves = results["rolling_post"][shift]
        main = [n for n in curves if n.count("/") == 2]
        setting = "stronger" if any(n.endswith("/stronger") for n in main) else None
        shown = [BASELINE] + [n for n in main if setting is None or n.endswith("/" + setting)]
        for name in shown:
            curve = curves[name]
            style = "-" if name == BASELINE or "/reset/" in name else "--"
            width = 2.5 if name == BASELINE else 1.2
            ax.plot(np.arange(1, len(curve) + 1), curve, style, lw=width, label=name)
        ax.set_xlabel("clip")
        ax.set_ylabel("rolling mean of post-adapt rollout MSE")
        ax.set_title(f"shift: {shift}" + (f" ({setting} setting)" if setting else ""))
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """Put the table, the plot and the provenance into BENCHMARKS.md's tta_protocol section."""
    root = report.BENCHMARKS.parent
    figure = root / "docs" / "figures" / "tta_protocol_rolling.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_rolling(results, str(figure))
    pcfg = predictor_config(cfg)
    settings = "; ".join(
        f"{name}: {s.steps} step(s), lr {s.lr}, clip {s.clip_norm}"
        for name, s in cfg.ablation.settings.items()
    )
    src = results["source_baseline_loss"]
    body = "\n".join(
        [
            "## Configurable TTA protocol on an action-conditioned transformer predictor",
            "",
            f"- Date: {report.today()}; machine: {report.machine()}.",
            "- Command: `python -m experiments.run --config configs/tta_protocol.py "
            "--workdir runs/tta_protocol`.",
            f"- Model: {pcfg.num_layers} causal pre-norm transformer blocks, width {pcfg.dim}, "
            f"{pcfg.num_heads} heads, MLP x{pcfg.mlp_ratio}; state {pcfg.state_dim}, action "
            f"{pcfg.action_dim}, history W={pcfg.window}, rollout horizon H={pcfg.horizon}; "
            f"trained {cfg.train.num_steps} Adam steps (lr {cfg.train.lr}, batch "
            f"{cfg.train.batch}) on the source regime with the H-step rollout loss.",
            f"- Test: {cfg.data.num_clips} clips per shift and seed, alternating between two "
            f"opposite sub-populations (magnitude {cfg.data.magnitude}); each clip adapts on "
            f"{cfg.data.num_adapt} windows and is scored (rollout MSE over H) on "
            f"{cfg.data.num_eval} later windows of the same trajectory; the score is the "
            "post-adapt loss.",
            f"- Protocol: mode {cfg.protocol.mode}, optimizer {cfg.protocol.optimizer}, settings "
            f"{settings}; seeds {tuple(cfg.seeds)} (system, model init, data); means over seeds "
            "± 95% CI. Source-regime baseline loss (no shift): "
            f"{_fmt(src['mean'], src['ci'])}.",
            "- Wall time per seed (s): training "
            + ", ".join(f"{t:.0f}" for t in results["train_seconds"])
            + "; all TTA cells "
            + ", ".join(f"{t:.0f}" for t in results["tta_seconds"])
            + f" (the first seed compiles the {len(results['cells'][cfg.data.shifts[0]])} "
            "runners; later seeds reuse them).",
            "",
            summary_table(results),
            "",
            "![rolling post-adapt loss](docs/figures/tta_protocol_rolling.png)",
        ]
    )
    report.publish("tta_protocol", body, results)


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
