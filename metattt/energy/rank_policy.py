"""Adapter ranks chosen by the hardware: power, temperature and memory headroom -> LoRA ranks.

The dynamic-rank adapters (:mod:`metattt.adapters`, per expert in
:func:`metattt.models.moe.lora_realloc`) can change rank at run time without recompiling; this
module decides the ranks from what the monitor reads, so that adaptation shrinks when the
device runs hot, near its power budget or short of memory, and grows back when it has room.

Headroom of a resource with reading x, limit X and margin m (a band below the limit):

    h(x) = clip((X - x) / m, 0, 1)

1 at or below X - m (room to spare), 0 at or above the limit. A NaN reading (a sensor the
device lacks, e.g. NVML temperature on some boards) counts as full headroom: the policy never
invents a constraint. Power and temperature give h = min(h_power, h_temperature); the rank
units it allows are floor(h · R_max · E) (E adapters, each up to R_max). Memory caps the units
separately: one unit (one rank of one expert's adapter: its factors, their gradients and the
optimizer's moments) costs ``bytes_per_unit``, and at least ``memory_reserve_bytes`` stay free:
units <= floor((free - reserve) / bytes_per_unit). The allowed units then go to the busiest
experts first (``usage``, ties to the lower index), each filled up to R_max: an adapter where
the traffic is. Rank 0 frees an expert's adapter.

Pure functions of the readings (NumPy, outside ``jit``): the caller reads the monitor and
memory (:func:`metattt.energy.memory.read_memory`), asks for ranks, and applies them with the jitted
``lora_realloc`` (ranks traced: one compilation for every allocation).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np


class RankLimits(NamedTuple):
    """Where adaptation must stop and how wide the band over which it shrinks.

    Attributes:
        power_budget_w: power at which no adapter may run; ``power_margin_w`` below it the
            full rank is allowed.
        power_margin_w: > 0.
        temperature_limit_c: temperature at which no adapter may run.
        temperature_margin_c: > 0.
        memory_reserve_bytes: free memory that must remain.
        bytes_per_unit: memory of one rank of one expert adapter (> 0).
    """

    power_budget_w: float
    power_margin_w: float
    temperature_limit_c: float = math.inf
    temperature_margin_c: float = 10.0
    memory_reserve_bytes: float = 0.0
    bytes_per_unit: float = 1.0


def headroom(value: float, limit: float, margin: float) -> float:
    """clip((limit - value) / margin, 0, 1); 1 for a NaN reading or an infinite limit."""
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if math.isnan(value) or math.isinf(limit):
        return 1.0
    return float(min(max((limit - value) / margin, 0.0), 1.0))


def rank_units(
    power_w: float, temperature_c: float, memory_free_bytes: float, *, num_experts: int,
    max_rank: int, limits: RankLimits,
) -> int:  # fmt: skip
    """Rank units allowed: min(floor(h · R_max · E), floor((free - reserve) / bytes_per_unit)),
    clipped to [0, R_max · E] (module docstring)."""
    if max_rank < 1 or num_experts < 1:
        raise ValueError(f"need max_rank >= 1 and num_experts >= 1, got {max_rank}, {num_experts}")
    if not limits.bytes_per_unit > 0:
        raise ValueError(f"limits.bytes_per_unit must be > 0, got {limits.bytes_per_unit}")
    h = min(
        headroom(power_w, limits.power_budget_w, limits.power_margin_w),
        headroom(temperature_c, limits.temperature_limit_c, limits.temperature_margin_c),
    )
    total = max_rank * num_experts
    units = math.floor(h * total + 1e-9)
    if not math.isnan(memory_free_bytes):
        spare = (memory_free_bytes - limits.memory_reserve_bytes) / limits.bytes_per_unit
        units = min(units, math.floor(max(spare, 0.0)))
    return int(min(max(units, 0), total))


def fill_ranks(units: int, usage: Any, max_rank: int) -> np.ndarray:
    """(E,) int ranks: ``units`` handed to the experts by descending ``usage`` (ties: lower
    index first), each filled up to ``max_rank`` before the next gets any."""
    usage = np.asarray(usage, np.float64)
    if usage.ndim != 1 or usage.size < 1:
        raise ValueError(f"usage must be (E,), got shape {usage.shape}")
    order = np.argsort(-usage, kind="stable")
    ranks = np.zeros(usage.shape, np.int32)
    left = int(units)
    for e in order:
        ranks[e] = min(max_rank, max(left, 0))
        left -= ranks[e]
    return ranks


def adapter_ranks(
    power_w: float, temperature_c: float, memory_free_bytes: float, *, usage: Any,
    max_rank: int, limits: RankLimits,
) -> np.ndarray:  # fmt: skip
    """(E,) int ranks in [0, max_rank] from one window's readings (module docstring).

    Args:
        power_w: the window's mean power (W).
        temperature_c: its peak temperature (°C), NaN when unknown.
        memory_free_bytes: free memory of the device the adapters live on, NaN when unknown.
        usage: (E,) tokens (or shares) each expert processed recently.
        max_rank: R_max of each adapter buffer.
        limits: the :class:`RankLimits`.

    Example:
        >>> rec = window.record
        >>> ranks = adapter_ranks(rec.mean_power_w, rec.max_temperature_c,
        ...                       read_memory().free_bytes, usage=counts.sum(0), max_rank=8,
        ...                       limits=RankLimits(power_budget_w=120, power_margin_w=20))
        >>> params = jitted_lora_realloc(params, np.broadcast_to(ranks, (layers, E)), key)
    """
    usage = np.asarray(usage)
    units = rank_units(power_w, temperature_c, memory_free_bytes, num_experts=usage.size,
                       max_rank=max_rank, limits=limits)  # fmt: skip
    return fill_ranks(units, usage, max_rank)
