"""Per-expert cost profiles (FLOPs, bytes, time and energy per token) and expected routing energy.

A :class:`CostProfile` holds one :class:`ExpertCost` per expert. It is built either

* from the FLOPs/bytes proxy (:func:`proxy_costs`): time is the roofline time and energy the
  dynamic energy of a :class:`~metattt.energy.monitor.SimulatedDevice`; or
* by measuring each expert block (:func:`measure_costs`): wall time per token, and energy per
  token from a monitor's window when one is given (NVML on a GPU; a simulated monitor is fed
  the measured time), else the proxy energy -- ``CostProfile.energy_source`` records which.

Profiles are saved to and loaded from versioned JSON (:func:`save_costs`, :func:`load_costs`),
and :func:`expected_energy` prices a batch of routing decisions with them: the energy-aware
TTT loss term ``λ_energy · E``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metattt import atomic
from metattt.energy.monitor import AbstractMonitor, SimulatedDevice

COST_PROFILE_FORMAT = "metattt.expert_costs"
COST_PROFILE_VERSION = 1
COST_SOURCES = ("measured", "proxy")
COST_FIELDS = ("flops_per_token", "bytes_per_token", "seconds_per_token", "joules_per_token")


class ExpertCost(NamedTuple):
    """What one token costs in one expert.

    Attributes:
        flops_per_token: FLOP proxy.
        bytes_per_token: bytes moved (proxy).
        seconds_per_token: time per token (roofline for the proxy; measured wall time, at the
            measuring batch size, otherwise).
        joules_per_token: energy per token (see ``CostProfile.energy_source``).
        source: ``"proxy"`` (from :func:`proxy_costs`) or ``"measured"`` (timed by
            :func:`measure_costs`).
    """

    flops_per_token: float
    bytes_per_token: float
    seconds_per_token: float
    joules_per_token: float
    source: str


class CostProfile(NamedTuple):
    """One :class:`ExpertCost` per expert, and where the energies come from.

    Attributes:
        experts: the E costs, expert 0 first.
        energy_source: ``"proxy"`` or ``"monitor:<source>"`` (``"monitor:nvml"``, ...).
        device: free-form description of the device measured or modelled.
    """

    experts: tuple[ExpertCost, ...]
    energy_source: str
    device: str = ""

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def values(self, field: str = "joules_per_token") -> np.ndarray:
        """(E,) float64 array of one cost field."""
        if field not in COST_FIELDS:
            raise ValueError(f"field must be one of {COST_FIELDS}, got {field!r}")
        return np.array([getattr(c, field) for c in self.experts], np.float64)


def _per_expert(name: str, value: float | Sequence[float], num_experts: int) -> list[float]:
    arr = np.asarray(value, np.float64)
    values = np.full((num_experts,), float(arr)) if arr.ndim == 0 else arr
    if values.shape != (num_experts,):
        raise ValueError(f"{name} must be a scalar or have shape (E,) = ({num_experts},)")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {values}")
    return [float(v) for v in values]


def proxy_costs(
    num_experts: int,
    flops_per_token: float | Sequence[float],
    bytes_per_token: float | Sequence[float],
    *,
    device: SimulatedDevice | None = None,
) -> CostProfile:
    """Costs from the FLOPs/bytes proxy on a modelled device (the fallback profile).

    seconds = max(flops / peak, bytes / bandwidth); joules = flops·J_flop + bytes·J_byte
    (dynamic energy only: idle power does not depend on the routing).

    Args:
        num_experts: E.
        flops_per_token, bytes_per_token: one value for all experts or one per expert, e.g.
            from :func:`metattt.models.moe.expert_flops_per_token`.
        device: the device constants (default :class:`SimulatedDevice`).
    """
    dev = SimulatedDevice() if device is None else device
    flops = _per_expert("flops_per_token", flops_per_token, num_experts)
    nbytes = _per_expert("bytes_per_token", bytes_per_token, num_experts)
    experts = tuple(
        ExpertCost(f, b, dev.roofline_seconds(f, b), dev.work_energy(f, b), "proxy")
        for f, b in zip(flops, nbytes, strict=True)
    )
    return CostProfile(experts, "proxy", f"proxy:{dev!r}")


def measure_costs(
    expert_fn: Callable[[int, jax.Array], jax.Array],
    num_experts: int,
    x: jax.Array,
    *,
    flops_per_token: float | Sequence[float],
    bytes_per_token: float | Sequence[float],
    monitor: AbstractMonitor | None = None,
    repeats: int = 5,
    warmup: int = 1,
    device: SimulatedDevice | None = None,
    description: str = "",
) -> CostProfile:
    """Time each expert block on the tokens ``x`` (and measure its energy with ``monitor``).

    ``expert_fn(e, x)`` runs expert e on (N, D) tokens; each expert is jitted once, warmed up
    ``warmup`` times, then run ``repeats`` times. seconds_per_token is the median run time / N.
    With a monitor the ``repeats`` runs are one measured window and joules_per_token is its
    energy / (repeats·N) -- total device energy, idle share included. A monitor with
    ``record_work`` (the simulated one) is fed each run's FLOPs, bytes and measured time.
    Without a monitor, or when the window shows no energy, joules come from the proxy.

    Shapes: x (N, D).

    Raises:
        ValueError: bad ``repeats``/``warmup``, or a cost shape that is not scalar or (E,).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if jnp.ndim(x) != 2:
        raise ValueError(f"x must have shape (N, D), got {jnp.shape(x)}")
    proxy = proxy_costs(num_experts, flops_per_token, bytes_per_token, device=device)
    n = int(jnp.shape(x)[0])
    feed = getattr(monitor, "record_work", None)
    seconds, energies = [], []
    for e, base in enumerate(proxy.experts):
        fn = jax.jit(functools.partial(expert_fn, e))
        for _ in range(warmup):
            jax.block_until_ready(fn(x))
        times: list[float] = []
        with monitor.measure() if monitor is not None else contextlib.nullcontext() as window:
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(x))
                times.append(time.perf_counter() - start)
                if feed is not None:
                    feed(base.flops_per_token * n, base.bytes_per_token * n, times[-1])
        seconds.append(statistics.median(times) / n)
        energies.append(window.record.energy_j / (repeats * n) if window is not None else math.nan)
    # Measured energies are used only when every expert got one, so a profile never mixes.
    measured = monitor is not None and all(math.isfinite(j) and j > 0 for j in energies)
    experts = tuple(
        ExpertCost(
            base.flops_per_token,
            base.bytes_per_token,
            sec,
            joules if measured else base.joules_per_token,
            "measured",
        )
        for base, sec, joules in zip(proxy.experts, seconds, energies, strict=True)
    )
    energy_source = f"monitor:{monitor.source}" if measured else "proxy"
    return CostProfile(experts, energy_source, description or jax.devices()[0].device_kind)


# --- JSON -------------------------------------------------------------------------------------


def save_costs(profile: CostProfile, path: str | os.PathLike) -> None:
    """Write ``profile`` as versioned JSON, atomically (parent directories are created)."""
    payload = {
        "format": COST_PROFILE_FORMAT,
        "version": COST_PROFILE_VERSION,
        "num_experts": profile.num_experts,
        "energy_source": profile.energy_source,
        "device": profile.device,
        "experts": [{"expert": e, **c._asdict()} for e, c in enumerate(profile.experts)],
    }
    atomic.write_json(path, payload, indent=2)


def _parse_expert(index: int, entry: Any, path: str) -> ExpertCost:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: experts[{index}] must be an object")
    if entry.get("expert") != index:
        raise ValueError(f"{path}: experts[{index}] has expert={entry.get('expert')!r}")
    values = {}
    for field in COST_FIELDS:
        value = entry.get(field)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path}: experts[{index}].{field} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{path}: experts[{index}].{field} must be finite and >= 0")
        values[field] = float(value)
    if entry.get("source") not in COST_SOURCES:
        raise ValueError(
            f"{path}: experts[{index}].source must be one of {COST_SOURCES}, "
            f"got {entry.get('source')!r}"
        )
    return ExpertCost(**values, source=entry["source"])


def load_costs(path: str | os.PathLike, num_experts: int | None = None) -> CostProfile:
    """Read a profile written by :func:`save_costs`, checking it against ``num_experts``.

    Raises:
        FileNotFoundError: no file at ``path`` (the message says how to make one).
        ValueError: not a cost profile, another version, malformed entries, or a number of
            experts other than ``num_experts``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no expert cost profile at {path!r}: build one with measure_costs() or "
            "proxy_costs() and save it with save_costs()"
        )
    try:
        with open(path) as f:
            payload = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != COST_PROFILE_FORMAT:
        raise ValueError(f"{path}: not an expert cost profile (format != {COST_PROFILE_FORMAT!r})")
    if payload.get("version") != COST_PROFILE_VERSION:
        raise ValueError(
            f"{path}: cost profile version {payload.get('version')!r}, this code reads "
            f"version {COST_PROFILE_VERSION}"
        )
    entries = payload.get("experts")
    if not isinstance(entries, list) or payload.get("num_experts") != len(entries):
        raise ValueError(f"{path}: num_experts does not match the number of expert entries")
    if num_experts is not None and len(entries) != num_experts:
        raise ValueError(
            f"{path}: the profile has {len(entries)} experts but the model has "
            f"num_experts={num_experts}"
        )
    experts = tuple(_parse_expert(i, entry, path) for i, entry in enumerate(entries))
    return CostProfile(experts, str(payload.get("energy_source", "")), str(payload.get("device")))


# --- expected energy of routing decisions -----------------------------------------------------


def _cost_vector(costs: Any, field: str, num_experts: int) -> jax.Array:
    if isinstance(costs, CostProfile):
        values = costs.values(field)
    elif isinstance(costs, Sequence) and costs and isinstance(costs[0], ExpertCost):
        values = np.array([getattr(c, field) for c in costs], np.float64)
    else:
        values = costs
    values = jnp.asarray(values, jnp.float32)
    if values.shape != (num_experts,):
        raise ValueError(
            f"costs must give one value per expert, E = {num_experts}, got shape {values.shape}"
        )
    return values


def expected_energy(
    router_probs: jax.Array,
    costs: CostProfile | Sequence[ExpertCost] | jax.Array,
    top_k: int,
    *,
    field: str = "joules_per_token",
) -> jax.Array:
    """Energy of the routing decisions: Σ_t Σ_{e ∈ top-k(p_t), p_t,e > 0} c_e, differentiable.

    The value is the exact energy of sending every token to its top-k experts at their
    per-token costs c_e (an expert with probability 0, i.e. pruned, takes no token). The
    top-k choice has no gradient, so the gradient is that of the smooth surrogate
    k · Σ_t Σ_e p_t,e · c_e (the expected cost when each of the k picks is drawn from p_t):
    a straight-through estimator, value = hard + (soft - stop_gradient(soft)). It moves
    probability towards cheaper experts.

    Shapes: router_probs (..., E) (e.g. (T, E) or (layers, B, L, E)) -> scalar float32.

    Args:
        router_probs: router softmax probabilities.
        costs: a :class:`CostProfile`, a sequence of :class:`ExpertCost`, or an (E,) array.
        top_k: K.
        field: which cost to sum (``"seconds_per_token"`` gives the expected compute time).

    Raises:
        ValueError: costs of the wrong length or an out-of-range ``top_k``.
    """
    num_experts = jnp.shape(router_probs)[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, E={num_experts}], got {top_k!r}")
    c = _cost_vector(costs, field, num_experts)
    probs = router_probs.astype(jnp.float32)
    top_p, top_i = jax.lax.top_k(jax.lax.stop_gradient(probs), top_k)
    hard = jnp.sum(jnp.where(top_p > 0, c[top_i], 0.0))
    soft = top_k * jnp.sum(probs * c)
    return hard + (soft - jax.lax.stop_gradient(soft))
