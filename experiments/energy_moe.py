"""Energy-aware TTT of a MoE character-level LM on a real domain shift (English docs -> code).

Per seed, a top-k MoE transformer whose experts have different widths (so different energies
per token) is trained on the English help topics of ``pydoc_data`` (next-byte prediction plus
the Switch load-balancing and router z-losses) and then serves a stream of windows of the
standard library's Python source. Every method serves the same stream *prequentially*: each
batch is scored (bits per character) with the current parameters before the method may adapt
on it, so no method sees a label before predicting it. Methods (:func:`methods`):

* ``no_ttt``: the trained model, top-k routing, all experts.
* ``ttt``: TTT of the router (self-supervised next-byte loss, Adam) with λ_energy = 0.
* ``energy_ttt/<λ>``: the same plus λ_energy · E, E the expected routing energy under the
  per-expert cost profile (:func:`metattt.energy.energy_tent`'s loss).
* ``budget/<f>``: the power-budget policy (:func:`metattt.energy.power_budget`): λ follows the
  simulated monitor's power readings; a budget still missed at λ_max escalates to pruning and
  then a smaller top-k (graceful degradation). The budget is f of the unadapted model's
  dynamic power above the fixed (idle + dense layers) power.
* ``prune/<n>``: static pruning of the n costliest experts; ``top_k/<k>``: a smaller top-k.
  Both keep the trained parameters.

Energy. The monitor is the simulated one unless the config asks for NVML (the results record
which one ran). Each batch is one measured window in which the device does the batch's forward
pass -- FLOPs and bytes of the dense layers plus :func:`metattt.models.moe.expert_work` of the
experts actually used -- and, when the method adapts, ``1 + BACKWARD_FACTOR`` times the
forward work of each adaptation step (priced with that step's own routing), then idles until
the next batch arrives at the serving rate r tokens/s. Reported per token: the dynamic energy
(above idle, what routing changes), the total energy, the simulated compute delay, their
product (EDP), and the wall-clock TTT overhead (adaptation time / inference time).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import harness, report
from metattt import objectives, runlog, stats, train
from metattt.ckpt import Checkpointer
from metattt.data import text_corpora as tc
from metattt.energy import (
    SimulatedDevice,
    create_monitor,
    energy_tent,
    lambda_controller,
    power_budget,
    proxy_costs,
)
from metattt.models import moe
from metattt.params import select

logger = logging.getLogger(__name__)
TEST_SEED = 10_000  # stream windows come from seeds no training batch uses
BACKWARD_FACTOR = 2.0  # a backward pass costs about two forwards (input and weight gradients)
MONITOR_KINDS = ("simulated", "auto", "nvml")
ENERGY_AWARE = ("energy_ttt", "budget")
BASELINES = ("prune", "top_k")


class Metric(NamedTuple):
    """The stream's quality metric (lower is better).

    Attributes:
        key: its name in cells and results (``"bpc"``; ``"<key>_late"``, ``"<key>_change"``).
        label: how tables and plots name it.
        scale: factor from the mean per-batch score the inference returns to the metric.
        relative: changes vs ``no_ttt`` are relative (r / b - 1) or absolute (r - b).
        loss_label: what the adaptation's task loss is, for the convergence plot.
    """

    key: str
    label: str
    scale: float
    relative: bool
    loss_label: str


BPC = Metric(
    "bpc", "bits/char", 1 / math.log(2), True, "next-byte loss of the adapted windows (bits)"
)


class Method(NamedTuple):
    """One way of serving the shifted stream.

    Attributes:
        kind: ``"no_ttt"``, ``"ttt"``, ``"energy_ttt"``, ``"budget"``, ``"prune"`` or
            ``"top_k"``.
        lam: λ_energy (``energy_ttt``).
        fraction: the budget's share of the dynamic power (``budget``).
        prune: experts pruned (``prune``).
        top_k: K of the routing (0: the model's).
    """

    kind: str
    lam: float = 0.0
    fraction: float = 0.0
    prune: int = 0
    top_k: int = 0

    @property
    def adapts(self) -> bool:
        return self.kind in ("ttt", "energy_ttt", "budget")


def methods(cfg) -> dict[str, Method]:
    """``{name: Method}`` in the order they run (``no_ttt`` first: budgets are set from it)."""
    out = {"no_ttt": Method("no_ttt"), "ttt": Method("ttt")}
    for lam in cfg.ttt.lambdas:
        out[f"energy_ttt/{lam:g}"] = Method("energy_ttt", lam=float(lam))
    for frac in cfg.budget.fractions:
        out[f"budget/{frac:g}"] = Method("budget", fraction=float(frac))
    for n in cfg.baselines.prune:
        out[f"prune/{n}"] = Method("prune", prune=int(n))
    for k in cfg.baselines.top_k:
        out[f"top_k/{k}"] = Method("top_k", top_k=int(k))
    return out


def model_config(
    cfg, top_k: int | None = None, *, vocab_size: int = tc.VOCAB_SIZE, num_classes: int = 0
) -> moe.MoEConfig:
    """The model section of the config as a :class:`~metattt.models.moe.MoEConfig` (a byte LM
    by default; ``num_classes`` > 0 adds the classification head)."""
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
        backend=m.backend,
    )


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    if cfg.data.length < 2 or cfg.data.batch < 1 or cfg.data.stream_batches < 1:
        raise ValueError("data.length must be >= 2, data.batch and data.stream_batches >= 1")
    if cfg.data.heldout_windows < 1 or cfg.data.heldout_windows % cfg.data.batch:
        raise ValueError(
            f"data.heldout_windows must be a positive multiple of data.batch={cfg.data.batch}"
        )
    validate_methods(cfg, model_config(cfg))


def validate_methods(cfg, mcfg: moe.MoEConfig) -> None:
    """Checks shared by every stream: seeds, monitor, training, TTT, budgets and baselines."""
    if not cfg.seeds:
        raise ValueError("config.seeds is empty")
    if cfg.monitor.kind not in MONITOR_KINDS:
        raise ValueError(f"monitor.kind must be one of {MONITOR_KINDS}, got {cfg.monitor.kind!r}")
    if not 0 < cfg.monitor.utilization <= 1:
        raise ValueError(f"monitor.utilization must be in (0, 1], got {cfg.monitor.utilization}")
    params = moe.init_moe(mcfg).params  # validates the model config
    select(params, cfg.ttt.params)  # an unknown preset or an empty selection raises
    t = cfg.train
    train.check_counts(
        t.num_steps, t.steps_per_call, t.checkpoint_every, t.steps_per_call, prefix="train."
    )
    if cfg.ttt.steps < 1 or cfg.ttt.every < 1 or not 1 <= cfg.ttt.windows <= cfg.data.batch:
        raise ValueError("need ttt.steps >= 1, ttt.every >= 1 and 1 <= ttt.windows <= data.batch")
    if any(not lam > 0 for lam in cfg.ttt.lambdas):
        raise ValueError(f"ttt.lambdas must be > 0 (λ = 0 is the 'ttt' method), got "
                         f"{tuple(cfg.ttt.lambdas)}")  # fmt: skip
    if any(not 0 < f < 1 for f in cfg.budget.fractions):
        raise ValueError(f"budget.fractions must be in (0, 1), got {tuple(cfg.budget.fractions)}")
    lambda_controller(
        1.0,
        lam_init=cfg.budget.lam_init,
        lam_min=cfg.budget.lam_min,
        lam_max=cfg.budget.lam_max,
        gain=cfg.budget.gain,
    )
    for n in cfg.baselines.prune:
        if not 1 <= n <= mcfg.num_experts - mcfg.top_k:
            raise ValueError(
                f"baselines.prune entries must be in [1, num_experts - top_k = "
                f"{mcfg.num_experts - mcfg.top_k}], got {n}"
            )
    for k in cfg.baselines.top_k:
        if not 1 <= k < mcfg.top_k:
            raise ValueError(f"baselines.top_k entries must be in [1, top_k), got {k}")


# --- data -------------------------------------------------------------------------------------


class Streams(NamedTuple):
    """Byte streams: ``train`` and ``heldout`` English docs (disjoint topics), ``shifted`` code."""

    train: np.ndarray
    heldout: np.ndarray
    shifted: np.ndarray


def load_streams(seed: int) -> Streams:
    """Docs split by topic (90/10, seeded) and every top-level stdlib module as the shift."""
    _, names, labels = tc.list_documents("doc_vs_code")
    docs = [n for n, label in zip(names, labels, strict=True) if label == 0]
    code = [n for n, label in zip(names, labels, strict=True) if label == 1]
    train_idx, held_idx = tc.split_documents([0] * len(docs), (0.9, 0.1), seed=seed)
    return Streams(
        tc.concat_documents([docs[i] for i in train_idx]),
        tc.concat_documents([docs[i] for i in held_idx]),
        tc.concat_documents(code),
    )


def shifted_stream(cfg, streams: Streams, seed: int) -> tc.LMWindows:
    """(S·B, L) windows of code at seeded random offsets (S stream batches of B)."""
    n = cfg.data.stream_batches * cfg.data.batch
    return tc.lm_windows(streams.shifted, cfg.data.length, n, seed=TEST_SEED + seed)


# --- work and energy accounting ---------------------------------------------------------------


class Work(NamedTuple):
    """FLOPs and bytes of some computation on the device."""

    flops: float
    nbytes: float

    def __add__(self, other):  # type: ignore[override]
        return Work(self.flops + other.flops, self.nbytes + other.nbytes)

    def scaled(self, factor: float) -> Work:
        return Work(self.flops * factor, self.nbytes * factor)


def dense_work(mcfg: moe.MoEConfig, batch: int, length: int, itemsize: int = 4) -> Work:
    """Work of everything but the experts in one forward pass of (B, L) tokens.

    Per token and layer: QKV and output projections 2·D·4D FLOPs, attention scores and the
    weighted values 2·2·L·D (all L keys, the causal half is not skipped), the router 2·D·E;
    then the LM head 2·D·V. Bytes: per token and layer the residual, QKV, attention output
    and router logits written and read ((2·D + 3·D + D + E)·2), the embedding and logits,
    and every dense weight read once per pass.
    """
    d, e, v, layers = mcfg.d_model, mcfg.num_experts, mcfg.vocab_size, mcfg.num_layers
    tokens = batch * length
    flops = tokens * (layers * (8 * d * d + 4 * length * d + 2 * d * e) + 2 * d * v)
    act = tokens * (layers * 2 * (6 * d + e) + 2 * d + v) * itemsize
    weights = (layers * (4 * d * d + d * e + 4 * d) + 2 * d * v + v + length * d) * itemsize
    return Work(float(flops), float(act + weights))


def forward_work(mcfg: moe.MoEConfig, expert_counts: Any, batch: int, length: int) -> Work:
    """Dense work plus the work of the experts actually used (``expert_counts`` (layers, E))."""
    work = moe.expert_work(jnp.asarray(expert_counts), mcfg)
    experts = Work(float(jnp.sum(work.flops)), float(jnp.sum(work.bytes)))
    return dense_work(mcfg, batch, length) + experts


def edp(energy_j: float, delay_s: float, tokens: int) -> float:
    """Energy-delay product per token: (energy / tokens) · (delay / tokens), in J·s."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    return (energy_j / tokens) * (delay_s / tokens)


def pareto_front(points: Any) -> np.ndarray:
    """Indices of the points no other point dominates, both coordinates minimised.

    q dominates p when q <= p in both coordinates and q < p in at least one. Sorting by the
    first coordinate (ties: the second) and keeping each point that lowers the running minimum
    of the second gives the front in O(N log N); duplicates of a front point are all kept.
    Shapes: (N, 2) -> sorted int indices.
    """
    pts = np.asarray(points, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {pts.shape}")
    order = np.lexsort((pts[:, 1], pts[:, 0]))
    front, best, last = [], math.inf, None
    for i in order:
        x, y = pts[i]
        if y < best or (last is not None and (x, y) == last):
            front.append(int(i))
            best, last = y, (x, y)
    return np.array(sorted(front), np.int64)


# --- compiled pieces --------------------------------------------------------------------------


class Runtime(NamedTuple):
    """What every seed and method shares: the compiled functions and the cost profile.

    Attributes:
        mcfg: the model config (the trained top-k).
        init: ``init(seed) -> params``.
        train_step: the pretraining :class:`metattt.train.Step` (Adam on cross-entropy plus
            the load-balancing and z losses) over ``(inputs, targets)`` batches.
        infer: ``{k: jitted (params, inputs, targets, mask) -> (score, counts)}``, the score
            being the batch's mean nats (LM) or error rate (classifier).
        adapt: jitted ``(params, tokens, λ, mask) -> (params, per-step RoutingStats)``.
        joules: (E,) dynamic joules per token of each expert (the proxy profile).
        device: the simulated device constants.
    """

    mcfg: moe.MoEConfig
    init: Any
    train_step: train.Step
    infer: dict[int, Any]
    adapt: Any
    joules: np.ndarray
    device: SimulatedDevice


HEADS = ("lm", "class")


def build_runtime(cfg, mcfg: moe.MoEConfig | None = None, head: str = "lm") -> Runtime:
    """Compile-once functions for every k the methods use (parameters do not depend on K).

    ``head="lm"``: next-byte cross-entropy for training, mean nats per batch as the score, the
    next-byte loss for TTT. ``head="class"``: cross-entropy of the class head for training, the
    error rate per batch as the score, and label-free TENT (prediction entropy) for TTT.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    mcfg = model_config(cfg) if mcfg is None else mcfg
    apply = moe.init_moe(mcfg).apply

    def score(out, targets):
        if head == "lm":
            return objectives.cross_entropy(out.logits, targets)
        return jnp.mean(jnp.argmax(out.class_logits, axis=-1) != targets)

    def train_loss(p, batch):
        inputs, targets = batch
        out = apply(p, inputs)
        logits = out.logits if head == "lm" else out.class_logits
        ce = objectives.cross_entropy(logits, targets)
        aux = out.aux
        lb, z = aux["load_balance_loss"], aux["router_z_loss"]
        return ce + cfg.train.load_balance * lb + cfg.train.z_loss * z

    train_step = train.supervised(train_loss, optax.adam(cfg.train.lr), jit=False)

    def make_infer(k):
        apply_k = moe.init_moe(mcfg._replace(top_k=k)).apply

        @jax.jit
        def infer(p, inputs, targets, mask):
            out = apply_k(p, inputs, expert_mask=mask)
            return score(out, targets), out.aux["expert_counts"]

        return infer

    ks = {mcfg.top_k, *(int(k) for k in cfg.baselines.top_k)}
    if cfg.budget.fractions:
        ks |= set(range(1, mcfg.top_k + 1))  # degradation may lower K
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

    @jax.jit
    def adapt(p, tokens, lam, mask):
        # Serving runs no diagnostic forward passes before and after the adaptation.
        res = ttt.adapt(p, tokens, lam, mask, diagnostics=False)
        return res.params, res.inner.aux

    return Runtime(
        mcfg,
        lambda seed: moe.init_moe(mcfg, seed=seed).params,
        train_step,
        {k: make_infer(k) for k in sorted(ks)},
        adapt,
        costs.values("joules_per_token"),
        device,
    )


def pretrain(cfg, rt: Runtime, seed: int, batches, workdir: str) -> tuple[Any, float, float]:
    """Train ``rt.train_step`` with :func:`metattt.train.fit` (resumable in ``workdir``).

    ``batches(first)`` makes, on the host, the stacked ``(inputs, targets)`` of steps
    ``first .. first + train.steps_per_call - 1``. Returns ``(params, the last logged mean
    training loss, seconds)``.
    """
    t = cfg.train
    memory = runlog.MemoryWriter()
    start = time.perf_counter()
    with runlog.create_writer(workdir) as files:
        state = train.fit(
            rt.train_step,
            rt.train_step.init(rt.init(seed)),
            batches,
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


def doc_batches(cfg, seed: int, streams: Streams):
    """``first -> stacked (inputs, targets)`` windows of the training docs for one call."""
    chunk, batch, length = cfg.train.steps_per_call, cfg.train.batch, cfg.data.length
    shape = (chunk, batch, length)

    def batches(first: int):
        call = first // chunk
        w = tc.lm_windows(streams.train, length, chunk * batch, seed=seed * 100_003 + call)
        return w.inputs.reshape(shape), w.targets.reshape(shape)

    return batches


def train_dir(workdir: str, seed: int) -> str:
    return os.path.join(workdir, "train", f"seed_{seed}")


def _info_path(workdir: str, seed: int) -> str:
    return os.path.join(workdir, "params", f"seed_{seed}.json")


def cached_params(rt: Runtime, seed: int, workdir: str, fit) -> tuple[Any, dict[str, Any]]:
    """``fit() -> (params, info)`` once per seed; a rerun restores the checkpoint and info."""
    path = os.path.join(workdir, "params", f"seed_{seed}")
    info_path = _info_path(workdir, seed)
    if os.path.isfile(info_path):
        with Checkpointer(path) as ck:
            params = ck.restore(rt.init(seed))
        with open(info_path) as f:
            return params, json.load(f)
    params, info = fit()
    with Checkpointer(path) as ck:
        ck.save(0, params, force=True)
    with open(info_path, "w") as f:
        json.dump(info, f)
    return params, info


def trained_params(cfg, rt: Runtime, seed: int, streams: Streams, workdir: str):
    """Train once per seed; a rerun restores the checkpoint. Returns ``(params, info)``."""
    return cached_params(rt, seed, workdir, lambda: _fit(cfg, rt, seed, streams, workdir))


def _fit(cfg, rt: Runtime, seed: int, streams: Streams, workdir: str):
    """Train, then measure the held-out docs' bits/char (the size of the shift's baseline)."""
    batches = doc_batches(cfg, seed, streams)
    params, loss, seconds = pretrain(cfg, rt, seed, batches, train_dir(workdir, seed))
    info = {"train_loss_nats": loss, "train_seconds": seconds}
    held = tc.lm_windows(streams.heldout, cfg.data.length, cfg.data.heldout_windows, seed=seed)
    mask = jnp.ones((rt.mcfg.num_experts,), bool)
    shape = (-1, cfg.data.batch, cfg.data.length)  # the stream's batch shape: no new compile
    nats = [
        float(rt.infer[rt.mcfg.top_k](params, x, y, mask)[0])
        for x, y in zip(held.inputs.reshape(shape), held.targets.reshape(shape), strict=True)
    ]
    info["heldout_doc_bpc"] = float(np.mean(nats)) / math.log(2)
    return params, info


# --- serving the stream -----------------------------------------------------------------------


def serving_rate(cfg, rt: Runtime) -> float:
    """r tokens/s: the unadapted model at mean-cost routing keeps the device busy
    ``monitor.utilization`` of the time (roofline time per token at the base clock)."""
    mcfg, dev = rt.mcfg, rt.device
    b, length = cfg.data.batch, cfg.data.length
    tokens = b * length
    flops_e, bytes_e = moe.expert_token_costs(mcfg)
    work = dense_work(mcfg, b, length) + Work(
        tokens * mcfg.top_k * mcfg.num_layers * float(np.mean(flops_e)),
        tokens * mcfg.top_k * mcfg.num_layers * float(np.mean(bytes_e)),
    )
    seconds_per_token = dev.roofline_seconds(work.flops, work.nbytes) / tokens
    return cfg.monitor.utilization / seconds_per_token


def fixed_power(cfg, rt: Runtime, rate: float) -> float:
    """Power that routing cannot change: idle plus the dense layers' dynamic power at ``rate``."""
    tokens = cfg.data.batch * cfg.data.length
    dense = dense_work(rt.mcfg, cfg.data.batch, cfg.data.length)
    return rt.device.idle_power_w + rate * rt.device.work_energy(*dense) / tokens


def routed_energy(rt: Runtime, counts: Any, tokens: int) -> float:
    """µJ per token of the experts' per-token costs over the assignments ``counts`` (layers, E):
    what the routing alone costs (the energy term's quantity, without weight reads)."""
    return 1e6 * float(np.sum(np.asarray(counts) * rt.joules[None, :])) / tokens


def static_mask(rt: Runtime, prune: int) -> np.ndarray:
    """(E,) bool with the ``prune`` costliest experts off (ties: the higher index)."""
    e = rt.mcfg.num_experts
    order = e - 1 - np.argsort(-rt.joules[::-1], kind="stable")
    mask = np.ones((e,), bool)
    mask[order[:prune]] = False
    return mask


def warm_up(cfg, rt: Runtime, params: Any, stream: Any) -> None:
    """Compile every inference and the adaptation step for the stream's shapes, so the
    wall-clock times of :func:`serve` (and the TTT overhead) exclude compilation."""
    b = cfg.data.batch
    x, y = jnp.asarray(stream.inputs[:b]), jnp.asarray(stream.targets[:b])
    mask = jnp.ones((rt.mcfg.num_experts,), bool)
    for infer in rt.infer.values():
        jax.block_until_ready(infer(params, x, y, mask))
    jax.block_until_ready(rt.adapt(params, x[: cfg.ttt.windows], jnp.float32(0.0), mask))


def serve(
    cfg,
    rt: Runtime,
    params: Any,
    stream: Any,
    method: Method,
    *,
    rate: float,
    seed: int,
    budget_w: float | None = None,
    metric: Metric = BPC,
) -> dict[str, Any]:
    """Serve the stream prequentially with ``method``; every batch is a monitor window.

    ``stream`` has ``inputs`` (S·B, L) tokens and ``targets`` (S·B, ...) for the score.
    """
    mcfg = rt.mcfg
    b, length = cfg.data.batch, cfg.data.length
    tokens = b * length
    period = tokens / rate
    monitor = create_monitor(
        cfg.monitor.kind, allow_simulated=cfg.monitor.allow_simulated, seed=seed
    )
    simulated = hasattr(monitor, "record_work")
    k = method.top_k or mcfg.top_k
    mask = static_mask(rt, method.prune)
    lam = method.lam
    allow_adapt = method.kind in ("ttt", "energy_ttt")
    policy = state = None
    if method.kind == "budget":
        policy = power_budget(
            budget_w,
            rt.joules,
            top_k=mcfg.top_k,
            num_layers=mcfg.num_layers,
            idle_power_w=fixed_power(cfg, rt, rate),
            tokens_per_s=rate,
            controller=lambda_controller(
                budget_w,
                lam_init=cfg.budget.lam_init,
                lam_min=cfg.budget.lam_min,
                lam_max=cfg.budget.lam_max,
                gain=cfg.budget.gain,
            ),
            patience=cfg.budget.patience,
        )
        state = policy.init()
        lam = cfg.budget.lam_init
    inputs = stream.inputs.reshape(-1, b, length)
    targets = stream.targets.reshape(len(inputs), b, *stream.targets.shape[1:])
    nats, power, lams, levels, ks = [], [], [], [], []
    counts_total = np.zeros((mcfg.num_layers, mcfg.num_experts), np.int64)
    counts_late = np.zeros_like(counts_total)
    curve_energy, curve_loss = [], []
    energy = dynamic = busy = adapt_dynamic = expert_j = 0.0
    dense = dense_work(mcfg, b, length)
    infer_s = adapt_s = 0.0
    adapt_calls = 0
    steps = len(inputs)
    late = max(steps // 4, 1)  # the last quarter of the stream: routing after adaptation
    for t in range(steps):
        with monitor.measure() as window:
            start = time.perf_counter()
            loss, counts = jax.block_until_ready(
                rt.infer[k](params, inputs[t], targets[t], jnp.asarray(mask))
            )
            infer_s += time.perf_counter() - start
            counts = np.asarray(counts)
            work = forward_work(mcfg, counts, b, length)
            step_busy = monitor.record_work(*work) if simulated else 0.0
            dynamic += rt.device.work_energy(*work)
            expert_j += rt.device.work_energy(*work) - rt.device.work_energy(*dense)
            if allow_adapt and t % cfg.ttt.every == 0:
                sub = inputs[t, : cfg.ttt.windows]
                start = time.perf_counter()
                params, aux = jax.block_until_ready(
                    rt.adapt(params, sub, jnp.float32(lam), jnp.asarray(mask))
                )
                adapt_s += time.perf_counter() - start
                adapt_calls += 1
                curve_energy += np.asarray(aux.joules_per_token).tolist()
                curve_loss += np.asarray(aux.task_loss).tolist()
                for step_counts in np.asarray(aux.expert_counts):
                    w = forward_work(mcfg, step_counts, sub.shape[0], length).scaled(
                        1 + BACKWARD_FACTOR
                    )
                    if simulated:
                        step_busy += monitor.record_work(*w)
                    adapt_dynamic += rt.device.work_energy(*w)
                    dynamic += rt.device.work_energy(*w)
            if simulated:
                monitor.idle(max(period - step_busy, 0.0))
        rec = window.record
        energy += rec.energy_j
        busy += step_busy
        nats.append(float(loss))
        power.append(rec.mean_power_w)
        lams.append(float(lam))
        ks.append(k)
        counts_total += counts
        if t >= steps - late:
            counts_late += counts
        if policy is not None:
            state, decision = policy.update(state, rec.mean_power_w, rec.max_temperature_c)
            lam, k, mask = decision.lambda_energy, decision.top_k, decision.expert_mask
            allow_adapt = decision.adapt
            levels.append(decision.level)
    monitor.close()
    half = steps // 2
    out = {
        metric.key: float(np.mean(nats)) * metric.scale,
        f"{metric.key}_late": float(np.mean(nats[half:])) * metric.scale,
        "tokens": steps * tokens,
        "energy_j": energy,
        "dynamic_j": dynamic,
        "adapt_dynamic_j": adapt_dynamic,
        "expert_j": expert_j,
        "delay_s": busy,
        "uj_per_token": 1e6 * dynamic / (steps * tokens),
        "routed_uj_per_token_late": routed_energy(rt, counts_late, late * tokens),
        "total_uj_per_token": 1e6 * energy / (steps * tokens),
        "edp": edp(dynamic, busy, steps * tokens),
        "infer_wall_s": infer_s,
        "adapt_wall_s": adapt_s,
        "overhead": adapt_s / infer_s,
        "adapt_calls": adapt_calls,
        "mean_power_w": float(np.mean(power)),
        "late_power_w": float(np.mean(power[half:])),
        "power_trace": power,
        "lambda_trace": lams,
        "top_k_trace": ks,
        "counts": counts_total.tolist(),
        "counts_late": counts_late.tolist(),
        "curve_energy_uj": [1e6 * v for v in curve_energy],
        "curve_loss": curve_loss,
        "monitor": monitor.source,
        "monitor_fallback": monitor.fallback_reason,
    }
    if policy is not None:
        out.update(
            budget_w=budget_w,
            level_trace=levels,
            final_level=levels[-1],
            final_top_k=int(k),
            final_pruned=int(np.sum(~np.asarray(mask))),
            plan_budget_met=bool(decision.budget_met),
            budget_kept=out["late_power_w"] <= budget_w,
        )
    return out


# --- the experiment ---------------------------------------------------------------------------


def _cell_path(workdir: str, seed: int, name: str) -> str:
    return os.path.join(workdir, "cells", f"seed_{seed}", name.replace("/", "_") + ".json")


def load_cells(cfg, workdir: str) -> dict[str, list[dict[str, Any]]]:
    """The finished run's per-(seed, method) cells, method by method in seed order."""
    cells = {}
    for name in methods(cfg):
        cells[name] = []
        for seed in cfg.seeds:
            with open(_cell_path(workdir, seed, name)) as f:
                cells[name].append(json.load(f))
    return cells


def run(cfg, workdir: str) -> dict[str, Any]:
    """Train per seed, serve the shifted stream with every method (cached per cell), report."""
    validate(cfg)
    rt = build_runtime(cfg)

    def prepare(seed):
        streams = load_streams(seed)
        params, info = trained_params(cfg, rt, seed, streams, workdir)
        return params, shifted_stream(cfg, streams, seed), info

    results, _ = run_methods(cfg, workdir, rt, prepare, summary_fn=summary)
    return results


def run_methods(
    cfg, workdir: str, rt: Runtime, prepare, *, summary_fn, metric: Metric = BPC,
    prefix: str = "energy_moe",
) -> tuple[dict[str, Any], dict[str, list]]:  # fmt: skip
    """Serve every seed's stream with every method, cached per (seed, method) cell.

    ``prepare(seed) -> (params, stream, info)`` trains (or restores) and builds the stream; it
    runs only for a seed with a missing cell. Writes ``results.json``, ``summary.md``
    (``summary_fn(results, cfg)``) and the plots into ``workdir``; returns ``(results, cells)``.
    """
    rate = serving_rate(cfg, rt)
    p_fixed = fixed_power(cfg, rt, rate)
    table = methods(cfg)
    cells: dict[str, list[dict[str, Any]]] = {name: [] for name in table}
    seeds_info = []
    for seed in cfg.seeds:
        pending = [n for n in table if not os.path.isfile(_cell_path(workdir, seed, n))]
        if pending:  # only then load the data, the parameters and compile
            params, stream, info = prepare(seed)
            warm_up(cfg, rt, params, stream)
        else:
            with open(_info_path(workdir, seed)) as f:
                info = json.load(f)
        seeds_info.append(info)
        for name, method in runlog.progress(table.items(), desc=f"methods seed {seed}"):
            path = _cell_path(workdir, seed, name)
            if name not in pending:
                with open(path) as f:
                    cells[name].append(json.load(f))
                continue
            budget_w = None
            if method.kind == "budget":
                p0 = cells["no_ttt"][-1]["mean_power_w"]
                budget_w = p_fixed + method.fraction * (p0 - p_fixed)
            result = harness.json_cell(
                path,
                lambda m=method, b=budget_w: serve(
                    cfg, rt, params, stream, m, rate=rate, seed=seed, budget_w=b, metric=metric
                ),
            )
            cells[name].append(result)
    results = aggregate(cells, table, metric)
    results.update(
        seeds=list(cfg.seeds),
        seed_info=seeds_info,
        serving_rate_tokens_s=rate,
        fixed_power_w=p_fixed,
        idle_power_w=rt.device.idle_power_w,
        expert_uj_per_token=(1e6 * rt.joules).tolist(),
        expert_widths=list(rt.mcfg.expert_widths),
        monitor=cells["no_ttt"][0]["monitor"],
        monitor_fallback=cells["no_ttt"][0]["monitor_fallback"],
        kinds={name: m.kind for name, m in table.items()},
    )
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(summary_fn(results, cfg) + "\n")
    plot_all(results, cells, workdir, metric=metric, prefix=prefix)
    return results, cells


SCALARS = (
    "bpc",
    "routed_uj_per_token_late",
    "bpc_late",
    "uj_per_token",
    "total_uj_per_token",
    "edp",
    "overhead",
    "infer_wall_s",
    "adapt_wall_s",
    "mean_power_w",
    "late_power_w",
)


def scalars(metric: Metric = BPC) -> tuple[str, ...]:
    """The per-cell scalars :func:`aggregate` averages, with ``bpc`` renamed to the metric."""
    return tuple(key.replace("bpc", metric.key) for key in SCALARS)


def aggregate(
    cells: dict[str, list[dict]], table: dict[str, Method], metric: Metric = BPC
) -> dict[str, Any]:
    """Means ± 95% CIs over seeds, changes relative to ``no_ttt`` per seed, targets, front.

    The accuracy target is ``<metric>_change < 0.05``: a relative change for bits/char, an
    absolute one (accuracy points) for an error rate.
    """
    base = cells["no_ttt"]
    key_m = metric.key
    rows: dict[str, dict[str, Any]] = {}
    for name, runs in cells.items():
        row = {key: stats.seed_summary([r[key] for r in runs]) for key in scalars(metric)}
        row["energy_reduction"] = stats.seed_summary(
            [1 - r["uj_per_token"] / b["uj_per_token"] for r, b in zip(runs, base, strict=True)]
        )
        row[f"{key_m}_change"] = stats.seed_summary(
            [r[key_m] / b[key_m] - 1 if metric.relative else r[key_m] - b[key_m]
             for r, b in zip(runs, base, strict=True)]
        )  # fmt: skip
        row["adapt_share_of_energy"] = stats.seed_summary(
            [r["adapt_dynamic_j"] / r["dynamic_j"] for r in runs]
        )
        row["expert_share_of_energy"] = stats.seed_summary(
            [r["expert_j"] / r["dynamic_j"] for r in runs]
        )
        if table[name].kind == "budget":
            row["budget_w"] = stats.seed_summary([r["budget_w"] for r in runs])
            row["final_level"] = [r["final_level"] for r in runs]
            row["final_top_k"] = [r["final_top_k"] for r in runs]
            row["final_pruned"] = [r["final_pruned"] for r in runs]
            row["budget_kept"] = [r["budget_kept"] for r in runs]
            row["plan_budget_met"] = [r["plan_budget_met"] for r in runs]
        red, chg = row["energy_reduction"]["mean"], row[f"{key_m}_change"]["mean"]
        row["meets_energy_target"] = bool(red >= 0.20 and chg < 0.05)
        row["meets_overhead_target"] = (
            bool(row["overhead"]["mean"] < 0.10) if table[name].adapts else None
        )
        rows[name] = row
    names = list(rows)
    points = [(rows[n]["uj_per_token"]["mean"], rows[n][key_m]["mean"]) for n in names]
    front = [names[i] for i in pareto_front(points)]
    return {"methods": rows, "pareto_front": front, "matched": matched(rows, table, key_m)}


def matched(
    rows: dict[str, dict], table: dict[str, Method], key: str = "bpc"
) -> dict[str, dict[str, Any]]:
    """For each static baseline: the cheapest energy-aware TTT point at no worse ``key``.

    ``beats`` when that point uses less dynamic energy per token than the baseline (means over
    seeds); ``None`` when no energy-aware point is as accurate as the baseline.
    """
    aware = [n for n, m in table.items() if m.kind in ENERGY_AWARE]
    out = {}
    for name, method in table.items():
        if method.kind not in BASELINES:
            continue
        bpc, energy = rows[name][key]["mean"], rows[name]["uj_per_token"]["mean"]
        ok = [n for n in aware if rows[n][key]["mean"] <= bpc]
        best = min(ok, key=lambda n: rows[n]["uj_per_token"]["mean"]) if ok else None
        out[name] = {
            "baseline_bpc": bpc,
            "baseline_uj": energy,
            "best_aware": best,
            "aware_bpc": rows[best][key]["mean"] if best else None,
            "aware_uj": rows[best]["uj_per_token"]["mean"] if best else None,
            "beats": (rows[best]["uj_per_token"]["mean"] < energy) if best else None,
        }
    return out


# --- tables -----------------------------------------------------------------------------------


def _fmt(entry: dict[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    mean, ci = entry["mean"] * scale, entry["ci"] * scale
    if math.isfinite(ci):
        return f"{mean:.{digits}f} ± {ci:.{digits}f}"
    return f"{mean:.{digits}f}"


def summary(results: dict[str, Any], cfg) -> str:
    """Markdown tables: every method, the matched-accuracy comparison, the budgets."""
    del cfg
    return summary_tables(results, BPC)


def _change(entry: dict[str, Any], metric: Metric) -> str:
    """A change vs no_ttt: percent when relative, accuracy points (pp) when absolute."""
    return _fmt(entry, 1, 100) + ("%" if metric.relative else " pp")


def summary_tables(results: dict[str, Any], metric: Metric) -> str:
    """:func:`summary`'s tables for any metric."""
    rows = results["methods"]
    front = set(results["pareto_front"])
    m_key, label = metric.key, metric.label
    lines = [
        f"| method | {label} | Δ {label} vs no TTT | routed expert energy/token, last "
        "quarter (µJ) | dyn. energy/token (µJ) | energy reduction | total energy/token (µJ) "
        "| EDP (µJ·ns) | TTT overhead (wall) | adapt share of energy | Pareto | ≥20% & <5% |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        overhead = (
            _fmt(r["overhead"], 1, 100) + "%" if r["meets_overhead_target"] is not None else "-"
        )
        lines.append(
            f"| {name} | {_fmt(r[m_key])} | {_change(r[f'{m_key}_change'], metric)} | "
            f"{_fmt(r['routed_uj_per_token_late'], 4)} | {_fmt(r['uj_per_token'], 4)} | "
            f"{_fmt(r['energy_reduction'], 1, 100)}% | "
            f"{_fmt(r['total_uj_per_token'], 4)} | {_fmt(r['edp'], 3, 1e15)} | {overhead} | "
            f"{_fmt(r['adapt_share_of_energy'], 1, 100)}% | {'yes' if name in front else ''} | "
            f"{'yes' if r['meets_energy_target'] else 'no'} |"
        )
    lines += [
        "",
        "**Matched accuracy**: the cheapest energy-aware TTT point (energy_ttt or budget) with "
        f"{label} no worse than each static baseline.",
        "",
        f"| baseline | {label} | µJ/token | best energy-aware at ≤ {label} | its {label} "
        "| its µJ/token | energy-aware wins |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in results["matched"].items():
        if m["best_aware"] is None:
            lines.append(
                f"| {name} | {m['baseline_bpc']:.3f} | {m['baseline_uj']:.4f} | none as accurate "
                "| - | - | no |"
            )
        else:
            lines.append(
                f"| {name} | {m['baseline_bpc']:.3f} | {m['baseline_uj']:.4f} | {m['best_aware']} "
                f"| {m['aware_bpc']:.3f} | {m['aware_uj']:.4f} | {'yes' if m['beats'] else 'no'} |"
            )
    budgets = [n for n in rows if "budget_w" in rows[n]]
    if budgets:
        lines += [
            "",
            "**Power budgets** (per seed: final level 0 = λ only, 1 = pruned, 2 = smaller top-k; "
            "kept = mean power over the second half of the stream within the budget).",
            "",
            "| budget | budget (W) | mean power, 2nd half (W) | final level | final top-k | "
            f"experts pruned | kept | plan predicts budget met | {label} |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in budgets:
            r = rows[name]
            lines.append(
                f"| {name} | {_fmt(r['budget_w'], 2)} | {_fmt(r['late_power_w'], 2)} | "
                f"{r['final_level']} | {r['final_top_k']} | {r['final_pruned']} | "
                f"{r['budget_kept']} | {r['plan_budget_met']} | {_fmt(r[m_key])} |"
            )
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(results: dict[str, Any], path: str, metric: Metric = BPC) -> None:
    """Dynamic energy per token vs the metric for every method (means ± CI), front joined."""
    plt = _pyplot()
    rows, kinds = results["methods"], results["kinds"]
    colors = {"no_ttt": "k", "ttt": "tab:blue", "energy_ttt": "tab:green", "budget": "tab:purple",
              "prune": "tab:red", "top_k": "tab:orange"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for name, r in rows.items():
        x, y = r["uj_per_token"], r[metric.key]
        ax.errorbar(x["mean"], y["mean"], xerr=np.nan_to_num(x["ci"]),
                    yerr=np.nan_to_num(y["ci"]), fmt="o", color=colors[kinds[name]],
                    label=kinds[name], ms=5, capsize=2)  # fmt: skip
        ax.annotate(name, (x["mean"], y["mean"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    front = sorted(results["pareto_front"], key=lambda n: rows[n]["uj_per_token"]["mean"])
    xs = [rows[n]["uj_per_token"]["mean"] for n in front]
    ys = [rows[n][metric.key]["mean"] for n in front]
    ax.plot(xs, ys, "k--", lw=0.8, label="Pareto front")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_xlabel("dynamic energy per token (µJ, simulated monitor, adaptation included)")
    ax.set_ylabel(f"{metric.label} on the shifted stream (prequential)")
    ax.set_title("energy vs accuracy on the shifted stream")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap_methods(results: dict[str, Any], metric: Metric = BPC) -> list[str]:
    """no_ttt, ttt and the energy-aware TTT point with the largest saving at < 5% loss."""
    rows, kinds = results["methods"], results["kinds"]
    change = f"{metric.key}_change"
    aware = [n for n in rows if kinds[n] == "energy_ttt" and rows[n][change]["mean"] < 0.05]
    aware = aware or [n for n in rows if kinds[n] == "energy_ttt"]
    pick = max(aware, key=lambda n: rows[n]["energy_reduction"]["mean"])
    return ["no_ttt", "ttt", pick]


def plot_heatmaps(
    results: dict[str, Any], cells: dict[str, list], path: str, metric: Metric = BPC
) -> None:
    """Share of each layer's assignments per expert over the last quarter of the stream."""
    plt = _pyplot()
    shown = heatmap_methods(results, metric)
    widths = results["expert_widths"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.2), squeeze=False)
    for ax, name in zip(axes[0], shown, strict=True):
        counts = np.sum([np.asarray(r["counts_late"], np.float64) for r in cells[name]], axis=0)
        share = counts / counts.sum(axis=1, keepdims=True)
        im = ax.imshow(share, vmin=0, vmax=max(0.5, share.max()), cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(widths)), [str(w) for w in widths], fontsize=7)
        ax.set_yticks(range(share.shape[0]))
        ax.set_xlabel("expert (hidden width)")
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: {results['methods'][name]['uj_per_token']['mean']:.4f} µJ/tok",
                     fontsize=8)  # fmt: skip
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of assignments")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_convergence(
    results: dict[str, Any], cells: dict[str, list], path: str, metric: Metric = BPC
) -> None:
    """Expected routing energy and the task loss of the adapted batch vs adaptation step."""
    plt = _pyplot()
    kinds = results["kinds"]
    fig, (ax_e, ax_l) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for name, runs in cells.items():
        if kinds[name] not in ("ttt", "energy_ttt") or not runs[0]["curve_energy_uj"]:
            continue
        energy = np.mean([r["curve_energy_uj"] for r in runs], axis=0)
        loss = np.mean([r["curve_loss"] for r in runs], axis=0) * metric.scale
        steps = np.arange(1, len(energy) + 1)
        ax_e.plot(steps, energy, label=name, lw=1)
        ax_l.plot(steps, loss, label=name, lw=1)
    ax_e.set_xlabel("adaptation step (cumulative over the stream)")
    ax_e.set_ylabel("expected expert energy (µJ/token)")
    ax_l.set_xlabel("adaptation step (cumulative over the stream)")
    ax_l.set_ylabel(metric.loss_label)
    ax_e.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_budget(results: dict[str, Any], cells: dict[str, list], path: str, metric=BPC) -> None:
    """Power per batch (seed 0) against each budget, and λ_energy from the controller."""
    del metric  # the same for every metric
    plt = _pyplot()
    names = [n for n in cells if results["kinds"][n] == "budget"]
    fig, (ax_p, ax_l) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    base = cells["no_ttt"][0]["power_trace"]
    ax_p.plot(base, color="k", lw=1, label="no_ttt")
    for i, name in enumerate(names):
        run0 = cells[name][0]
        color = f"C{i}"
        ax_p.plot(run0["power_trace"], color=color, lw=1, label=name)
        ax_p.axhline(run0["budget_w"], color=color, ls=":", lw=0.8)
        ax_l.plot(run0["lambda_trace"], color=color, lw=1, label=name)
    ax_p.set_xlabel("stream batch")
    ax_p.set_ylabel("simulated power (W); dotted: budgets")
    ax_l.set_xlabel("stream batch")
    ax_l.set_ylabel("λ_energy")
    ax_l.set_yscale("log")
    ax_p.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLOTS = {
    "pareto": lambda results, cells, path, metric: plot_pareto(results, path, metric),
    "heatmap": plot_heatmaps,
    "convergence": plot_convergence,
    "budget": plot_budget,
}


def plot_all(
    results: dict[str, Any], cells: dict[str, list], folder: str, *, metric: Metric = BPC,
    prefix: str = "energy_moe",
) -> list[str]:  # fmt: skip
    """Write ``<prefix>_<plot>.png`` for every plot into ``folder``; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, fn in PLOTS.items():
        if name == "budget" and "budget" not in results["kinds"].values():
            continue
        path = os.path.join(folder, f"{prefix}_{name}.png")
        fn(results, cells, path, metric)
        paths.append(path)
    return paths


# --- report and demo --------------------------------------------------------------------------


def reading(results: dict[str, Any], metric: Metric = BPC) -> list[str]:
    """Plain-language reading of the targets for any metric, computed from the results."""
    rows, kinds = results["methods"], results["kinds"]
    m_key, label = metric.key, metric.label
    aware = [n for n in rows if kinds[n] in ENERGY_AWARE]
    hits = [n for n in aware if rows[n]["meets_energy_target"]]
    both = [n for n in hits if rows[n]["meets_overhead_target"]]
    base, ttt = rows["no_ttt"], rows["ttt"]
    share = base["expert_share_of_energy"]["mean"]
    routed = base["routed_uj_per_token_late"]["mean"]
    adapt_share = np.mean([rows[n]["adapt_share_of_energy"]["mean"] for n in rows
                           if kinds[n] == "energy_ttt"])  # fmt: skip
    lines = [
        f"- Without TTT the experts are {100 * share:.0f}% of the dynamic energy (the rest is "
        "attention, projections, router and LM head, which routing cannot change): a 20% "
        f"total saving needs the experts' energy cut by {min(100 * 0.2 / share, 999):.0f}%.",
        f"- TTT without the energy term changes {label} by "
        f"{_change(ttt[f'{m_key}_change'], metric)} and energy by "
        f"{-100 * ttt['energy_reduction']['mean']:+.1f}%; the adaptation's own forward and "
        f"backward passes are {100 * adapt_share:.1f}% of the energy-aware TTT runs' dynamic "
        "energy.",
        "- Routing alone (routed expert energy per token over the last quarter of the "
        "stream, relative to no_ttt): "
        + ", ".join(
            f"{n} {100 * (rows[n]['routed_uj_per_token_late']['mean'] / routed - 1):+.0f}%"
            for n in rows
            if n != "no_ttt" and kinds[n] != "budget"
        )
        + ".",
        f"- Energy-aware points meeting ≥ 20% energy reduction with < 5"
        f"{'%' if metric.relative else ' pp'} {label} increase: "
        f"{', '.join(hits) or 'none'}; of those also with TTT overhead < 10%: "
        f"{', '.join(both) or 'none'}.",
    ]
    for name, m in results["matched"].items():
        if m["best_aware"] is None:
            lines.append(f"- vs {name}: no energy-aware point is as accurate, so no win counts.")
        else:
            verdict = "uses less" if m["beats"] else "does NOT use less"
            lines.append(
                f"- vs {name} ({m['baseline_bpc']:.3f} {label}, {m['baseline_uj']:.4f} µJ/tok): "
                f"{m['best_aware']} ({m['aware_bpc']:.3f} {label}) {verdict} energy "
                f"({m['aware_uj']:.4f} µJ/tok)."
            )
    return lines


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """Put tables, plots and provenance into BENCHMARKS.md's energy_moe section."""
    cells = load_cells(cfg, workdir)
    root = report.BENCHMARKS.parent
    figures = root / "docs" / "figures"
    plot_all(results, cells, str(figures))
    mcfg = model_config(cfg)
    info = results["seed_info"]
    n_params = sum(x.size for x in jax.tree.leaves(moe.init_moe(mcfg).params))
    monitor = results["monitor"] + (
        f" (fallback: {results['monitor_fallback']})" if results["monitor_fallback"] else ""
    )
    body = "\n".join(
        [
            "## Energy-aware TTT for a mixture-of-experts LM (issue 5)",
            "",
            f"- Date: {report.today()}; machine: {report.machine()}.",
            "- Command: `python -m experiments.run --config configs/energy_moe.py "
            "--workdir runs/energy_moe`.",
            f"- **Energy is simulated** (monitor: {monitor}): a modelled accelerator "
            f"(idle {results['idle_power_w']:.0f} W, 2 pJ/FLOP, 50 pJ/byte, roofline time) fed "
            "the FLOPs and bytes of the dense layers and of the experts each batch actually "
            f"used; adaptation steps are charged {1 + BACKWARD_FACTOR:g}x their forward work. "
            f"Batches arrive at r = {results['serving_rate_tokens_s']:.3g} tokens/s "
            f"(utilisation {cfg.monitor.utilization} at mean-cost routing); the fixed power "
            f"(idle + dense layers) is {results['fixed_power_w']:.1f} W. 'Dynamic energy' is "
            "the energy above idle (what routing changes); the total includes idle. The "
            "wall-clock TTT overhead is measured on this CPU.",
            f"- Model: {mcfg.num_layers} layers, D={mcfg.d_model}, {mcfg.num_heads} heads, "
            f"E={mcfg.num_experts} SwiGLU experts of widths {list(mcfg.expert_widths)} "
            f"({', '.join(f'{v:.4f}' for v in results['expert_uj_per_token'])} µJ/token each), "
            f"top-{mcfg.top_k}, dropless, {n_params} parameters; trained "
            f"{cfg.train.num_steps} Adam steps (lr {cfg.train.lr}, batch {cfg.train.batch}x"
            f"{cfg.data.length} bytes, load-balance {cfg.train.load_balance}, z "
            f"{cfg.train.z_loss}) on the pydoc_data English topics (90% of the topics; held-out "
            "topics: "
            + ", ".join(f"{i['heldout_doc_bpc']:.3f}" for i in info)
            + " bits/char per seed). Training took "
            + ", ".join(f"{i['train_seconds']:.0f}" for i in info)
            + " s per seed.",
            f"- Shifted stream: {cfg.data.stream_batches} batches of {cfg.data.batch}x"
            f"{cfg.data.length} bytes of the standard library's top-level Python modules, "
            "scored prequentially (each batch before any adaptation on it). TTT: router "
            f"({cfg.ttt.params}), next-byte loss, Adam lr {cfg.ttt.lr}, {cfg.ttt.steps} steps on "
            f"{cfg.ttt.windows} windows of every {cfg.ttt.every}th batch, cumulative. Budget "
            f"controller: multiplicative, gain {cfg.budget.gain}, λ in [{cfg.budget.lam_min}, "
            f"{cfg.budget.lam_max}], escalation after {cfg.budget.patience} readings over budget "
            "at λ_max.",
            f"- Seeds {tuple(cfg.seeds)} (init, training batches, doc split, stream); means ± "
            "95% t-interval over seeds; changes are per seed relative to no_ttt, then averaged.",
            "",
            summary(results, cfg),
            "",
            "**Reading (computed from the numbers above):**",
            "",
            *reading(results),
            "",
            "![Pareto](docs/figures/energy_moe_pareto.png)",
            "![expert activation](docs/figures/energy_moe_heatmap.png)",
            "![routing convergence](docs/figures/energy_moe_convergence.png)",
            "![power budgets](docs/figures/energy_moe_budget.png)",
        ]
    )
    report.publish("energy_moe", body, results)


def demo_rows(workdir: str) -> list[tuple[str, str, str, float, float, float]]:
    """``make demo``: no TTT vs energy-aware TENT on the demo config's shifted (code) stream.

    Returns rows ``(system, method, metric, before, after, seconds)``: the simulated expert
    energy per token of the routing over the last quarter of the stream, the dynamic energy per
    token with the adaptation's own work included, and bits/char.
    """
    from configs import energy_moe as energy_config  # configs are read by experiments only

    cfg = energy_config.get_config("demo")
    cfg.budget.fractions = ()
    cfg.baselines.prune = ()
    cfg.baselines.top_k = ()
    start = time.perf_counter()
    results = run(cfg, os.path.join(workdir, "energy_moe"))
    seconds = time.perf_counter() - start
    rows = results["methods"]
    base, aware = rows["no_ttt"], rows[f"energy_ttt/{cfg.ttt.lambdas[0]:g}"]
    system, method = "energy-aware MoE TTT", f"TENT+energy (λ={cfg.ttt.lambdas[0]:g})"
    metrics = (
        ("routed_uj_per_token_late", "sim. expert energy/token of the routing (µJ)"),
        ("uj_per_token", "sim. dyn. energy/token incl. adaptation (µJ)"),
        ("bpc", "bits/char, docs -> code"),
    )
    return [
        (system, method, metric, base[key]["mean"], aware[key]["mean"], seconds)
        for key, metric in metrics
    ]
