"""What every seed and method of a run shares: the model, its compiled functions, the costs,
and the per-seed trained parameters (trained once, resumable, cached in the workdir).

With ``train.mesh_devices`` the pretraining's batches are sharded over a data-parallel mesh of
that many devices (all processes' in a multi-process run, ``config.distributed``), the
parameters replicated; the trained parameters are then copied to each process's own device, so
serving runs unchanged (the same computation on every process).
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from experiments import harness
from metattt import objectives, runlog, sharding, train
from metattt.data import text_corpora as tc
from metattt.energy import SimulatedDevice, energy_tent, proxy_costs
from metattt.energy.schedule import prediction_entropy, router_margin
from metattt.models import moe, quantize

HEADS = ("lm", "class")
#: ``model.backend`` asking for the dispatch backend the measured cost model picks at run start
#: (:mod:`.backend`).
COST_MODEL = "cost_model"


def model_config(
    cfg, top_k: int | None = None, *, vocab_size: int = tc.VOCAB_SIZE, num_classes: int = 0
) -> moe.MoEConfig:
    """The model section of the config as a :class:`~metattt.models.moe.MoEConfig` (a byte LM
    by default; ``num_classes`` > 0 adds the classification head).

    ``model.backend = "cost_model"`` before the run resolves it (:func:`.backend.resolve`)
    gives the MoEConfig default ``"auto"``: the config checks and the report read only shapes
    and sizes, which every backend shares; :func:`build_runtime` refuses such a config.
    """
    m = cfg.model
    return moe.MoEConfig(
        vocab_size=vocab_size,
        num_classes=num_classes,
        d_model=m.d_model,
        num_heads=m.num_heads,
        num_layers=m.num_layers,
        num_experts=m.num_experts,
        d_ff=m.d_ff,
        top_k=m.top_k if top_k is None else top_k,
        max_len=cfg.data.length,
        capacity_factor=None,
        expert_widths=tuple(int(w) for w in m.expert_widths),
        backend="auto" if m.backend == COST_MODEL else m.backend,
    )


class Runtime(NamedTuple):
    """What every seed and method shares: the compiled functions and the cost profile.

    Attributes:
        mcfg: the model config (the trained top-k).
        init: ``init(seed) -> params``.
        train_step: the pretraining :class:`metattt.train.Step` (Adam on cross-entropy plus
            the load-balancing and z losses) over ``(inputs, targets)`` batches.
        infer: ``{k: jitted (params, inputs, targets, mask) -> (score, counts)}``, the score
            being the batch's mean nats (LM) or error rate (classifier).
        adapt: :func:`compile_adapt` of the router TTT (no key).
        joules: (E,) dynamic joules per token of each expert (the proxy profile).
        device: the simulated device constants.
        signals: jitted ``(params, inputs, targets, mask) -> (score, counts, prediction
            entropy, router margin)`` at the trained top-k (the schedules' signals from the
            serving forward pass).
        probe: jitted ``(params, inputs, mask) -> router probabilities (layers, B, L, E)`` (the
            routing explanations).
        mesh: the data-parallel mesh ``train_step`` shards its batches over
            (``train.mesh_devices``), or None.
    """

    mcfg: moe.MoEConfig
    init: Any
    train_step: train.Step
    infer: dict[int, Any]
    adapt: Any
    joules: np.ndarray
    device: SimulatedDevice
    signals: Any
    probe: Any
    mesh: jax.sharding.Mesh | None


def score(out, targets, head: str) -> jax.Array:
    """A batch's score: mean nats of the next byte (LM) or the error rate (classifier)."""
    if head == "lm":
        return objectives.cross_entropy(out.logits, targets)
    return jnp.mean(jnp.argmax(out.class_logits, axis=-1) != targets)


@functools.lru_cache(maxsize=32)
def served_apply(mcfg: moe.MoEConfig):
    """``apply(params, inputs, **kwargs)`` of ``mcfg``'s model, also taking parameters with int8
    experts (:func:`metattt.models.quantize.int8_apply`); built once per config."""
    return quantize.int8_apply(moe.init_moe(mcfg).apply)


def compile_infer(mcfg: moe.MoEConfig, head: str):
    """Jitted ``(params, inputs, targets, mask) -> (score, counts)`` of ``mcfg``'s model; it
    also takes parameters with int8 experts (:func:`metattt.models.quantize.int8_apply`)."""
    apply = served_apply(mcfg)

    @jax.jit
    def infer(p, inputs, targets, mask):
        out = apply(p, inputs, expert_mask=mask)
        return score(out, targets, head), out.aux["expert_counts"]

    return infer


def compile_signals(mcfg: moe.MoEConfig, head: str):
    """Jitted ``(params, inputs, targets, mask) -> (score, counts, entropy, margin)``: the
    inference of :func:`compile_infer` plus the batch's label-free difficulty signals from the
    same forward pass (:func:`metattt.energy.schedule.prediction_entropy` of the head's
    predictions, :func:`~metattt.energy.schedule.router_margin`); it also takes parameters with
    int8 experts."""
    apply = served_apply(mcfg)

    @jax.jit
    def infer(p, inputs, targets, mask):
        out = apply(p, inputs, expert_mask=mask)
        logits = out.logits if head == "lm" else out.class_logits
        counts, probs = out.aux["expert_counts"], out.aux["router_probs"]
        return score(out, targets, head), counts, prediction_entropy(logits), router_margin(probs)

    return infer


def compile_probe(mcfg: moe.MoEConfig):
    """Jitted ``(params, inputs, mask) -> (layers, B, L, E)`` router probabilities (parameters
    with int8 experts too)."""
    apply = served_apply(mcfg)
    return jax.jit(lambda p, inputs, mask: apply(p, inputs, expert_mask=mask).aux["router_probs"])


def compile_adapt(ttt):
    """Jitted ``(params, tokens, λ, mask, key=None) -> (params, per-step RoutingStats)`` of an
    :func:`metattt.energy.energy_tent`; serving runs no diagnostic forward passes before and
    after the adaptation (``key`` draws the corruptions of the keyed objectives)."""

    @jax.jit
    def adapt(p, tokens, lam, mask, key=None):
        res = ttt.adapt(p, tokens, lam, mask, diagnostics=False, key=key)
        return res.params, res.inner.aux

    return adapt


def build_runtime(cfg, mcfg: moe.MoEConfig, head: str = "lm") -> Runtime:
    """Compile-once functions for every k the methods use (parameters do not depend on K).

    ``head="lm"``: next-byte cross-entropy for training, mean nats per batch as the score, the
    next-byte loss for TTT. ``head="class"``: cross-entropy of the class head for training, the
    error rate per batch as the score, and label-free TENT (prediction entropy) for TTT.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if cfg.model.backend == COST_MODEL:
        raise ValueError(f"model.backend={COST_MODEL!r} is chosen at run start: build the runtime "
                         "from experiments.energy_moe.backend.resolve's config")  # fmt: skip
    # Every compiled function also takes parameters with int8 experts (compiled on first use).
    apply = served_apply(mcfg)

    def train_loss(p, batch):
        inputs, targets = batch
        out = apply(p, inputs)
        logits = out.logits if head == "lm" else out.class_logits
        ce = objectives.cross_entropy(logits, targets)
        aux = out.aux
        lb, z = aux["load_balance_loss"], aux["router_z_loss"]
        return ce + cfg.train.load_balance * lb + cfg.train.z_loss * z

    train_step = train.supervised(train_loss, optax.adam(cfg.train.lr), jit=False)
    mesh = sharding.data_mesh(cfg.train.mesh_devices)
    train_step = sharding.shard_step(train_step, mesh)

    ks = {mcfg.top_k, *(int(k) for k in cfg.baselines.top_k)}
    if cfg.budget.fractions:
        ks |= set(range(1, mcfg.top_k + 1))  # degradation may lower K
    if "memory" in cfg and cfg.memory.enabled:  # so may memory pressure
        ks |= set(range(cfg.memory.min_top_k, mcfg.top_k + 1))
    device = SimulatedDevice()
    costs = proxy_costs(mcfg.num_experts, *moe.expert_token_costs(mcfg), device=device)
    ttt = energy_tent(
        apply,
        costs,
        top_k=mcfg.top_k,
        params=cfg.ttt.params,
        task="next_token" if head == "lm" else "entropy",
        head=head,
        opt=optax.adam(cfg.ttt.lr),
        max_steps=cfg.ttt.steps,
    )

    return Runtime(
        mcfg,
        lambda seed: moe.init_moe(mcfg, seed=seed).params,
        train_step,
        {k: compile_infer(mcfg._replace(top_k=k), head) for k in sorted(ks)},
        compile_adapt(ttt),
        costs.values("joules_per_token"),
        device,
        compile_signals(mcfg, head),
        compile_probe(mcfg),
        mesh,
    )


def pretrain(cfg, rt: Runtime, seed: int, batches, workdir: str) -> tuple[Any, float, float]:
    """Train ``rt.train_step`` with :func:`metattt.train.fit` (resumable in ``workdir``).

    ``batches(first)`` makes, on the host, the stacked ``(inputs, targets)`` of steps
    ``first .. first + train.steps_per_call - 1`` (split over ``rt.mesh`` when there is one).
    Returns ``(params, the last logged mean training loss, seconds)``; trained on a mesh, the
    parameters are replicated over it (:func:`local` copies them to this process).
    """
    t = cfg.train

    def placed(first: int):
        stacked = batches(first)
        return stacked if rt.mesh is None else sharding.shard_stacked(stacked, rt.mesh)

    memory = runlog.MemoryWriter()
    start = time.perf_counter()
    with runlog.create_writer(workdir) as files:
        state = train.fit(
            rt.train_step,
            rt.train_step.init(rt.init(seed)),
            placed,
            stacked=True,
            num_steps=t.num_steps,
            steps_per_call=t.steps_per_call,
            checkpoint_every=t.checkpoint_every,
            log_every=t.steps_per_call,
            workdir=workdir,
            writer=runlog.MultiWriter([files, memory]),
        )
    loss = memory.last("loss") if memory.history else math.nan  # nan: resumed at the end
    return state.params, loss, time.perf_counter() - start


def seed_dir(workdir: str, seed: int) -> str:
    """Seed ``seed``'s parameter cell: ``params/`` (the trained parameters), ``info.json``
    (loss, seconds, in-domain score) and ``run/`` (training checkpoints and logs)."""
    return os.path.join(workdir, "params", f"seed_{seed}")


def info_path(workdir: str, seed: int) -> str:
    """The JSON record of seed ``seed``'s training, written once its parameters are saved."""
    return os.path.join(seed_dir(workdir, seed), "info.json")


def trained_params(rt: Runtime, seed: int, workdir: str, fit) -> tuple[Any, dict[str, Any]]:
    """``fit(run_dir) -> (params, info)`` once per seed (:func:`experiments.harness.params_cell`:
    a killed training resumes from its checkpoints in ``run_dir``); a rerun restores them.

    Trained on ``rt.mesh``, the parameters are saved and restored replicated over it (all
    processes together), then returned as this process's own copy (:func:`local`).
    """
    template = rt.init(seed)
    if rt.mesh is not None:
        template = jax.device_put(template, jax.sharding.NamedSharding(rt.mesh, P()))
    params, info = harness.params_cell(seed_dir(workdir, seed), template, fit)
    return local(rt, params), info


def local(rt: Runtime, params: Any) -> Any:
    """Parameters trained on ``rt.mesh`` as this process's own arrays
    (:func:`metattt.sharding.local_copy`); unchanged without a mesh."""
    return params if rt.mesh is None else sharding.local_copy(params)


def mean_score(rt: Runtime, params: Any, inputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean over batches of the inference score, (N, B, ...) batches of the stream's shape (so
    nothing compiles again), all experts, the trained top-k."""
    mask = np.ones((rt.mcfg.num_experts,), bool)
    infer = rt.infer[rt.mcfg.top_k]
    scores = [float(infer(params, x, y, mask)[0]) for x, y in zip(inputs, targets, strict=True)]
    return float(np.mean(scores))


def warm_up(
    rt: Runtime,
    params: Any,
    stream: Any,
    *,
    batch: int,
    windows: int,
    int8: bool = False,
    signals: bool = False,
) -> None:
    """Compile every inference and the adaptation step for the stream's shapes (and, with
    ``int8``, the trained top-k's inference and the adaptation on int8 experts; with
    ``signals``, the inference that also returns the schedules' signals), so the
    wall-clock times of serving (and the TTT overhead) exclude compilation."""
    x, y = jnp.asarray(stream.inputs[:batch]), jnp.asarray(stream.targets[:batch])
    mask = jnp.ones((rt.mcfg.num_experts,), bool)
    for infer in rt.infer.values():
        jax.block_until_ready(infer(params, x, y, mask))
    jax.block_until_ready(rt.adapt(params, x[:windows], jnp.float32(0.0), mask))
    if signals:
        jax.block_until_ready(rt.signals(params, x, y, mask))
    if int8:
        qparams = quantize.quantize_experts(params)
        jax.block_until_ready(rt.infer[rt.mcfg.top_k](qparams, x, y, mask))
        jax.block_until_ready(rt.adapt(qparams, x[:windows], jnp.float32(0.0), mask))
