"""Expert-level adaptation and the TTT objectives of issue 15, as methods of the experiment.

A method of kind ``lora_ttt/<r>``, ``norm_ttt``, ``bias_ttt`` or ``fast_ttt/<ρ>``, or any ``ttt`` /
``energy_ttt`` with an ``:<objective>``, is served through a :class:`Variant`: its own model
(for LoRA: the trained model inside a LoRA model whose every expert matrix has a rank-r
adapter in an R_max buffer, :func:`metattt.models.moe.lora_realloc`; the rank mask is data,
so every rank shares one compiled adaptation), its own adapted parameters (a
:mod:`metattt.params` selector) and its own objective (:func:`metattt.energy.energy_tent`):

* ``lora_ttt``: the expert LoRA factors (``lora`` preset); ``lora_hw/<R>``: the same with
  the ranks (and which experts keep an adapter) chosen after every batch by
  :func:`metattt.energy.adapter_ranks` from the monitor's power and temperature and the free
  memory, applied by the jitted ``lora_realloc`` before the next adaptation (no recompilation;
  power budget and bands from ``expert.hw_*``); ``norm_ttt``: the norm scales and
  biases (``norm``), ``bias_ttt``: every bias (``bias``: in this model only the LM and class
  heads have biases, after the routing) -- each with the router (``ttt.params``) unless
  ``expert.with_router`` is False, so that the energy term always has the routing to act on;
  λ_energy is ``expert.lam`` for all of them. ``fast_ttt/<ρ>``: the trained model inside a
  fast-weight model (:mod:`metattt.models.fast_weights`: every expert's output plus a fast
  weight trained inside each forward pass on a key/value loss, chunk by chunk of
  ``expert.fast_chunk`` positions, ``expert.fast_steps`` steps of rate ``expert.fast_lr``;
  zero output projection at the start), of the rank R whose slow projections have the
  trainable parameters of ``lora_ttt/<ρ>`` (4·D·R = 3·ρ·(D + F), else refused); the method
  adapts them (``fast``) with the router.
* objectives: ``entropy`` (TENT), ``next_token`` (LM), ``masked`` (a share
  ``expert.mask_rate`` of the bytes hidden behind random bytes, each predicted from the
  corrupted prefix: LM only), ``consistency`` (symmetric KL between the predictions on two
  augmentations: byte dropout and adjacent swaps for text, a ±``expert.max_shift`` pixel shift
  and ±``expert.noise`` intensity noise for digits; two forward passes per step, both charged).

Masked reconstruction is refused for digits: the model's token head is never trained (the
classifier trains its class head only) and is causal, so it has nothing to reconstruct pixels
with. Energy: a LoRA model's forward pass also pays each expert's merge W + A·B at its active
rank (:func:`metattt.models.moe.expert_work`), in inference and, with the backward factor, in
every adaptation step; a fast-weight model pays its projections, reads and inner steps
(:func:`metattt.models.fast_weights.fast_work`) in every forward pass likewise.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.energy_moe.registry import EXPERT, Method, method_names, methods
from experiments.energy_moe.runtime import (
    Runtime,
    compile_adapt,
    compile_infer,
    compile_probe,
    compile_signals,
    served_apply,
)
from metattt import augment
from metattt.energy import MemoryReading, RankLimits, adapter_ranks, energy_tent
from metattt.models import fast_weights, moe, quantize
from metattt.params import leaf_paths, select

GROUPS = {"lora_ttt": "lora", "lora_hw": "lora", "norm_ttt": "norm", "bias_ttt": "bias",
          "fast_ttt": "fast", "int8_fast_ttt": "fast"}  # fmt: skip
FAST = ("fast_ttt", "int8_fast_ttt")
LORA = ("lora_ttt", "lora_hw")


class Variant(NamedTuple):
    """How one method other than the router TTT is served.

    Attributes:
        mcfg: the served model's config (LoRA: ``lora_rank`` = ``expert.max_rank``; fast
            weights: ``fast_rank`` > 0).
        rank: the active LoRA rank of every expert matrix (0: no LoRA).
        selector: which parameters adapt (a :mod:`metattt.params` selector).
        objective: the adaptation's L_task.
        infer: jitted ``(params, inputs, targets, mask) -> (score, counts)``.
        adapt: jitted ``(params, tokens, λ, mask, key) -> (params, per-step RoutingStats)``.
        realloc: jitted ``(params, ranks (layers, E), key) -> params`` of the LoRA model, or
            None.
        signals: jitted ``(params, inputs, targets, mask) -> (score, counts, entropy,
            margin)`` of the served model (:func:`.runtime.compile_signals`: the schedules).
        probe: jitted ``(params, inputs, mask) -> router probabilities`` of the served model
            (:func:`.runtime.compile_probe`: the routing explanations).
        int8: served with weight-only int8 experts (``int8_fast_ttt``).

    Every compiled function also takes parameters with int8 experts.
    """

    mcfg: moe.MoEConfig
    rank: int
    selector: Any
    objective: str
    infer: Any
    adapt: Any
    realloc: Any = None
    signals: Any = None
    probe: Any = None
    int8: bool = False


def needs_variant(method: Method) -> bool:
    """Whether ``method`` is served through a :class:`Variant` (not the router TTT)."""
    return method.kind in EXPERT or bool(method.objective)


def objective_of(method: Method, head: str) -> str:
    """The method's objective: its own, else the task's (next byte for the LM, TENT else)."""
    return method.objective or ("next_token" if head == "lm" else "entropy")


def selector_of(cfg, method: Method) -> Any:
    """What ``method`` adapts: its group (with the router unless ``expert.with_router`` is
    False), or ``ttt.params``."""
    if method.kind not in GROUPS:
        return cfg.ttt.params
    group = GROUPS[method.kind]
    return [cfg.ttt.params, group] if cfg.expert.with_router else group


def lora_config(cfg, mcfg: moe.MoEConfig) -> moe.MoEConfig:
    """The LoRA model: an R_max = ``expert.max_rank`` buffer per expert matrix, scale 1."""
    r = int(cfg.expert.max_rank)
    return mcfg._replace(lora_rank=r, lora_alpha=float(r))


def fast_config(cfg, mcfg: moe.MoEConfig, lora_rank: int) -> moe.MoEConfig:
    """The fast-weight model whose slow projections match ``lora_rank``'s trainable parameters
    (:func:`metattt.models.fast_weights.matched_rank`; raises ValueError when none does)."""
    x = cfg.expert
    rank = fast_weights.matched_rank(mcfg.d_model, mcfg.d_ff, lora_rank)
    return mcfg._replace(fast_rank=rank, fast_chunk=int(x.fast_chunk), fast_lr=float(x.fast_lr),
                         fast_steps=int(x.fast_steps))  # fmt: skip


def model_of(cfg, mcfg: moe.MoEConfig, method: Method) -> moe.MoEConfig:
    """The model ``method`` is served with: LoRA, fast-weight, or the trained one."""
    if method.kind in LORA:
        return lora_config(cfg, mcfg)
    if method.kind in FAST:
        return fast_config(cfg, mcfg, method.rank)
    return mcfg


def corruptions(cfg, mcfg: moe.MoEConfig, head: str) -> dict[str, Any]:
    """``corrupt`` and ``augment`` of :func:`metattt.energy.energy_tent` for the task's tokens
    (random tokens 1..256, the bytes, for the LM, whose token 0 is padding; a square image of
    intensities else)."""
    x = cfg.expert
    if head == "lm":
        v = mcfg.vocab_size
        return {
            "corrupt": partial(augment.corrupt_tokens, rate=x.mask_rate, low=1, high=v),
            "augment": partial(augment.drop_swap, drop_rate=x.drop_rate, swap_rate=x.swap_rate,
                               low=1, high=v),
        }  # fmt: skip
    return {
        "augment": partial(augment.grid_noise_shift, levels=mcfg.vocab_size,
                           max_shift=x.max_shift, noise=x.noise),
    }  # fmt: skip


def validate(cfg, mcfg: moe.MoEConfig, head: str) -> None:
    """Raise ValueError for an ``expert`` section that would fail later (no section: nothing)."""
    if "expert" not in cfg:
        return
    x = cfg.expert
    names, every = list(x.methods), method_names(cfg)
    if len(set(every)) != len(every):
        raise ValueError(f"expert.methods must be distinct new method names, got {names}")
    # every method served through a Variant, in expert.methods or (scheduled) schedule.methods
    table = {n: m for n, m in methods(cfg).items() if n in names or needs_variant(m)}
    if any(m.kind in EXPERT for m in table.values()) and not x.lam > 0:
        raise ValueError(f"expert.lam must be > 0 (the expert-level methods are energy-aware), "
                         f"got {x.lam}")  # fmt: skip
    if not 1 <= x.max_rank or any(m.rank > x.max_rank for m in table.values()):
        raise ValueError(f"need 1 <= lora_ttt ranks <= expert.max_rank={x.max_rank}")
    for rate in ("mask_rate", "drop_rate", "swap_rate"):
        if not 0 <= x[rate] < 1:
            raise ValueError(f"expert.{rate} must be in [0, 1), got {x[rate]}")
    if x.max_shift < 0 or x.noise < 0:
        raise ValueError("expert.max_shift and expert.noise must be >= 0")
    fast = [m for m in table.values() if m.kind in FAST]
    if fast and not (x.fast_chunk >= 1 and x.fast_steps >= 1 and 0 < x.fast_lr <= 1):
        raise ValueError(f"need expert.fast_chunk >= 1, expert.fast_steps >= 1 and expert.fast_lr "
                         f"in (0, 1], got {x.fast_chunk}, {x.fast_steps}, {x.fast_lr}")  # fmt: skip
    for method in fast:
        fast_config(cfg, mcfg, method.rank)  # no exact match raises
    if not (0 < x.hw_fraction < 1 and 0 < x.hw_margin <= 1 and x.hw_temperature_margin_c > 0):
        raise ValueError("need expert.hw_fraction in (0, 1), expert.hw_margin in (0, 1] and "
                         "expert.hw_temperature_margin_c > 0")  # fmt: skip
    lora_params = jax.eval_shape(lambda: moe.init_moe(lora_config(cfg, mcfg)).params)
    for name, method in table.items():
        objective = objective_of(method, head)
        if head != "lm" and objective in ("masked", "next_token"):
            raise ValueError(
                f"{name}: objective {objective!r} needs a trained token head; the digits "
                "model trains only its class head (use entropy or consistency)"
            )
        params = lora_params  # the LoRA model holds every selection but the fast weights'
        if method.kind in FAST:
            model = model_of(cfg, mcfg, method)
            params = jax.eval_shape(lambda m=model: moe.init_moe(m).params)
        select(params, selector_of(cfg, method))  # an empty selection raises


def build_variants(cfg, rt: Runtime, head: str, names=None) -> dict[str, Variant]:
    """A :class:`Variant` per method that needs one (of ``names`` only, when given); compiled
    functions are shared by every method with the same model, selector and objective."""
    if "expert" not in cfg:
        return {}
    mcfg = rt.mcfg
    compiled: dict[Any, Any] = {
        ("infer", (0, 0)): rt.infer[mcfg.top_k],
        ("signals", (0, 0)): rt.signals,
        ("probe", (0, 0)): rt.probe,
    }
    out = {}
    for name, method in methods(cfg).items():
        if not needs_variant(method) or (names is not None and name not in names):
            continue
        model = model_of(cfg, mcfg, method)
        selector, objective = selector_of(cfg, method), objective_of(method, head)
        key = (model.lora_rank, model.fast_rank, repr(selector), objective)
        if key not in compiled:
            ttt = energy_tent(
                served_apply(model), rt.joules, top_k=mcfg.top_k,
                params=selector,
                task=objective, head=head, opt=optax.adam(cfg.ttt.lr), max_steps=cfg.ttt.steps,
                **corruptions(cfg, mcfg, head),
            )  # fmt: skip
            compiled[key] = compile_adapt(ttt)
        shape = (model.lora_rank, model.fast_rank)
        if ("infer", shape) not in compiled:  # jitted lazily: compiled on first use
            compiled["infer", shape] = compile_infer(model, head)
            compiled["signals", shape] = compile_signals(model, head)
            compiled["probe", shape] = compile_probe(model)
        if model.lora_rank and "realloc" not in compiled:
            compiled["realloc"] = jax.jit(partial(moe.lora_realloc, config=model))
        realloc = compiled.get("realloc") if model.lora_rank else None
        out[name] = Variant(
            model, method.rank, selector, objective, compiled["infer", shape], compiled[key],
            realloc, compiled["signals", shape], compiled["probe", shape], method.int8,
        )  # fmt: skip
    return out


class HardwareRanks:
    """``lora_hw``'s rank controller: after each window, ranks from its readings; before each
    adaptation, the pending ranks applied (kept components unchanged, :func:`lora_realloc`).

    ``memory() -> MemoryReading`` reads the free memory (:func:`.serving.memory_reader`: the
    simulated device's under the simulated monitor). ``active`` (layers, E) are the ranks the
    parameters hold (what the accounting charges), ``trace`` the active rank units after each
    window.
    """

    def __init__(self, variant: Variant, limits: RankLimits, memory: Callable[[], MemoryReading]):
        m = variant.mcfg
        self.variant, self.limits, self.memory = variant, limits, memory
        self.active = np.full((m.num_layers, m.num_experts), variant.rank, np.int32)
        self.pending = self.active
        self.trace: list[int] = []

    def on_window(self, record, counts) -> None:
        """Choose the next ranks from a window's power, temperature and the free memory."""
        ranks = adapter_ranks(
            record.mean_power_w, record.max_temperature_c, self.memory().free_bytes,
            usage=np.asarray(counts).sum(0), max_rank=self.variant.rank, limits=self.limits,
        )  # fmt: skip
        self.pending = np.broadcast_to(ranks, self.active.shape).astype(np.int32)
        self.trace.append(int(self.active.sum()))

    def apply(self, params: Any, key: jax.Array) -> Any:
        """The parameters at the pending ranks (unchanged when they are the active ones)."""
        if np.array_equal(self.pending, self.active):
            return params
        self.active = self.pending
        return self.variant.realloc(params, ranks=jnp.asarray(self.active), key=key)


def hardware_limits(cfg, variant: Variant, budget_w: float, fixed_w: float) -> RankLimits:
    """``lora_hw``'s limits: the power budget with a band ``expert.hw_margin`` of the dynamic
    headroom below it, the temperature limit and band, and the memory reserve; a rank unit
    (one rank of one expert in every layer) holds its factors, gradients and Adam's two moments
    (4 copies of 3·(D + F)·layers float32 numbers)."""
    x, m = cfg.expert, variant.mcfg
    unit = 4 * 3 * (m.d_model + m.d_ff) * m.num_layers * 4
    return RankLimits(
        power_budget_w=budget_w, power_margin_w=x.hw_margin * (budget_w - fixed_w),
        temperature_limit_c=x.hw_temperature_c, temperature_margin_c=x.hw_temperature_margin_c,
        memory_reserve_bytes=x.hw_memory_reserve_gb * 2**30, bytes_per_unit=float(unit),
    )  # fmt: skip


def prepare(variant: Variant, params: Any, seed: int) -> Any:
    """The trained parameters as ``variant`` serves them: inside the LoRA model with every
    expert matrix at rank ``variant.rank`` (A random, B zero: the same function), inside the
    fast-weight model (θ_O zero: the same function), or as is; then, for an int8 variant, with
    weight-only int8 experts (:func:`metattt.models.quantize.quantize_experts`)."""
    if variant.mcfg.fast_rank:
        params = moe.with_fast(params, variant.mcfg, seed)
    elif variant.rank:
        lora = moe.with_lora(params, variant.mcfg)
        params = moe.lora_realloc(lora, variant.mcfg, variant.rank, jax.random.key(seed))
    return quantize.quantize_experts(params) if variant.int8 else params


def warm_up(variants: dict[str, Variant], params: Any, stream: Any, *, batch: int,
            windows: int) -> None:  # fmt: skip
    """Compile every variant's inference, adaptation and reallocation for the stream's shapes (as
    :func:`.runtime.warm_up` does for the router TTT)."""
    x, y = jnp.asarray(stream.inputs[:batch]), jnp.asarray(stream.targets[:batch])
    for v in variants.values():
        p = prepare(v, params, 0)
        mask = jnp.ones((v.mcfg.num_experts,), bool)
        jax.block_until_ready(v.infer(p, x, y, mask))
        jax.block_until_ready(v.adapt(p, x[:windows], jnp.float32(0.0), mask, jax.random.key(0)))
        if v.realloc is not None:
            ranks = jnp.zeros((v.mcfg.num_layers, v.mcfg.num_experts), jnp.int32)
            jax.block_until_ready(v.realloc(p, ranks=ranks, key=jax.random.key(0)))


def describe(variants: dict[str, Variant], table: dict[str, Method]) -> dict[str, dict]:
    """Per variant method: what adapts, the objective, λ_energy, the LoRA rank (``fast_ttt``:
    the one matched), the fast rank (0: none) and the number of adapted parameters (a LoRA
    factor counts its active rank only: r / R_max of it)."""
    out = {}
    for name, v in variants.items():
        params = jax.eval_shape(lambda m=v.mcfg: moe.init_moe(m).params)
        picks = jax.tree.leaves(select(params, v.selector))
        sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)]
        share = [v.rank / v.mcfg.lora_rank if "/lora_" in path else 1.0
                 for path in leaf_paths(params)]  # fmt: skip
        adapted = sum(n * f for n, f, on in zip(sizes, share, picks, strict=True) if on)
        out[name] = {
            "kind": table[name].kind,
            "params": v.selector if isinstance(v.selector, str) else "+".join(v.selector),
            "objective": v.objective,
            "lam": table[name].lam,
            "rank": v.rank,
            "rank_policy": table[name].kind == "lora_hw",
            "fast_rank": v.mcfg.fast_rank,
            "adapted_params": int(round(adapted)),
        }
    return out
