"""ATTD on Long Range Arena tasks: fixed Mamba, full TTT, ponder-or-not and ATTD compared.

For each task (ListOps, Pathfinder, Text) and seed:

1. Data: a train split, an in-distribution test split and a *shifted* test split
   (ListOps: deeper nesting and longer expressions; Pathfinder: longer main paths and more
   distractors; Text: held-out files cut into longer passages).
2. Base: one Mamba pretrained on the train split with the task loss plus the next-token loss
   (so that the ponder signal s = L_int means something), cached as ``base.npz``; every method
   of this task and seed starts from it.
3. Methods, all through :func:`attd.method.make_attd` (only the controller differs): fixed
   (K = 0), full TTT (K = K_max), ponder-or-not (K ∈ {0, K_max}, one threshold) and ATTD
   (K_max ordered thresholds). Each trains its outer parameters (θ, ψ₀, thresholds) for the
   same few steps on the same batches; thresholds start at quantiles of s on the train split.
4. Scores on both test splits: accuracy, K per input (mean, histogram), inner steps, L_int
   before and after adaptation, max ρ(Ā) of the adapted dynamics, and the wall time per
   example of the masked (K_max) and grouped (compute follows K) evaluation paths.

A method name is a controller, optionally with variants joined by ``+`` (see
:func:`parse_method`): ``attd+so`` is ATTD trained second order through the inner loop,
``ttt+sgd`` full TTT with an SGD inner rule, ``ttt+r8`` full TTT with ψ of rank 8,
``ttt+so+j`` second-order full TTT whose outer loss also keeps the self-supervised loss. So the
first- vs second-order comparison (``configs/attd_lra.py:second_order``) is the same code path
with one switch, and ``config.ablation_methods`` run on ``config.ablation_seeds`` only.

Every (task, seed, method) cell is cached as JSON under ``workdir/<task>/seed_<s>/``, so a
rerun skips finished cells. ``results.json``, ``summary.md`` and the plots go into
``workdir``; ``python -m experiments.run --report --workdir W`` renders them into
BENCHMARKS.md and docs/.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attd import lra
from attd.controller import (
    fixed_controller,
    gate_controller,
    quantile_thresholds,
    threshold_controller,
)
from attd.dynamics import init_psi
from attd.mamba import MambaConfig, init_mamba
from attd.method import ATTD, OBJECTIVES, ATTDParams, benchmark_eval_paths, make_attd
from experiments import harness, report
from metattt import objectives, runlog, stats, train

logger = logging.getLogger(__name__)
TASKS = ("listops", "pathfinder", "text")
METHODS = ("fixed", "ttt", "gate", "attd", "attd_nocost")
METHOD_LABELS = {
    "fixed": "fixed Mamba (K=0)",
    "ttt": "full TTT (K=K_max)",
    "gate": "ponder-or-not",
    "attd": "ATTD",
    "attd_nocost": "ATTD, λ=0 (ablation)",
}
CONTROLLED = ("gate", "attd", "attd_nocost")  # methods whose K depends on the input
INNER_RULES = ("adam", "sgd")
#: Per task: the difficulty the K-vs-difficulty plot and correlation use, and its label.
DIFFICULTY = {"listops": "nesting depth", "pathfinder": "path length", "text": "length (bytes)"}
SEED_STRIDE = 10_007  # data seed = seed * SEED_STRIDE + the split's offset


class MethodSpec(NamedTuple):
    """A parsed method name: the controller and what differs from the config's defaults.

    Attributes:
        base: one of :data:`METHODS` (the controller).
        second_order: ``+so``; ``None`` keeps ``attd.first_order`` of the config.
        inner_opt: ``+sgd`` / ``+adam``; ``None`` keeps ``attd.inner_opt``.
        psi_rank: ``+r<N>``; ``None`` keeps ``model.psi_rank``.
        joint: ``+j``: the outer objective adds ``attd.joint_weight`` · E[L_int(ψ₀)] (joint
            training of task and self-supervised loss, :func:`attd.method.make_attd`'s
            ``int_weight``); ``None``: no such term.
    """

    base: str
    second_order: bool | None = None
    inner_opt: str | None = None
    psi_rank: int | None = None
    joint: bool | None = None


def parse_method(name: str) -> MethodSpec:
    """``"attd+so"`` -> ``MethodSpec("attd", second_order=True)``; ``"ttt+sgd+r8"`` -> SGD inner
    rule and ψ rank 8.

    Raises:
        ValueError: unknown controller, unknown or repeated variant.
    """
    base, *variants = str(name).split("+")
    if base not in METHODS:
        raise ValueError(f"method {name!r}: the controller must be one of {METHODS}")
    fields: dict[str, Any] = {}
    for v in variants:
        if v == "so":
            key, value = "second_order", True
        elif v == "j":
            key, value = "joint", True
        elif v in INNER_RULES:
            key, value = "inner_opt", v
        elif v[:1] == "r" and v[1:].isdigit() and int(v[1:]) >= 1:
            key, value = "psi_rank", int(v[1:])
        else:
            raise ValueError(
                f"method {name!r}: unknown variant {v!r} (known: so, sgd, adam, r<rank>, j)"
            )
        if key in fields:
            raise ValueError(f"method {name!r}: {key} given twice")
        fields[key] = value
    return MethodSpec(base, **fields)


def method_label(name: str) -> str:
    """The table label of a method name, e.g. ``"ATTD, 2nd order"``."""
    spec = parse_method(name)
    extra = []
    if spec.second_order:
        extra.append("2nd order")
    if spec.inner_opt:
        extra.append(f"{spec.inner_opt.upper() if spec.inner_opt == 'sgd' else 'Adam'} inner")
    if spec.psi_rank:
        extra.append(f"ψ rank {spec.psi_rank}")
    if spec.joint:
        extra.append("joint L_int")
    return ", ".join([METHOD_LABELS[spec.base], *extra])


def seed_methods(cfg, seed: int) -> tuple[str, ...]:
    """The methods run for ``seed``: all of ``methods``, and the ablation on its seeds."""
    extra = tuple(cfg.ablation_methods) if seed in tuple(cfg.ablation_seeds) else ()
    return tuple(cfg.methods) + extra


class Split(NamedTuple):
    """N examples of one split: (N, L) tokens and mask, (N,) labels and difficulty."""

    tokens: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    difficulty: np.ndarray


class LRATask(NamedTuple):
    """One task's splits and sizes."""

    train: Split
    test_id: Split
    test_shift: Split
    vocab_size: int
    num_classes: int


# ----------------------------------------------------------------------------- config checks


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    if not cfg.seeds:
        raise ValueError("config.seeds is empty")
    if not cfg.tasks or any(t not in TASKS for t in cfg.tasks):
        raise ValueError(f"config.tasks must be a non-empty subset of {TASKS}, got {cfg.tasks}")
    if not cfg.methods:
        raise ValueError(f"config.methods must name methods built on {METHODS}, got none")
    names = tuple(cfg.methods) + tuple(cfg.ablation_methods)
    if len(set(names)) != len(names):
        raise ValueError(f"config.methods and config.ablation_methods repeat a name: {names}")
    for name in names:
        try:
            parse_method(name)
        except ValueError as e:
            raise ValueError(f"config.methods must be built on {METHODS}: {e}") from None
    if cfg.ablation_methods and not set(cfg.ablation_seeds) <= set(cfg.seeds):
        raise ValueError(
            f"config.ablation_seeds {tuple(cfg.ablation_seeds)} must be among config.seeds"
        )
    if not (isinstance(cfg.section, str) and cfg.section.replace("_", "").isalnum()):
        raise ValueError(f"config.section must be a name like 'attd_lra', got {cfg.section!r}")
    if not (isinstance(cfg.figure_prefix, str) and cfg.figure_prefix.replace("_", "").isalnum()):
        raise ValueError(
            f"config.figure_prefix must be a name like 'attd', got {cfg.figure_prefix!r}"
        )
    a = cfg.attd
    if not isinstance(a.k_max, int) or not 1 <= a.k_max <= 16:
        raise ValueError(f"attd.k_max must be an int in [1, 16], got {a.k_max!r}")
    if a.objective not in OBJECTIVES:
        raise ValueError(f"attd.objective must be one of {OBJECTIVES}, got {a.objective!r}")
    if a.inner_opt not in INNER_RULES:
        raise ValueError(f"attd.inner_opt must be 'adam' or 'sgd', got {a.inner_opt!r}")
    for name in ("inner_lr", "sgd_lr", "temperature"):
        if not a[name] > 0:
            raise ValueError(f"attd.{name} must be positive, got {a[name]}")
    names = ("steps", "batch", "checkpoint_every")
    for name in (f"{section}.{key}" for section in ("pretrain", "finetune") for key in names):
        section, key = name.split(".")
        if not cfg[section][key] >= 1:
            raise ValueError(f"{name} must be >= 1, got {cfg[section][key]}")
    if not a.adam_eps_root >= 0:
        raise ValueError(f"attd.adam_eps_root must be >= 0, got {a.adam_eps_root}")
    if not a.joint_weight >= 0:
        raise ValueError(f"attd.joint_weight must be >= 0, got {a.joint_weight}")
    for name in tuple(cfg.methods) + tuple(cfg.ablation_methods):
        spec = parse_method(name)
        second = spec.second_order or not a.first_order
        if second and (spec.inner_opt or a.inner_opt) == "adam" and a.adam_eps_root == 0:
            raise ValueError(
                f"method {name!r} is second order through Adam: set attd.adam_eps_root > 0 "
                "(∂√v is infinite at v = 0, and V's first inner gradient is exactly 0 when U₀ = 0)"
            )
    if cfg.eval.batch < 1 or cfg.eval.timing_repeats < 1 or cfg.eval.bootstrap < 10:
        raise ValueError("eval.batch and eval.timing_repeats must be >= 1, eval.bootstrap >= 10")
    model_config(cfg, 16, 2)  # model sizes


def model_config(cfg, vocab_size: int, num_classes: int) -> MambaConfig:
    """The Mamba of one task (its vocabulary and classes) from the model section."""
    m = cfg.model
    if not isinstance(m.psi_rank, int) or m.psi_rank < 1:
        raise ValueError(f"model.psi_rank must be a positive int, got {m.psi_rank!r}")
    return MambaConfig(
        vocab_size=vocab_size,
        d_model=m.d_model,
        n_layers=m.n_layers,
        d_state=m.d_state,
        expand=m.expand,
        num_classes=num_classes,
        scan_chunk_size=m.scan_chunk_size,
        lean_backward=m.lean_backward,
    )


# ------------------------------------------------------------------------------------ data


def _data_seed(seed: int, offset: int) -> int:
    return int(seed) * SEED_STRIDE + int(offset)


def _listops(c, seed: int, exclude: frozenset[str] = frozenset()) -> tuple[Split, set[str]]:
    """``c.num`` expressions not in ``exclude`` (so test expressions are unseen in training)."""
    data = lra.generate_listops(
        c.num + len(exclude),
        seed=_data_seed(seed, c.seed_offset),
        min_depth=c.min_depth,
        max_depth=c.max_depth,
        min_length=c.min_length,
        max_length=c.max_length,
        seq_len=c.seq_len,
    )
    keep = np.array([s not in exclude for s in data.sources])
    idx = np.flatnonzero(keep)[: c.num]
    split = Split(data.tokens[idx], data.mask[idx], data.labels[idx], data.depth[idx])
    return split, {data.sources[i] for i in idx}


def _pathfinder(c, seed: int) -> Split:
    data = lra.generate_pathfinder(
        c.num,
        seed=_data_seed(seed, c.seed_offset),
        size=tuple(c.size),
        path_length=tuple(c.path_length),
        num_distractors=tuple(c.num_distractors),
        distractor_length=c.distractor_length,
    )
    tokens = lra.to_sequences(data.images)
    return Split(tokens, np.ones_like(tokens, bool), data.labels, data.path_length)


def _subsample(text: lra.ByteText, num: int, seed: int) -> Split:
    idx = np.sort(np.random.default_rng(seed).permutation(len(text.labels))[:num])
    return Split(text.tokens[idx], text.mask[idx], text.labels[idx], text.length[idx])


def load_task(cfg, task: str, seed: int) -> LRATask:
    """The train, in-distribution test and shifted test splits of ``task`` for ``seed``."""
    d = cfg.data[task]
    if task == "listops":
        train, seen = _listops(d.train, seed)
        test_id, _ = _listops(d.test_id, seed, frozenset(seen))
        test_shift, _ = _listops(d.test_shift, seed, frozenset(seen))
        return LRATask(train, test_id, test_shift, len(lra.listops.VOCAB), 10)
    if task == "pathfinder":
        return LRATask(
            _pathfinder(d.train, seed),
            _pathfinder(d.test_id, seed),
            _pathfinder(d.test_shift, seed),
            256,
            2,
        )
    splits, _ = lra.stdlib_text_task(
        seq_len=d.seq_len,
        test_length=d.test_length,
        corpus=d.corpus,
        seed=seed,
        max_per_class=d.max_per_class,
    )
    train = splits["train"]
    return LRATask(
        Split(train.tokens, train.mask, train.labels, train.length),
        _subsample(splits["val"], d.num_test, seed),  # held-out files, training length
        _subsample(splits["test"], d.num_test, seed + 1),  # other held-out files, longer
        257,
        2,
    )


# -------------------------------------------------------------------------------- training


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
    controller = {
        "fixed": lambda: fixed_controller(0),
        "ttt": lambda: fixed_controller(a.k_max),
        "gate": lambda: gate_controller(a.k_max, temperature=a.temperature),
        "attd": lambda: threshold_controller(a.k_max, temperature=a.temperature),
        "attd_nocost": lambda: threshold_controller(a.k_max, temperature=a.temperature),
    }[spec.base]()
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


def _dump(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run(cfg, workdir: str) -> dict[str, Any]:
    """Every (task, seed, method) cell (cached), then the aggregate results, table and plots."""
    validate(cfg)
    root = pathlib.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    base_info: dict[str, dict[int, Any]] = {}
    todo = len(cfg.tasks) * sum(len(seed_methods(cfg, s)) for s in cfg.seeds)
    bar = runlog.progress(total=todo, desc="attd_lra cells")
    for task_name in cfg.tasks:
        cells[task_name], base_info[task_name] = {}, {}
        compiled: dict[str, Compiled] = {}
        pretrain_step = None
        for seed in cfg.seeds:
            cell_dir = root / task_name / f"seed_{seed}"
            cell_dir.mkdir(parents=True, exist_ok=True)
            paths = {m: cell_dir / f"{m}.json" for m in seed_methods(cfg, seed)}
            cells[task_name][seed] = {
                m: json.loads(p.read_text()) for m, p in paths.items() if p.exists()
            }
            base_path = cell_dir / "base" / "info.json"
            if len(cells[task_name][seed]) == len(paths) and base_path.exists():
                base_info[task_name][seed] = json.loads(base_path.read_text())
                bar.update(len(paths))
                continue
            task = load_task(cfg, task_name, seed)
            mcfg = model_config(cfg, task.vocab_size, task.num_classes)
            apply, theta = init_mamba(mcfg, seed=seed)
            if pretrain_step is None:
                pretrain_step = make_pretrain_step(apply, cfg.pretrain.lr, cfg.pretrain.lm_weight)
            theta, base_info[task_name][seed] = harness.params_cell(
                cell_dir / "base",
                theta,
                lambda run_dir, t=theta, tr=task.train, s=seed: pretrain(
                    cfg, t, tr, s, pretrain_step, run_dir
                ),
            )
            for name in paths:
                if name in cells[task_name][seed]:
                    bar.update(1)
                    continue
                if name not in compiled:
                    compiled[name] = compile_method(name, apply, mcfg, cfg)
                rank = parse_method(name).psi_rank or cfg.model.psi_rank
                psi0 = init_psi(mcfg, rank, jax.random.key(seed), cfg.model.psi_scale)
                run_dir = str(cell_dir / f"{name}_run")
                cell = harness.json_cell(
                    paths[name],
                    lambda n=name, p=psi0, r=run_dir: run_cell(
                        cfg, compiled[n], n, theta, task, seed, p, r
                    ),
                )
                cells[task_name][seed][name] = cell
                logger.info(
                    "%s seed %d %s: acc id %.3f shift %.3f, mean K %.2f",
                    task_name, seed, name, cell["acc_id"], cell["acc_shift"],
                    cell["mean_k_shift"],
                )  # fmt: skip
                bar.update(1)
    bar.close()
    results = aggregate(cfg, cells, base_info)
    _dump(root / "results.json", results)
    (root / "summary.md").write_text(summary_table(results) + "\n")
    plot_accuracy_vs_k(results, str(root / f"{cfg.figure_prefix}_accuracy_vs_k.png"))
    plot_k_vs_difficulty(results, str(root / f"{cfg.figure_prefix}_k_vs_difficulty.png"))
    return results


# ------------------------------------------------------------------------------- aggregate

SCALARS = (
    "acc_id",
    "acc_shift",
    "mean_k_id",
    "mean_k_shift",
    "inner_steps_shift",
    "lint_before_shift",
    "lint_after_shift",
    "max_rho_shift",
    "masked_ms_per_example",
    "grouped_ms_per_example",
    "finetune_seconds",
)


def _ci(values) -> dict[str, float]:
    m = stats.mean_ci(values)
    return {"mean": m.mean, "ci": m.half_width if np.isfinite(m.half_width) else 0.0}


def aggregate(cfg, cells, base_info) -> dict[str, Any]:
    """Means over seeds (± 95% t-interval) per task and method, K histograms summed over
    seeds, and per task the Spearman correlation (bootstrap CI) of ATTD's K with difficulty
    over both test splits pooled over seeds; the per-example data stays for the plots."""
    out: dict[str, Any] = {
        "seeds": list(cfg.seeds),
        "k_max": cfg.attd.k_max,
        "tasks": {},
        "base": {t: {str(s): v for s, v in b.items()} for t, b in base_info.items()},
    }
    for task_name, by_seed in cells.items():
        table: dict[str, Any] = {}
        for name in dict.fromkeys(tuple(cfg.methods) + tuple(cfg.ablation_methods)):
            rows = [by_seed[s][name] for s in cfg.seeds if name in by_seed[s]]
            entry = {k: _ci([r[k] for r in rows]) for k in SCALARS}
            entry["acc_shift_seeds"] = [r["acc_shift"] for r in rows]
            entry["seeds"] = [s for s in cfg.seeds if name in by_seed[s]]
            entry["k_hist_shift"] = np.sum([r["k_hist_shift"] for r in rows], axis=0).tolist()
            entry["k_hist_id"] = np.sum([r["k_hist_id"] for r in rows], axis=0).tolist()
            entry["max_rho"] = max(max(r["max_rho_id"], r["max_rho_shift"]) for r in rows)
            entry["max_abs_path_diff"] = max(r["timing_max_abs_diff"] for r in rows)
            ex = {
                key: np.concatenate(
                    [r[f"examples_{t}"][key] for r in rows for t in ("id", "shift")]
                )
                for key in ("k", "difficulty", "correct", "lint_drop")
            }
            entry["examples"] = {k: v.tolist() for k, v in ex.items()}
            adapted = ex["k"] > 0
            entry["lint_lowered_share"] = (
                float(np.mean(ex["lint_drop"][adapted] > 0)) if adapted.any() else float("nan")
            )
            ci = (
                stats.spearman_ci(ex["k"], ex["difficulty"], num_resamples=cfg.eval.bootstrap)
                if parse_method(name).base in CONTROLLED
                else None
            )
            entry["spearman_k_difficulty"] = None if ci is None else ci._asdict()
            entry["thresholds"] = [r["thresholds"] for r in rows]
            # Does a larger L_int drop go with a right answer? (methods that adapt every input)
            drop_ci = (
                stats.spearman_ci(ex["lint_drop"], ex["correct"], num_resamples=cfg.eval.bootstrap)
                if adapted.all() and ex["k"].size >= 3 and np.isfinite(ex["lint_drop"]).all()
                else None
            )
            entry["spearman_drop_correct"] = None if drop_ci is None else drop_ci._asdict()
            table[name] = entry
        out["tasks"][task_name] = table
    return out


# --------------------------------------------------------------------------------- tables


def _fmt(e: dict[str, float], digits: int = 3) -> str:
    if e["ci"] and np.isfinite(e["ci"]):
        return f"{e['mean']:.{digits}f} ± {e['ci']:.{digits}f}"
    return f"{e['mean']:.{digits}f}"


def _hist(counts: list[int]) -> str:
    total = max(sum(counts), 1)
    return " / ".join(f"{100 * c / total:.0f}" for c in counts)


def _rho(ci: dict[str, float] | None) -> str:
    if ci is None:
        return "-"
    if not np.isfinite(ci["estimate"]):
        return "n/a (K constant)"
    if not (np.isfinite(ci["low"]) and np.isfinite(ci["high"])):
        return f"{ci['estimate']:+.2f} (no CI: K constant in some resamples)"
    return f"{ci['estimate']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]"


def summary(results: dict[str, Any], cfg) -> str:
    """The table :mod:`experiments.run` prints at the end."""
    del cfg
    return summary_table(results)


def summary_table(results: dict[str, Any]) -> str:
    """One markdown table per task: accuracy, K, compute, L_int, ρ(Ā), wall time, Spearman."""
    k_max = results["k_max"]
    parts = []
    for task_name, table in results["tasks"].items():
        parts += [
            f"**{task_name}** (means over seeds {results['seeds']} ± 95% CI; K histogram in % "
            f"of test inputs for K = 0..{k_max}; Spearman of K with {DIFFICULTY[task_name]} "
            "over both test splits, bootstrap 95% CI)",
            "",
            "| method | acc (in-dist.) | acc (shifted) | mean K (shifted) | K histogram "
            "(shifted) | inner steps / split | L_int before → after (shifted) | L_int lowered "
            "| max ρ(Ā) | ms/example masked | ms/example grouped | Spearman K~difficulty |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, e in table.items():
            lowered = e["lint_lowered_share"]
            parts.append(
                f"| {method_label(name)} | {_fmt(e['acc_id'])} | {_fmt(e['acc_shift'])} | "
                f"{_fmt(e['mean_k_shift'], 2)} | {_hist(e['k_hist_shift'])} | "
                f"{e['inner_steps_shift']['mean']:.0f} | "
                f"{e['lint_before_shift']['mean']:.4f} → {e['lint_after_shift']['mean']:.4f} | "
                + (f"{100 * lowered:.0f}% | " if np.isfinite(lowered) else "- | ")
                + f"{e['max_rho']:.6f} | {_fmt(e['masked_ms_per_example'], 2)} | "
                f"{_fmt(e['grouped_ms_per_example'], 2)} | {_rho(e['spearman_k_difficulty'])} |"
            )
        parts.append("")
    return "\n".join(parts).strip()


# ---------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_k(results: dict[str, Any], path: str) -> None:
    """Shifted-split accuracy against mean K per method (error bars: 95% CI over seeds)."""
    plt = _pyplot()
    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task_name in zip(axes[0], tasks, strict=True):
        for name, e in results["tasks"][task_name].items():
            ax.errorbar(
                e["mean_k_shift"]["mean"],
                e["acc_shift"]["mean"],
                xerr=e["mean_k_shift"]["ci"],
                yerr=e["acc_shift"]["ci"],
                fmt="o",
                capsize=3,
                label=method_label(name),
            )
        ax.set_xlabel("mean K (inner steps per input)")
        ax.set_ylabel("accuracy, shifted test split")
        ax.set_title(task_name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_k_vs_difficulty(results: dict[str, Any], path: str) -> None:
    """ATTD's mean K per difficulty level (both test splits, all seeds) with the Spearman ρ;
    one panel per task and ATTD method (first order, and second order where it ran)."""
    plt = _pyplot()
    panels = [
        (t, n) for t, table in results["tasks"].items() for n in ("attd", "attd+so") if n in table
    ]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.6),
                             squeeze=False)  # fmt: skip
    for ax, (task_name, name) in zip(axes[0], panels, strict=False):
        e = results["tasks"][task_name][name]
        k = np.asarray(e["examples"]["k"], float)
        d = np.asarray(e["examples"]["difficulty"], float)
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, k.shape)
        ax.scatter(d, k + jitter, s=4, alpha=0.25, color="gray")
        levels = np.unique(d)
        if levels.size > 12:  # bin continuous difficulty (text length) into deciles
            edges = np.unique(np.quantile(d, np.linspace(0, 1, 11)))
            bins = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, edges.size - 2)
            centres = [d[bins == i].mean() for i in range(edges.size - 1) if np.any(bins == i)]
            means = [k[bins == i].mean() for i in range(edges.size - 1) if np.any(bins == i)]
        else:
            centres, means = levels, [k[d == v].mean() for v in levels]
        ax.plot(centres, means, "o-", color="C3", label="mean K")
        ax.set_xlabel(DIFFICULTY[task_name])
        ax.set_ylabel(f"K of {method_label(name)}")
        ax.set_title(f"{task_name}: Spearman {_rho(e['spearman_k_difficulty'])}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------- report


def _shift_text(cfg) -> list[str]:
    d = cfg.data
    lines = []
    if "listops" in cfg.tasks:
        tr, sh = d.listops.train, d.listops.test_shift
        lines.append(
            f"- ListOps (LRA recipe, 10 classes): train {tr.num} expressions of depth "
            f"{tr.min_depth}-{tr.max_depth}, {tr.min_length}-{tr.max_length} tokens; "
            f"in-distribution test {d.listops.test_id.num} unseen expressions of the same "
            f"recipe; shifted test {sh.num} of depth {sh.min_depth}-{sh.max_depth}, "
            f"{sh.min_length}-{sh.max_length} tokens (deeper and longer than any training input)."
        )
    if "pathfinder" in cfg.tasks:
        tr, sh = d.pathfinder.train, d.pathfinder.test_shift
        lines.append(
            f"- Pathfinder ({tr.size[0]}x{tr.size[1]} pixels -> {tr.size[0] * tr.size[1]} "
            f"tokens, balanced classes): train {tr.num} images with main paths of "
            f"{tr.path_length[0]}-{tr.path_length[1]} steps and {tr.num_distractors[0]}-"
            f"{tr.num_distractors[1]} distractors; shifted test {sh.num} images with paths of "
            f"{sh.path_length[0]}-{sh.path_length[1]} steps and {sh.num_distractors[0]}-"
            f"{sh.num_distractors[1]} distractors."
        )
    if "text" in cfg.tasks:
        t = d.text
        lines.append(
            f"- Text (byte level, corpus `{t.corpus}`: pydoc topic text vs standard-library "
            f"source, split by file): train passages of {t.seq_len} bytes; in-distribution "
            f"test {t.num_test} passages of {t.seq_len} bytes from held-out (validation) files; "
            f"shifted test {t.num_test} passages of {t.test_length} bytes from other held-out "
            "(test) files."
        )
    return lines


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """Put the tables, plots and provenance into BENCHMARKS.md's ``config.section``."""
    root = report.BENCHMARKS.parent
    figures = root / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    acc_png, k_png = (f"{cfg.figure_prefix}_{n}.png" for n in ("accuracy_vs_k", "k_vs_difficulty"))
    plot_accuracy_vs_k(results, str(figures / acc_png))
    plot_k_vs_difficulty(results, str(figures / k_png))
    m, a, f, p = cfg.model, cfg.attd, cfg.finetune, cfg.pretrain
    pre = "; ".join(
        f"{t} " + ", ".join(f"{b['seconds']:.0f}" for b in results["base"][t].values())
        for t in results["base"]
    )
    names = tuple(cfg.methods) + tuple(cfg.ablation_methods)
    second = any(parse_method(n).second_order for n in names)
    joint = any(parse_method(n).joint for n in names)
    title = (
        "## ATTD on Mamba: joint training with the self-supervised loss (does TTT of the "
        "dynamics help once outer training keeps L_int informative?)"
        if joint
        else "## ATTD on Mamba: second- vs first-order meta-training (does TTT of the dynamics "
        "help when the outer loop differentiates through it?)"
        if second
        else "## ATTD (adaptive test-time dynamics) on Mamba, Long Range Arena tasks"
    )
    order = (
        "first order (inner gradients stopped) for plain names and second order through the "
        "inner loop (`+so`), everything else equal"
        if second
        else f"first-order={a.first_order}"
    )
    if joint:
        order += (
            f"; `+j` adds μ·E[L_int(x; θ, ψ₀)] with μ = {a.joint_weight} to the outer loss "
            "(joint training, as in Sun et al. 2020), so outer training keeps θ a model of its "
            "inputs"
        )
    ablation = (
        [
            f"- Ablation (seed(s) {list(cfg.ablation_seeds)} only): "
            + ", ".join(f"`{n}` = {method_label(n)}" for n in cfg.ablation_methods)
            + f"; `+sgd` is SGD at lr {a.sgd_lr} on ψ, `+r<N>` a ψ of rank N."
        ]
        if cfg.ablation_methods
        else []
    )
    body = "\n".join(
        [
            title,
            "",
            f"- Date: {report.today()}; machine: {report.machine()} (shared with other jobs).",
            f"- Command: `{cfg.command}` (other variants: see `configs/attd_lra.py`).",
            f"- Model: Mamba, {m.n_layers} layer(s), width {m.d_model} (D = {m.expand * m.d_model}"
            f" SSM channels), state N = {m.d_state}; ψ = (U, V) of rank {m.psi_rank} on A_log "
            f"(U₀ = 0, V₀ ~ {m.psi_scale}·N(0,1)).",
            *_shift_text(cfg),
            f"- Shared per task and seed: data, and a base Mamba pretrained {p.steps} Adam steps "
            f"(lr {p.lr}, batch {p.batch}) on task CE + {p.lm_weight} x next-token CE "
            f"(seconds: {pre}). Each method then trains its outer parameters (θ, ψ₀, "
            f"thresholds) from that base for {f.steps} steps (batch {f.batch}, the same batches "
            f"for every method; Adam lr θ {f.lr_theta}, ψ₀ {f.lr_psi}, thresholds "
            f"{f.lr_thresholds}), {order}, λ = {a.lam} ({a.cost} cost), "
            f"β = {a.beta}, τ = {a.temperature}, remat = {a.remat}. Thresholds start at "
            "quantiles of s on training inputs (ATTD: k/(K_max+1); gate: the median). "
            "`ATTD, λ=0` is an ablation: ATTD without the step cost, so only the task loss "
            "moves its thresholds.",
            f"- Inner loop: L_int = {a.objective}, {a.inner_opt}(lr {a.inner_lr}"
            + (f", eps_root {a.adam_eps_root}" if a.adam_eps_root else "")
            + f") on ψ, "
            f"K_max = {a.k_max}. SGD barely moves L_int (∂L_int/∂U is ~1e-4 at ψ₀: SGD at lr "
            "50 lowers it by ~0.3% in 4 steps, and lr 1000 diverges to NaN), hence Adam, whose "
            "step size does not depend on the gradient scale.",
            *ablation,
            "- Columns: accuracy on the in-distribution and shifted test splits; K and inner "
            "steps on the shifted split (inner steps = Σ K over its inputs, the compute of the "
            "grouped path); L_int at ψ₀ and after the input's K steps; 'L_int lowered' = share "
            "of adapted inputs (K > 0, both splits) whose L_int fell; max ρ(Ā) over all "
            "adapted inputs; wall time per example of the masked path (K_max steps for every "
            "input) and the grouped path (compute follows K), after compilation, on one batch "
            "of the shifted split. Rows without ± ran on one seed.",
            "",
            summary_table(results),
            "",
            f"![accuracy vs mean K](docs/figures/{acc_png})",
            "",
            f"![K vs difficulty](docs/figures/{k_png})",
            "",
            "### Reading",
            "",
            *reading(results),
        ]
    )
    report.publish(cfg.section, body, results)


def _drop_rho(e: dict[str, Any]) -> str:
    return _rho(e["spearman_drop_correct"]) if e["spearman_drop_correct"] else "-"


def reading(results: dict[str, Any]) -> list[str]:
    """Plain statements computed from the results (what helped, what the diagnostics say)."""
    lines = []
    for task_name, t in results["tasks"].items():
        if "fixed" not in t:
            continue
        base = t["fixed"]["acc_shift"]["mean"]
        parts = []
        for name, e in t.items():
            if name == "fixed":
                continue
            diff = e["acc_shift"]["mean"] - _fixed_on(t, e["seeds"])
            lowered = e["lint_lowered_share"]
            drop = e["lint_before_shift"]["mean"] - e["lint_after_shift"]["mean"]
            fell = (
                "diverged: L_int is NaN after outer training"
                if not np.isfinite(e["lint_after_shift"]["mean"])
                else f"L_int fell on {100 * lowered:.0f}% of adapted inputs, mean drop {drop:.4f}"
                if np.isfinite(lowered)
                else "no input adapted"
            )
            parts.append(
                f"{method_label(name)} {diff:+.3f} accuracy vs fixed at mean K "
                f"{e['mean_k_shift']['mean']:.2f} ({fell})"
            )
        lines.append(f"- {task_name} (shifted split, fixed Mamba {base:.3f}): " + "; ".join(parts))
        for name, e in t.items():
            if e["spearman_drop_correct"]:
                lines.append(
                    f"  - {method_label(name)}: Spearman of the per-input L_int drop with "
                    f"correctness {_drop_rho(e)} (both test splits; does lowering L_int go "
                    "with a right answer?)."
                )
        for name, e in t.items():
            if parse_method(name).base not in CONTROLLED:
                continue
            first = np.mean([th[0] for th in e["thresholds"]])
            lines.append(
                f"  - {method_label(name)}: K histogram over both test splits "
                f"{_hist(np.add(e['k_hist_id'], e['k_hist_shift']).tolist())} % for K = "
                f"0..{results['k_max']}; first threshold after training {first:.3f} (mean over "
                f"seeds) vs mean signal s = {e['lint_before_shift']['mean']:.3f} on the shifted "
                f"split; Spearman of K with {DIFFICULTY[task_name]}: "
                f"{_rho(e['spearman_k_difficulty'])}."
            )
    return lines + _conclusions(results) + _order_conclusions(results) + _joint_conclusions(results)


def _fixed_on(table: dict[str, Any], seeds: list[int]) -> float:
    """The fixed model's mean shifted accuracy over ``seeds`` (an ablation may run on fewer)."""
    fixed = table["fixed"]
    by_seed = dict(zip(fixed["seeds"], fixed["acc_shift_seeds"], strict=True))
    return float(np.mean([by_seed[s] for s in seeds]))


def paired_difference(table: dict[str, Any], name: str, other: str) -> stats.MeanCI:
    """Mean over shared seeds of (shifted accuracy of ``name`` − that of ``other``), t-interval."""
    a = dict(zip(table[name]["seeds"], table[name]["acc_shift_seeds"], strict=True))
    b = dict(zip(table[other]["seeds"], table[other]["acc_shift_seeds"], strict=True))
    return stats.mean_ci([a[s] - b[s] for s in a if s in b])


def _diff(ci: stats.MeanCI) -> str:
    if np.isfinite(ci.half_width):
        return f"{ci.mean:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]"
    return f"{ci.mean:+.3f} (one seed)"


def _paired_tasks(results: dict[str, Any], has_twin, header: str, lines: list[str]):
    """Yield (task, table, methods with a twin) for each task that has any, appending a blank
    line and ``header`` to ``lines`` before the first. ``has_twin(name, table) -> bool``."""
    for task_name, t in results["tasks"].items():
        pairs = [n for n in t if has_twin(n, t)]
        if pairs:
            if not lines:
                lines += ["", header]
            yield task_name, t, pairs


def _order_conclusions(results: dict[str, Any]) -> list[str]:
    """Second vs first order, per controller: paired accuracy differences over seeds, the L_int
    drop ↔ correctness correlation, and whether K follows difficulty."""
    lines = []
    header = "Second vs first order (paired over seeds, 95% t-interval):"
    has_twin = lambda n, t: n in METHODS and f"{n}+so" in t
    for task_name, t, pairs in _paired_tasks(results, has_twin, header, lines):
        for n in pairs:
            so = f"{n}+so"
            vs_fo = paired_difference(t, so, n)
            vs_fixed = paired_difference(t, so, "fixed") if "fixed" in t else None
            verdict = (
                "second order helps"
                if vs_fo.low > 0
                else "second order hurts"
                if vs_fo.high < 0
                else "no difference the seeds can resolve"
            )
            lines.append(
                f"- {task_name}, {METHOD_LABELS[n]}: shifted accuracy, 2nd − 1st order "
                f"{_diff(vs_fo)} ({verdict})"
                + (f"; 2nd order − fixed {_diff(vs_fixed)}" if vs_fixed else "")
                + f"; mean K {t[n]['mean_k_shift']['mean']:.2f} → "
                f"{t[so]['mean_k_shift']['mean']:.2f}"
                + (
                    f"; L_int drop ~ correctness {_drop_rho(t[n])} → {_drop_rho(t[so])}"
                    if t[n]["spearman_drop_correct"] or t[so]["spearman_drop_correct"]
                    else ""
                )
                + (
                    f"; K ~ {DIFFICULTY[task_name]} {_rho(t[n]['spearman_k_difficulty'])} → "
                    f"{_rho(t[so]['spearman_k_difficulty'])}"
                    if n in CONTROLLED
                    else ""
                )
                + "."
            )
        lines += _order_verdict(task_name, t)
    return lines


def _excludes_zero(ci: dict[str, float] | None) -> bool:
    return bool(ci) and np.isfinite(ci["low"]) and (ci["low"] > 0 or ci["high"] < 0)


def _order_verdict(task_name: str, t: dict[str, Any]) -> list[str]:
    """The two questions of the comparison, answered from the numbers of one task."""
    lines = []
    s_at = {n: t[n]["lint_before_shift"]["mean"] for n in ("ttt", "ttt+so") if n in t}
    drop_of = {n: s_at[n] - t[n]["lint_after_shift"]["mean"] for n in s_at}
    if {"fixed", "ttt", "ttt+so"} <= set(t):
        gain = paired_difference(t, "ttt+so", "fixed")
        helps = gain.low > 0 if np.isfinite(gain.half_width) else False
        drop = t["ttt+so"]["spearman_drop_correct"]
        lines.append(
            f"- {task_name}: does second-order meta-training make TTT of the dynamics help? "
            + ("Yes" if helps else "No")
            + f": full TTT trained second order − fixed Mamba = {_diff(gain)} shifted accuracy; "
            f"the per-input L_int drop ↔ correctness is {_drop_rho(t['ttt+so'])} "
            + ("(it carries task information)" if _excludes_zero(drop) else "(no association)")
            + f". How the order changed θ: s = L_int at ψ₀ on the shifted split "
            f"{s_at['ttt']:.3f} (1st) vs {s_at['ttt+so']:.3f} (2nd), and TTT lowers it by "
            f"{drop_of['ttt']:.3f} vs {drop_of['ttt+so']:.3f}."
        )
    if "attd+so" in t:
        ci = t["attd+so"]["spearman_k_difficulty"]
        more = _excludes_zero(ci) and ci["low"] > 0
        lines.append(
            f"- {task_name}: does ATTD trained second order spend more on harder inputs? "
            + ("Yes" if more else "No")
            + f": Spearman of K with {DIFFICULTY[task_name]} {_rho(ci)}, mean K "
            f"{t['attd+so']['mean_k_shift']['mean']:.2f} on the shifted split."
        )
    return lines


def _joint_conclusions(results: dict[str, Any]) -> list[str]:
    """``+j`` against the same method without it, and TTT against the fixed model when both are
    trained jointly: paired shifted-accuracy differences over seeds, and L_int at ψ₀."""
    lines = []
    header = "Joint training of L_int (`+j`, paired over seeds, 95% t-interval):"
    has_twin = lambda n, t: not parse_method(n).joint and f"{n}+j" in t
    for task_name, t, pairs in _paired_tasks(results, has_twin, header, lines):
        for n in pairs:
            j = f"{n}+j"
            lines.append(
                f"- {task_name}, {method_label(n)}: shifted accuracy, with − without `+j` "
                f"{_diff(paired_difference(t, j, n))}; L_int at ψ₀ on the shifted split "
                f"{t[n]['lint_before_shift']['mean']:.3f} → {t[j]['lint_before_shift']['mean']:.3f}"
            )
        if "fixed+j" in t:
            for n in t:
                spec = parse_method(n)
                if spec.joint and spec.base != "fixed":
                    lines.append(
                        f"- {task_name}, {method_label(n)} − {method_label('fixed+j')} (does TTT "
                        f"help once both keep L_int?): {_diff(paired_difference(t, n, 'fixed+j'))}"
                        f"; L_int drop ~ correctness {_drop_rho(t[n])}"
                    )
    return lines


def _conclusions(results: dict[str, Any]) -> list[str]:
    """What the diagnostics add up to, stated only where the numbers support it."""
    tasks = {t: v for t, v in results["tasks"].items() if {"fixed", "ttt"} <= set(v)}
    if not tasks:
        return []
    gains = {
        t: v["ttt"]["acc_shift"]["mean"] - v["fixed"]["acc_shift"]["mean"] for t, v in tasks.items()
    }
    lines = ["", "What this says:"]
    if all(g <= 0 for g in gains.values()):
        rel = {
            t: 1 - v["ttt"]["lint_after_shift"]["mean"] / v["ttt"]["lint_before_shift"]["mean"]
            for t, v in tasks.items()
        }
        drops = ", ".join(f"{t} {100 * r:.1f}%" for t, r in rel.items())
        lines.append(
            "- Test-time adaptation of the dynamics did not help at these sizes: full TTT is at "
            "or below the fixed model on every shifted split. The inner loop does lower L_int "
            f"(relative drop after {results['k_max']} steps: {drops}), but the per-input drop "
            "is uncorrelated with a right answer (Spearman above), so lowering the next-token "
            "loss through ψ does not carry task information here."
        )
    for name in ("attd", "attd_nocost"):
        off = [
            t for t, v in results["tasks"].items()
            if name in v and v[name]["mean_k_shift"]["mean"] < 0.25 * results["k_max"]
        ]  # fmt: skip
        if off:
            lines.append(
                f"- {METHOD_LABELS[name]} learned to spend little (mean K < K_max/4 on the shifted "
                f"split of {', '.join(off)}): its thresholds ended above most signals"
                + (
                    ", with no step cost at all, so it is the task loss, not λ, that turns "
                    "adaptation off."
                    if name == "attd_nocost"
                    else "."
                )
            )
    lines.append(
        "- Does K follow difficulty? Only where the Spearman interval above excludes 0; where "
        "it does not, the ponder signal (next-token loss) measures how predictable a sequence "
        "is, which need not be what makes an input of these tasks hard."
    )
    lines.append(
        "- max ρ(Ā) prints as 1.000000 where float32 rounds exp(Δ·A) of the slowest channels "
        "(Δ near dt_min) to 1; the log-space update keeps every |Ā| ≤ 1 and the scan finite."
    )
    ratios = [
        v[n]["grouped_ms_per_example"]["mean"] / v[n]["masked_ms_per_example"]["mean"]
        for v in results["tasks"].values()
        for n in ("attd", "gate")
        if n in v and v[n]["masked_ms_per_example"]["mean"] > 0
    ]
    if ratios:
        lines.append(
            f"- Compute follows K only on the grouped path: for ATTD and the gate it takes "
            f"{min(ratios):.2f}-{max(ratios):.2f}x the masked path's time per example. Wall "
            "times come from a machine shared with other jobs, hence the wide intervals."
        )
    return lines


def demo_rows(workdir: str) -> list[tuple[str, str, str, float, float, float]]:
    """``make demo``: fixed Mamba vs ATTD on a tiny shifted ListOps run.

    Returns one row ``(system, method, metric, before, after, seconds)``: ``before`` is the
    fixed model's accuracy on the deeper test split (K = 0), ``after`` ATTD's (adaptive K).
    """
    from configs import attd_lra as attd_config  # configs are read by experiments only

    cfg = attd_config.get_config("demo")
    start = time.perf_counter()
    results = run(cfg, os.path.join(workdir, "attd_lra"))
    seconds = time.perf_counter() - start
    table = results["tasks"]["listops"]
    return [
        (
            "ATTD on Mamba (ListOps)",
            "ATTD",
            "accuracy on deeper expressions, K=0 -> adaptive K",
            table["fixed"]["acc_shift"]["mean"],
            table["attd"]["acc_shift"]["mean"],
            seconds,
        )
    ]
