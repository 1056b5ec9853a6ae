"""Pretraining the base Mamba, and training and scoring one method's cell."""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attd.controller import quantile_thresholds
from attd.lra import LRATask, Split
from attd.mamba import MambaConfig
from attd.method import ATTD, ATTDParams, benchmark_eval_paths, make_attd
from experiments.attd_lra.methods import BASES, parse_method
from metattt import objectives, runlog, train


def _batches(seed: int, n: int, steps: int, batch: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, (steps, batch))


def make_pretrain_step(apply, lr: float, lm_weight: float) -> train.Step:
    """Adam on θ of L_task + lm_weight · next-token CE; logs both terms."""

    def loss_fn(theta, batch):
        tokens, mask, labels = batch
        task = objectives.cross_entropy(apply(theta, tokens, mask=mask), labels)
        lm = objectives.next_token_cross_entropy(apply(theta, tokens, head="lm"), tokens, mask)
        return task + lm_weight * lm, {"task_loss": task, "lm_loss": lm}

    return train.supervised(loss_fn, optax.adam(lr), has_aux=True)


def fit_on_split(step: train.Step, state, split: Split, idx: np.ndarray, run_dir: str, every: int):
    """``step`` over the batches ``split[idx[i]]``, resumable in ``run_dir``.

    Returns ``(state, the last step's metrics)``; every step is logged, so the last one is read
    back from ``run_dir/metrics.jsonl`` also when the run resumed at its end.
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
    return state, runlog.read_metrics(os.path.join(run_dir, "metrics.jsonl"))[-1]


def pretrain(cfg, theta, split: Split, seed: int, step: train.Step, run_dir: str):
    """Pretrain the base Mamba; returns θ and ``{task_loss, lm_loss, seconds}``."""
    start = time.perf_counter()
    idx = _batches(seed, len(split.labels), cfg.pretrain.steps, cfg.pretrain.batch)
    state, last = fit_on_split(
        step, step.init(theta), split, idx, run_dir, cfg.pretrain.checkpoint_every
    )
    info = {"task_loss": last["task_loss"], "lm_loss": last["lm_loss"]}
    info["seconds"] = time.perf_counter() - start
    return state.params, info


def make_method(name: str, apply, mcfg: MambaConfig, cfg) -> ATTD:
    """One of the methods: the same ATTD code path, another controller (``attd_nocost``:
    ATTD without the step cost, λ = 0, to see what the task loss alone does to K), and the
    variants of its name (order, inner rule: ``+sgd`` uses ``attd.sgd_lr``)."""
    a = cfg.attd
    spec = parse_method(name)
    rule_name = spec.inner_opt or a.inner_opt
    if rule_name == "adam":
        rule = optax.adam(a.inner_lr, eps_root=a.adam_eps_root)
    else:  # SGD needs a far larger step than Adam (∂L_int/∂U is small); see the report
        rule = optax.sgd(a.sgd_lr if spec.inner_opt == "sgd" else a.inner_lr)
    controller = BASES[spec.base].make(a.k_max, a.temperature)
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
    )


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
    """Adam with one learning rate per part of :class:`ATTDParams` (θ, ψ₀, thresholds)."""
    f = cfg.finetune

    def labels(params):
        parts = zip(ATTDParams._fields, params, strict=True)
        return ATTDParams(*(jax.tree.map(lambda _, n=n: n, part) for n, part in parts))

    return optax.multi_transform(
        {
            "theta": optax.adam(f.lr_theta),
            "psi": optax.adam(f.lr_psi),
            "controller": optax.adam(f.lr_thresholds),
        },
        labels,
    )


# ------------------------------------------------------------------------------ evaluation


class Compiled(NamedTuple):
    """A method's jitted pieces, shared by every seed of a task."""

    method: ATTD
    train_step: train.Step
    signal: Any
    adapted_signal: Any
    radius: Any


def compile_method(name: str, apply, mcfg: MambaConfig, cfg) -> Compiled:
    method = make_method(name, apply, mcfg, cfg)

    def adapted_signal(params, psi, tokens, mask):
        """L_int of each input under its own adapted ψ: (B,)."""
        one = lambda p, x, m: method.signal(params._replace(psi=p), x[None], m[None])[0]
        return jax.vmap(one)(psi, tokens, mask)

    return Compiled(
        method,
        method.train_step(outer_optimizer(cfg)),
        jax.jit(method.signal),
        jax.jit(adapted_signal),
        jax.jit(method.transition_radius),
    )


def _padded_batches(n: int, batch: int):
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch)
        yield idx[idx < n], np.minimum(idx, n - 1)


def evaluate_split(c: Compiled, params: ATTDParams, split: Split, batch: int) -> dict[str, Any]:
    """Per-example correctness, K, L_int before/after adaptation and ρ(Ā) (masked path)."""
    n = len(split.labels)
    out = {k: np.zeros(n) for k in ("correct", "k", "lint_before", "lint_after", "rho")}
    for keep, idx in _padded_batches(n, batch):
        tokens, mask = jnp.asarray(split.tokens[idx]), jnp.asarray(split.mask[idx])
        o = c.method.predict(params, tokens, mask)
        r = len(keep)
        out["correct"][keep] = (np.argmax(o.logits, -1) == split.labels[idx])[:r]
        out["k"][keep] = np.asarray(o.hard_steps)[:r]
        out["lint_before"][keep] = np.asarray(o.signal)[:r]
        out["lint_after"][keep] = np.asarray(c.adapted_signal(params, o.psi, tokens, mask))[:r]
        out["rho"][keep] = np.asarray(c.radius(params, tokens, o.psi))[:r]
    return out


def run_cell(
    cfg, c: Compiled, name: str, theta, task: LRATask, seed: int, psi0, run_dir: str
) -> dict[str, Any]:
    """Train one method's outer parameters from the base and score it: a JSON-able dict.

    The outer training is resumable: :func:`metattt.train.fit` checkpoints in ``run_dir``.
    """
    k_max = c.method.controller.max_steps
    base = c.method.init(theta, psi0)
    probe = task.train.tokens[: 4 * cfg.eval.batch], task.train.mask[: 4 * cfg.eval.batch]
    s_train = np.asarray(c.signal(base, jnp.asarray(probe[0]), jnp.asarray(probe[1])))
    params = c.method.init(theta, psi0, initial_thresholds(name, s_train, cfg.attd.k_max))
    start = time.perf_counter()
    idx = _batches(seed + 1, len(task.train.labels), cfg.finetune.steps, cfg.finetune.batch)
    state, last = fit_on_split(
        c.train_step,
        c.train_step.init(params),
        task.train,
        idx,
        run_dir,
        cfg.finetune.checkpoint_every,
    )
    params = state.params
    finetune_s = time.perf_counter() - start
    cell: dict[str, Any] = {
        "method": name,
        "finetune_seconds": finetune_s,
        "final_train_loss": last["loss"],
        "final_train_accuracy": last["accuracy"],
        "thresholds": np.asarray(c.method.controller.thresholds(params.controller)).tolist(),
    }
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
        }
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
    for key in ("inner_steps", "executed_steps", "masked_steps", "max_abs_diff"):
        cell[f"timing_{key}"] = timing[key]
    return cell


# ------------------------------------------------------------------------------------- run
