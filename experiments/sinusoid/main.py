"""Config -> meta-train each (method, seed), adaptation curves on new tasks -> ``results.json``."""

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

from experiments.harness import check_mesh_devices
from experiments.sinusoid.report import plot_curves
from metattt import atomic, inner, meta, multihost, runlog, stats
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
    """The meta-loss of ``method``; ``pretrained`` is MAML's with zero inner steps."""
    # inner.sgd: the same steps as optax.sgd, and a cheaper non-finite guard (|lr| <= 1).
    inner_cfg = InnerConfig(inner.sgd(cfg.inner.lr), max_steps=cfg.inner.train_steps)
    if method == "maml":
        return functools.partial(meta.maml_loss, loss_fn, mask=mask, inner=inner_cfg)
    if method == "fomaml":
        return functools.partial(meta.fomaml_loss, loss_fn, mask=mask, inner=inner_cfg)
    if method == "meta_sgd":
        return functools.partial(meta.meta_sgd_loss, loss_fn, mask=mask, inner=inner_cfg)
    if method == "pretrained":
        return functools.partial(
            meta.maml_loss, loss_fn, mask=mask, inner=inner_cfg._replace(max_steps=0)
        )
    raise ValueError(f"unknown sinusoid method {method!r}; known: {METHODS}")


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    for method in cfg.methods:
        if method not in METHODS:
            raise ValueError(f"unknown sinusoid method {method!r}; known: {METHODS}")
    if not cfg.seeds:
        raise ValueError("config.seeds is empty")
    if not 0 < cfg.inner.lr <= 1:
        raise ValueError(f"config.inner.lr must be in (0, 1] (inner SGD), got {cfg.inner.lr!r}")
    t = cfg.train
    check_counts(t.num_steps, t.steps_per_call, t.checkpoint_every, t.log_every, prefix="train.")
    check_mesh_devices("train.mesh_devices", t.mesh_devices, {"train.meta_batch": t.meta_batch},
                       "tasks")  # fmt: skip


def train(method: str, seed: int, cfg, workdir: str, writer=None):
    """Meta-train one method with one seed; resumes from ``workdir`` if it holds a checkpoint.

    Logged and checkpointed step numbers count meta-steps; ``train.steps_per_call`` of them
    run per compiled call. Step s draws its tasks from ``(seed, s)``.

    Returns:
        ``(model, meta_params)``; Meta-SGD's meta-parameters hold its learned rates too.
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
        lambda s: sample(jax.random.fold_in(key, s)),
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


def tune_lr(model, params, cfg) -> float:
    """The fine-tuning rate with the lowest mean 1-step query MSE on 200 validation tasks."""
    scores = [
        np.nanmean(
            adaptation_curve(model, params, "pretrained", cfg, 200, lr=lr, seed=VALIDATION_SEED)[
                :, 1
            ]
        )
        for lr in cfg.eval.tune_pretrained_lrs
    ]
    return float(cfg.eval.tune_pretrained_lrs[int(np.nanargmin(scores))])


def summarize_curves(curves: list[np.ndarray], seconds: list[float]) -> dict[str, Any]:
    """Mean curve and 95% CI over all test tasks of all seeds, plus per-seed means.

    Args:
        curves: one (tasks, steps + 1) array per seed.
        seconds: the training wall time of each seed.
    """
    per_task = np.concatenate(curves, axis=0)  # tasks of every seed
    seed_means = np.stack([c.mean(axis=0) for c in curves])  # (seeds, steps + 1)
    return {
        "curve_mean": per_task.mean(axis=0).tolist(),
        "curve_ci": [stats.mean_ci(per_task[:, k]).half_width for k in range(per_task.shape[1])],
        "seed_means": seed_means.tolist(),
        "train_seconds": seconds,
        "num_test_tasks": int(per_task.shape[0]),
    }


def run(cfg, workdir: str) -> dict[str, Any]:
    """Train every (method, seed), evaluate, write results.json and a curve plot into workdir.

    With ``eval.tune_pretrained_lrs`` the pretrained models are also fine-tuned at the rate
    chosen on validation tasks (entry ``pretrained_tuned_lr``, with the chosen rates).
    """
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
                lr = tune_lr(model, meta_params, cfg)
                tuned_lrs.append(lr)
                tuned.append(
                    adaptation_curve(model, meta_params, method, cfg, cfg.eval.num_tasks, lr=lr)
                )
        results[method] = summarize_curves(curves, seconds)
        if tuned:
            results["pretrained_tuned_lr"] = dict(summarize_curves(tuned, seconds), lrs=tuned_lrs)
    for method, r in results.items():
        logger.info(
            "%s: query MSE %s",
            method,
            {k: round(r["curve_mean"][k], 3) for k in cfg.eval.report_steps},
        )
    if multihost.is_primary():  # every process of a multi-process run holds the same results
        atomic.write_json(os.path.join(workdir, "results.json"), results, indent=1)
        plot_curves(results, os.path.join(workdir, "sinusoid_curves.png"))
    return results


def demo_rows(workdir: str) -> list[tuple[str, str, str, float, float, float]]:
    """A seconds-long run of each method for ``make demo``, one seed each.

    Rows are ``(system, method, metric, before, after, seconds)``: the mean query MSE on new
    tasks before adaptation -> after one test-time step, and the method's wall time.
    """
    from configs import sinusoid as config

    cfg = config.get_config("demo")
    rows = []
    for method in cfg.methods:
        one = cfg.copy_and_resolve_references()
        one.methods = (method,)
        start = time.perf_counter()
        curve = run(one, os.path.join(workdir, f"sinusoid_{method}"))[method]["curve_mean"]
        seconds = time.perf_counter() - start
        metric = f"query MSE, K={cfg.task.num_support}, 0 -> 1 step"
        rows.append(("sinusoid (MAML 2017)", method, metric, curve[0], curve[1], seconds))
    return rows
