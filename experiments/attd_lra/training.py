"""Pretraining the base Mamba, and training and scoring one method's cell.

Both trainings may run data-parallel (a ``mesh`` from the config's ``mesh_devices``): each batch
is split over the mesh, the parameters replicated; what they return stays replicated over it
(the parameter cell saves it so, all processes together), and the scoring runs on this
process's own copy (:func:`metattt.sharding.local_copy`), the same on every process.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attd.controller import quantile_thresholds
from attd.dynamics import make_adapter
from attd.lra import LRATask, Split
from attd.mamba import MambaConfig
from attd.method import ATTD, ATTDParams, benchmark_eval_paths, make_attd
from experiments.attd_lra.methods import BASES, CONTROLLED, parse_method
from metattt import multihost, objectives, runlog, sharding, train

#: What :func:`attd.method.benchmark_eval_paths` counts besides the times, kept per cell.
_TIMING_KEYS = ("inner_steps", "executed_steps", "masked_steps", "max_abs_diff")


def _batches(seed: int, n: int, steps: int, batch: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, (steps, batch))


def make_pretrain_step(
    apply, lr: float, lm_weight: float, mesh: jax.sharding.Mesh | None = None
) -> train.Step:
    """Adam on θ of L_task + lm_weight · next-token CE; logs both terms. With ``mesh`` each
    batch is split over it."""

    def loss_fn(theta, batch):
        tokens, mask, labels = batch
        task = objectives.cross_entropy(apply(theta, tokens, mask=mask), labels)
        lm = objectives.next_token_cross_entropy(apply(theta, tokens, head="lm"), tokens, mask)
        return task + lm_weight * lm, {"task_loss": task, "lm_loss": lm}

    return sharding.shard_step(train.supervised(loss_fn, optax.adam(lr), has_aux=True), mesh)


def fit_on_split(step: train.Step, state, split: Split, idx: np.ndarray, run_dir: str, every: int):
    """``step`` over the batches ``split[idx[i]]``, resumable in ``run_dir``.

    Returns ``(state, every step's metrics)``; every step is logged, so they are read back
    from ``run_dir/metrics.jsonl`` also when the run resumed at its end (process 0 writes the
    file; the others read it once it is closed).
    """
    with runlog.create_writer(run_dir) as writer:
        state = train.fit(
            step,
            state,
            lambda i: (split.tokens[idx[i]], split.mask[idx[i]], split.labels[idx[i]]),
            num_steps=len(idx),
            checkpoint_every=every,
            log_every=1,
            workdir=run_dir,
            writer=writer,
            show_progress=False,
        )
    multihost.barrier(f"metrics {run_dir}")
    return state, runlog.read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def pretrain(cfg, theta, split: Split, seed: int, step: train.Step, run_dir: str):
    """Pretrain the base Mamba; returns θ and ``{task_loss, lm_loss, seconds}``."""
    start = time.perf_counter()
    idx = _batches(seed, len(split.labels), cfg.pretrain.steps, cfg.pretrain.batch)
    state, logged = fit_on_split(
        step, step.init(theta), split, idx, run_dir, cfg.pretrain.checkpoint_every
    )
    info = {"task_loss": logged[-1]["task_loss"], "lm_loss": logged[-1]["lm_loss"]}
    info["seconds"] = time.perf_counter() - start
    return state.params, info


def make_method(name: str, apply, mcfg: MambaConfig, cfg, inner_lr: float | None = None) -> ATTD:
    """One of the methods: the same ATTD code path, another controller (``attd_nocost``:
    ATTD without the step cost, λ = 0, to see what the task loss alone does to K), and the
    variants of its name (order, inner rule: ``+sgd`` uses ``attd.sgd_lr``)."""
    a = cfg.attd
    spec = parse_method(name)
    rule_name = spec.inner_opt or a.inner_opt
    lr = a.inner_lr if inner_lr is None else inner_lr
    if rule_name == "adam":
        rule = optax.adam(lr, eps_root=a.adam_eps_root)
    else:  # SGD needs a far larger step than Adam (∂L_int/∂U is small); see the report
        rule = optax.sgd(a.sgd_lr if spec.inner_opt == "sgd" and inner_lr is None else lr)
    controller = BASES[spec.base].make(spec.steps or a.k_max, a.temperature)
    return make_attd(
        apply,
        mcfg,
        controller,
        objective=a.objective,
        inner_opt=rule,
        clip_norm=a.clip_norm or None,
        first_order=False if spec.second_order else a.first_order,
        remat=a.remat,
        cost=a.cost,
        lam=0.0 if spec.base == "attd_nocost" else a.lam,
        beta=a.beta,
        int_weight=a.joint_weight if spec.joint else 0.0,
        adapter=make_adapter(spec.adapter or "low_rank", mcfg),
    )


def initial_psi(name: str, mcfg: MambaConfig, cfg, seed: int):
    """ψ₀ of a method: the low-rank ψ (``model.psi_rank``, or the name's ``+r<N>``) with
    V₀ ~ ``model.psi_scale``·N(0, 1), or the zero start of another family."""
    spec = parse_method(name)
    rank, scale = spec.psi_rank or cfg.model.psi_rank, cfg.model.psi_scale
    adapter = make_adapter(spec.adapter or "low_rank", mcfg, rank=rank, scale=scale)
    return adapter.init(jax.random.key(seed))


def _accuracy(method: ATTD, params: ATTDParams, split: Split, batch: int) -> float:
    correct = []
    for keep, idx in _padded_batches(len(split.labels), batch):
        out = method.predict(params, jnp.asarray(split.tokens[idx]), jnp.asarray(split.mask[idx]))
        correct.append((np.argmax(out.logits, -1) == split.labels[idx])[: len(keep)])
    return float(np.concatenate(correct).mean())


def select_inner_lrs(cfg, apply, mcfg: MambaConfig, theta, outer: Split, seed: int) -> dict:
    """The inner learning rate of each adapter family the methods use, chosen on the outer
    split (never the test): uniform TTT at K_max from ψ₀ on its first ``4 * eval.batch``
    inputs, for each rate of ``attd.inner_lr_grid``; the most accurate wins (ties: the
    smaller rate). Returns ``{family: {grid, accuracy, chosen}}``."""
    names = tuple(cfg.methods) + tuple(cfg.ablation_methods)
    families = sorted({parse_method(n).adapter or "low_rank" for n in names})
    n = 4 * cfg.eval.batch
    probe = Split(*(np.asarray(x)[:n] for x in outer))
    grid = [float(lr) for lr in cfg.attd.inner_lr_grid]
    out = {}
    for family in families:
        name = "ttt" if family == "low_rank" else f"ttt+{family}"
        psi0 = initial_psi(name, mcfg, cfg, seed)
        accuracy = []
        for lr in grid:
            method = make_method(name, apply, mcfg, cfg, inner_lr=lr)
            accuracy.append(_accuracy(method, method.init(theta, psi0), probe, cfg.eval.batch))
        out[family] = {"grid": grid, "accuracy": accuracy, "chosen": grid[int(np.argmax(accuracy))]}
    return out


def initial_thresholds(name: str, signal: np.ndarray, k_max: int) -> np.ndarray | None:
    """Start thresholds at quantiles of s on training inputs, so K spreads over 0..K_max.

    ATTD: :func:`attd.controller.quantile_thresholds`; the gate: the median; others: None.
    """
    base = parse_method(name).base
    if base == "gate":
        return quantile_thresholds(signal, 1)
    if base not in ("attd", "attd_nocost"):
        return None
    return quantile_thresholds(signal, k_max)


def outer_optimizer(cfg) -> optax.GradientTransformation:
    """Adam with one learning rate per part of :class:`ATTDParams` (θ, ψ₀, thresholds);
    ``finetune.freeze_theta`` keeps θ as pretrained (no Adam state is kept for it)."""
    f = cfg.finetune

    def labels(params):
        parts = zip(ATTDParams._fields, params, strict=True)
        return ATTDParams(*(jax.tree.map(lambda _, n=n: n, part) for n, part in parts))

    return optax.multi_transform(
        {
            "theta": optax.set_to_zero() if f.freeze_theta else optax.adam(f.lr_theta),
            "psi": optax.adam(f.lr_psi),
            "controller": optax.adam(f.lr_thresholds),
        },
        labels,
    )


# ------------------------------------------------------------------------------ evaluation


class Compiled(NamedTuple):
    """A method's jitted pieces, shared by every seed of a task; ``train_step`` splits its
    batches over ``mesh`` when there is one."""

    method: ATTD
    train_step: train.Step
    mesh: jax.sharding.Mesh | None
    signal: Any
    adapted_signal: Any
    radius: Any
    classify: Any


def compile_method(
    name: str,
    apply,
    mcfg: MambaConfig,
    cfg,
    inner_lr: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Compiled:
    method = make_method(name, apply, mcfg, cfg, inner_lr)

    def adapted_signal(params, psi, tokens, mask):
        """L_int of each input under its own adapted ψ: (B,)."""
        one = lambda p, x, m: method.signal(params._replace(psi=p), x[None], m[None])[0]
        return jax.vmap(one)(psi, tokens, mask)

    return Compiled(
        method,
        sharding.shard_step(method.train_step(outer_optimizer(cfg)), mesh),
        mesh,
        jax.jit(method.signal),
        jax.jit(adapted_signal),
        jax.jit(method.transition_radius),
        jax.jit(method.classify),
    )


def _padded_batches(n: int, batch: int):
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch)
        yield idx[idx < n], np.minimum(idx, n - 1)


def evaluate_split(c: Compiled, params: ATTDParams, split: Split, batch: int) -> dict[str, Any]:
    """Per-example correctness, K, L_int before/after adaptation, the change of the true
    class's log-probability from ψ₀ to the adapted ψ (``dlogp``) and ρ(Ā) (masked path)."""
    n = len(split.labels)
    keys = ("correct", "k", "lint_before", "lint_after", "dlogp", "rho")
    out = {k: np.zeros(n) for k in keys}
    for keep, idx in _padded_batches(n, batch):
        tokens, mask = jnp.asarray(split.tokens[idx]), jnp.asarray(split.mask[idx])
        o = c.method.predict(params, tokens, mask)
        r = len(keep)
        labels = split.labels[idx]
        out["correct"][keep] = (np.argmax(o.logits, -1) == labels)[:r]
        out["dlogp"][keep] = (
            true_class_log_prob(o.logits, labels)
            - true_class_log_prob(c.classify(params, tokens, mask), labels)
        )[:r]
        out["k"][keep] = np.asarray(o.hard_steps)[:r]
        out["lint_before"][keep] = np.asarray(o.signal)[:r]
        out["lint_after"][keep] = np.asarray(c.adapted_signal(params, o.psi, tokens, mask))[:r]
        out["rho"][keep] = np.asarray(c.radius(params, tokens, o.psi))[:r]
    return out


def true_class_log_prob(logits, labels) -> np.ndarray:
    """log p(label) of each row of ``logits`` (B, C), in float64: (B,)."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    return logits[np.arange(len(labels)), np.asarray(labels)] - log_z


def _probe_signal(c: Compiled, params: ATTDParams, split: Split, batch: int) -> np.ndarray:
    """s on the first ``4 * batch`` inputs of ``split`` (where thresholds are calibrated)."""
    tokens, mask = split.tokens[: 4 * batch], split.mask[: 4 * batch]
    return np.asarray(c.signal(params, jnp.asarray(tokens), jnp.asarray(mask)))


def train_outer(
    cfg, c: Compiled, name: str, theta, outer: Split, seed: int, psi0, run_dir: str
) -> tuple[ATTDParams, list[dict[str, Any]], float]:
    """A method's outer parameters trained from the base on ``outer`` (resumable in
    ``run_dir``), thresholds started at quantiles of s on it: ``(params, every step's metrics,
    the training's seconds)``, the parameters this process's own arrays also when trained on
    ``c.mesh``."""
    s_outer = _probe_signal(c, c.method.init(theta, psi0), outer, cfg.eval.batch)
    params = c.method.init(theta, psi0, initial_thresholds(name, s_outer, cfg.attd.k_max))
    start = time.perf_counter()
    idx = _batches(seed + 1, len(outer.labels), cfg.finetune.steps, cfg.finetune.batch)
    state, logged = fit_on_split(
        c.train_step,
        c.train_step.init(params),
        outer,
        idx,
        run_dir,
        cfg.finetune.checkpoint_every,
    )
    seconds = time.perf_counter() - start
    params = state.params if c.mesh is None else sharding.local_copy(state.params)
    return params, logged, seconds


def run_cell(
    cfg,
    c: Compiled,
    name: str,
    theta,
    task: LRATask,
    seed: int,
    psi0,
    run_dir: str,
    outer: Split | None = None,
) -> dict[str, Any]:
    """Train one method's outer parameters from the base on ``outer`` (default: the training
    split) and score it: a JSON-able dict.

    Thresholds start at quantiles of s on ``outer``; with ``attd.recalibrate`` they are set
    again at the same quantiles of s under the trained parameters, so that s drifting during
    outer training cannot leave them stranded. The outer training is resumable:
    :func:`metattt.train.fit` checkpoints in ``run_dir``.
    """
    k_max = c.method.controller.max_steps
    outer = task.train if outer is None else outer
    params, logged, finetune_s = train_outer(cfg, c, name, theta, outer, seed, psi0, run_dir)
    thresholds = np.asarray(c.method.controller.thresholds(params.controller)).tolist()
    cell: dict[str, Any] = {
        "method": name,
        "finetune_seconds": finetune_s,
        "final_train_loss": logged[-1]["loss"],
        "final_train_accuracy": logged[-1]["accuracy"],
        "skipped_outer_steps": int(sum(row["skipped"] for row in logged)),
        "thresholds": thresholds,
    }
    if cfg.attd.recalibrate and parse_method(name).base in CONTROLLED:
        s_trained = _probe_signal(c, params, outer, cfg.eval.batch)
        again = initial_thresholds(name, s_trained, k_max)
        params = params._replace(controller=c.method.controller.init(again))
        cell["learned_thresholds"] = thresholds
        cell["thresholds"] = np.asarray(again).tolist()
    for split_name in ("test_id", "test_shift"):
        split = getattr(task, split_name)
        ev = evaluate_split(c, params, split, cfg.eval.batch)
        tag = split_name.removeprefix("test_")
        cell[f"acc_{tag}"] = float(ev["correct"].mean())
        cell[f"mean_k_{tag}"] = float(ev["k"].mean())
        cell[f"k_hist_{tag}"] = np.bincount(ev["k"].astype(int), minlength=k_max + 1).tolist()
        cell[f"inner_steps_{tag}"] = int(ev["k"].sum())
        cell[f"lint_before_{tag}"] = float(ev["lint_before"].mean())
        cell[f"lint_after_{tag}"] = float(ev["lint_after"].mean())
        cell[f"max_rho_{tag}"] = float(ev["rho"].max())
        cell[f"examples_{tag}"] = {
            "k": ev["k"].astype(int).tolist(),
            "difficulty": np.asarray(split.difficulty).astype(float).tolist(),
            "correct": ev["correct"].astype(int).tolist(),
            "lint_drop": (ev["lint_before"] - ev["lint_after"]).tolist(),
            "dlogp": ev["dlogp"].tolist(),
        }
    if cfg.eval.timing_repeats == 0:  # no wall-time measurement (the demo): NaN, not a guess
        for key in ("masked_ms_per_example", "grouped_ms_per_example", "timing_batch"):
            cell[key] = math.nan
        cell.update({f"timing_{key}": math.nan for key in _TIMING_KEYS})
        return cell
    shift = task.test_shift
    b = min(cfg.eval.batch, len(shift.labels))
    timing = benchmark_eval_paths(
        c.method,
        params,
        jnp.asarray(shift.tokens[:b]),
        jnp.asarray(shift.mask[:b]),
        repeats=cfg.eval.timing_repeats,
    )
    cell["masked_ms_per_example"] = 1e3 * timing["masked_s"] / b
    cell["grouped_ms_per_example"] = 1e3 * timing["grouped_s"] / b
    cell["timing_batch"] = b
    cell.update({f"timing_{key}": timing[key] for key in _TIMING_KEYS})
    return cell


# ------------------------------------------------------------------------------------- run
