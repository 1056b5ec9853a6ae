"""Sinusoid regression (MAML, Finn et al. 2017): train each method, then adapt on new tasks.

Methods share one code path: a meta-loss from :mod:`metattt.meta` and the resumable
:func:`metattt.train.fit`. ``pretrained`` is the same meta-loss with zero inner steps (plain
multi-task regression); at test time every method takes SGD steps at the inner rate
(Meta-SGD with its learned per-parameter rates) on K support points, and the query MSE is
recorded after 0..max_steps steps on held-out tasks.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import report
from metattt import inner, meta, runlog, stats
from metattt import params as P
from metattt.data import sinusoid
from metattt.inner import InnerConfig, per_param_sgd
from metattt.models.mlp import mlp
from metattt.train import check_counts, fit

logger = logging.getLogger(__name__)
METHODS = ("maml", "fomaml", "meta_sgd", "pretrained")
EVAL_SEED = 10_000  # test tasks are drawn from a key no training step uses
VALIDATION_SEED = 20_000  # tasks for choosing the pretrained baseline's fine-tuning rate


def _mse_loss(apply):
    def loss_fn(p, batch):
        x, y = batch
        return jnp.mean((apply(p, x) - y) ** 2)

    return loss_fn


def _meta_loss(method: str, loss_fn, mask, cfg):
    inner = InnerConfig(optax.sgd(cfg.inner.lr), max_steps=cfg.inner.train_steps)
    if method == "maml":
        return functools.partial(meta.maml_loss, loss_fn, mask=mask, inner=inner)
    if method == "fomaml":
        return functools.partial(meta.fomaml_loss, loss_fn, mask=mask, inner=inner)
    if method == "meta_sgd":
        return functools.partial(meta.meta_sgd_loss, loss_fn, mask=mask, inner=inner)
    if method == "pretrained":
        return functools.partial(
            meta.maml_loss, loss_fn, mask=mask, inner=inner._replace(max_steps=0)
        )
    raise ValueError(f"unknown sinusoid method {method!r}; known: {METHODS}")


def train(method: str, seed: int, cfg, workdir: str, writer=None):
    """Meta-train one method with one seed; resumes from ``workdir`` if it holds a checkpoint.

    Logged and checkpointed step numbers count meta-steps; ``train.steps_per_call`` of them
    run per compiled call.
    """
    model = mlp([1, *cfg.model.hidden, 1], seed=seed)
    loss_fn = _mse_loss(model.apply)
    mask = P.select(model.params, "re:.")  # MAML adapts every parameter
    init = model.params
    if method == "meta_sgd":
        init = meta.meta_sgd_init(model.params, mask, cfg.inner.meta_sgd_init_lr)
    mesh = None
    if cfg.train.mesh_devices:
        mesh = jax.make_mesh((cfg.train.mesh_devices,), ("tasks",))
    learner = meta.make_meta_step(
        _meta_loss(method, loss_fn, mask, cfg),
        optax.adam(cfg.train.meta_lr),
        clip_norm=cfg.train.clip_norm or None,
        mesh=mesh,
        jit=mesh is not None,
    )
    sample = functools.partial(
        sinusoid.sample_tasks,
        num_tasks=cfg.train.meta_batch,
        num_support=cfg.task.num_support,
        num_query=cfg.task.num_query,
    )
    key = jax.random.key(seed)
    state = fit(
        learner,
        learner.init(init),
        lambda s: sample(jax.random.fold_in(key, s)),  # step s draws its tasks from (seed, s)
        num_steps=cfg.train.num_steps,
        steps_per_call=cfg.train.steps_per_call,
        workdir=workdir,
        checkpoint_every=cfg.train.checkpoint_every,
        log_every=cfg.train.log_every,
        writer=writer,
    )
    return model, state.params


def adaptation_curve(
    model,
    meta_params,
    method: str,
    cfg,
    num_tasks: int,
    *,
    lr: float | None = None,
    seed: int = EVAL_SEED,
) -> np.ndarray:
    """Query MSE after 0..max_steps test-time SGD steps on each of ``num_tasks`` new tasks.

    Args:
        lr: the test-time SGD rate (default ``cfg.inner.lr``; Meta-SGD uses its learned rates).
        seed: the key the tasks are drawn from (test and validation tasks use different ones).

    Returns:
        (num_tasks, max_steps + 1) array.
    """
    loss_fn = _mse_loss(model.apply)
    params = meta_params.params if method == "meta_sgd" else meta_params
    opt = (
        per_param_sgd(meta_params.learning_rates)
        if method == "meta_sgd"
        else optax.sgd(lr or cfg.inner.lr)
    )
    tasks = sinusoid.sample_tasks(
        jax.random.key(seed), num_tasks, cfg.task.num_support, cfg.eval.num_query
    )

    mask = P.select(params, "re:.")

    @jax.jit
    def curve(task):
        return inner.adaptation_curve(
            loss_fn, loss_fn, params, mask, task.support, task.query,
            opt=opt, max_steps=cfg.eval.max_steps,
        )  # fmt: skip

    return np.asarray(jax.vmap(curve)(tasks))


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    for method in cfg.methods:
        if method not in METHODS:
            raise ValueError(f"unknown sinusoid method {method!r}; known: {METHODS}")
    if not cfg.seeds:
        raise ValueError("config.seeds is empty")
    t = cfg.train
    check_counts(t.num_steps, t.steps_per_call, t.checkpoint_every, t.log_every, prefix="train.")


def run(cfg, workdir: str) -> dict[str, Any]:
    """Train every (method, seed), evaluate, write results.json and a curve plot into workdir."""
    validate(cfg)
    results: dict[str, Any] = {}
    for method in cfg.methods:
        curves, seconds, tuned, tuned_lrs = [], [], [], []
        for seed in cfg.seeds:
            run_dir = os.path.join(workdir, method, f"seed_{seed}")
            start = time.perf_counter()
            with runlog.create_writer(run_dir) as writer:
                model, meta_params = train(method, seed, cfg, run_dir, writer)
            seconds.append(time.perf_counter() - start)
            curves.append(adaptation_curve(model, meta_params, method, cfg, cfg.eval.num_tasks))
            if method == "pretrained" and cfg.eval.tune_pretrained_lrs:
                lr = _tune_lr(model, meta_params, cfg)
                tuned_lrs.append(lr)
                tuned.append(
                    adaptation_curve(model, meta_params, method, cfg, cfg.eval.num_tasks, lr=lr)
                )
        results[method] = _summarize(curves, seconds)
        if tuned:
            results["pretrained_tuned_lr"] = dict(_summarize(tuned, seconds), lrs=tuned_lrs)
    for method, r in results.items():
        logger.info(
            "%s: query MSE %s",
            method,
            {k: round(r["curve_mean"][k], 3) for k in cfg.eval.report_steps},
        )
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot_curves(results, os.path.join(workdir, "sinusoid_curves.png"))
    return results


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """Put the table, the plot and the provenance into BENCHMARKS.md's sinusoid section."""
    root = report.BENCHMARKS.parent
    figure = root / "docs" / "figures" / "sinusoid_curves.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(results, str(figure))
    seconds = {m: np.mean(r["train_seconds"]) for m, r in results.items()}
    sizes = "-".join(map(str, (1, *cfg.model.hidden, 1)))
    body = "\n".join(
        [
            "## Sinusoid regression (MAML, Finn et al. 2017), reproduction",
            "",
            f"- Date: {report.today()}; machine: {report.machine()}.",
            "- Command: `python -m experiments.run --config configs/sinusoid.py "
            "--workdir runs/sinusoid`.",
            f"- Setup: MLP {sizes} (ReLU), K={cfg.task.num_support} support points, inner SGD "
            f"lr {cfg.inner.lr} ({cfg.inner.train_steps} step in training), meta-batch "
            f"{cfg.train.meta_batch}, Adam meta lr {cfg.train.meta_lr}, "
            f"{cfg.train.num_steps} meta-iterations, seeds {tuple(cfg.seeds)}.",
            f"- Test: {results[cfg.methods[0]]['num_test_tasks']} new tasks in all "
            f"({cfg.eval.num_tasks} per seed), query MSE on {cfg.eval.num_query} points; mean ± "
            "95% CI over tasks.",
            "- Mean training time per seed: "
            + ", ".join(f"{m} {t:.0f} s" for m, t in seconds.items())
            + ".",
            "",
            table(results, cfg.eval.report_steps),
            "",
            "![query MSE against test-time steps](docs/figures/sinusoid_curves.png)",
        ]
    )
    report.publish("sinusoid", body, results)


def _tune_lr(model, params, cfg) -> float:
    """The fine-tuning rate with the lowest mean 1-step query MSE on validation tasks."""
    scores = [
        np.nanmean(
            adaptation_curve(model, params, "pretrained", cfg, 200, lr=lr, seed=VALIDATION_SEED)[
                :, 1
            ]
        )
        for lr in cfg.eval.tune_pretrained_lrs
    ]
    return float(cfg.eval.tune_pretrained_lrs[int(np.nanargmin(scores))])


def _summarize(curves: list[np.ndarray], seconds: list[float]) -> dict[str, Any]:
    """Mean curve and 95% CI over all test tasks of all seeds, plus per-seed means."""
    per_task = np.concatenate(curves, axis=0)  # tasks of every seed
    seed_means = np.stack([c.mean(axis=0) for c in curves])  # (seeds, steps + 1)
    return {
        "curve_mean": per_task.mean(axis=0).tolist(),
        "curve_ci": [stats.mean_ci(per_task[:, k]).half_width for k in range(per_task.shape[1])],
        "seed_means": seed_means.tolist(),
        "train_seconds": seconds,
        "num_test_tasks": int(per_task.shape[0]),
    }


def plot_curves(results: dict[str, Any], path: str) -> None:
    """Query MSE against inner steps, one line per method with a 95% CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    top = 10.0  # a diverging curve leaves the plot instead of flattening the others
    for method, r in results.items():
        mean, ci = np.array(r["curve_mean"]), np.array(r["curve_ci"])
        steps = np.arange(mean.size)
        shown = np.isfinite(mean) & (mean < top)
        ax.plot(steps[shown], mean[shown], marker="o", ms=3, label=method)
        low = np.maximum(mean - ci, 0.05)
        ax.fill_between(steps[shown], low[shown], (mean + ci)[shown], alpha=0.2)
    ax.set_yscale("log")
    ax.set_ylim(0.05, top)
    ax.set_xlabel("gradient steps at test time")
    ax.set_ylabel("query MSE (K=10, log scale)")
    ax.set_title("sinusoid regression")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(results: dict[str, Any], cfg) -> str:
    """The table :mod:`experiments.run` prints at the end."""
    return table(results, cfg.eval.report_steps)


def table(results: dict[str, Any], report_steps) -> str:
    """Markdown table: method, MSE +- 95% CI after each reported number of steps."""
    head = "| method | " + " | ".join(f"MSE after {k} step{'s' * (k != 1)}" for k in report_steps)
    lines = [head + " |", "|---" * (len(report_steps) + 1) + "|"]
    for method, r in results.items():
        cells = [
            f"{r['curve_mean'][k]:.3f} ± {r['curve_ci'][k]:.3f}"
            if np.isfinite(r["curve_mean"][k]) and r["curve_mean"][k] < 1e3
            else "diverges"
            for k in report_steps
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
