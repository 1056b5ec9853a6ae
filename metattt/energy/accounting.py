"""Energy accounting of a served MoE: work, serving rate, fixed power, EDP and the Pareto front.

A device spends dynamic energy in proportion to the work it does (FLOPs and bytes moved, see
:meth:`~metattt.energy.monitor.SimulatedDevice.work_energy`) and idle power all the time. To
price serving a MoE one needs the work of everything but the experts (:func:`dense_work`), the
work of the experts a batch actually used (:func:`forward_work`), the rate at which requests
arrive (:func:`serving_rate`), the power routing cannot change (:func:`fixed_power`), the energy
of the routing decisions alone (:func:`routed_energy`), and the figures of merit that compare
methods: the energy-delay product (:func:`edp`) and the energy-vs-quality front
(:func:`pareto_front`). Every function takes plain numbers and arrays; it imports no model.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from metattt.energy.monitor import SimulatedDevice


class Work(NamedTuple):
    """FLOPs and bytes of some computation on the device."""

    flops: float
    nbytes: float

    def __add__(self, other):  # type: ignore[override]
        return Work(self.flops + other.flops, self.nbytes + other.nbytes)

    def scaled(self, factor: float) -> Work:
        """The work repeated ``factor`` times (e.g. a backward pass as 2 forwards)."""
        return Work(self.flops * factor, self.nbytes * factor)


def dense_work(
    *,
    d_model: int,
    num_layers: int,
    num_experts: int,
    vocab_size: int,
    batch: int,
    length: int,
    itemsize: int = 4,
) -> Work:
    """Work of everything but the experts in one forward pass of (B, L) tokens.

    Per token and layer: QKV and output projections 2·D·4D FLOPs, attention scores and the
    weighted values 2·2·L·D (all L keys, the causal half is not skipped), the router 2·D·E;
    then the LM head 2·D·V. Bytes: per token and layer the residual, QKV, attention output
    and router logits written and read ((2·D + 3·D + D + E)·2), the embedding and logits,
    and every dense weight read once per pass.
    """
    d, e, v, layers = d_model, num_experts, vocab_size, num_layers
    tokens = batch * length
    flops = tokens * (layers * (8 * d * d + 4 * length * d + 2 * d * e) + 2 * d * v)
    act = tokens * (layers * 2 * (6 * d + e) + 2 * d + v) * itemsize
    weights = (layers * (4 * d * d + d * e + 4 * d) + 2 * d * v + v + length * d) * itemsize
    return Work(float(flops), float(act + weights))


def forward_work(dense: Work, expert_flops: Any, expert_bytes: Any) -> Work:
    """A forward pass's work: the dense part plus the summed work of each expert.

    ``expert_flops`` / ``expert_bytes`` are the per-expert work of the assignments the pass
    made (e.g. :func:`metattt.models.moe.expert_work` of its expert counts), any shape.
    """
    return dense + Work(float(jnp.sum(expert_flops)), float(jnp.sum(expert_bytes)))


def serving_rate(
    device: SimulatedDevice,
    dense: Work,
    expert_flops_per_token: Any,
    expert_bytes_per_token: Any,
    *,
    tokens: int,
    top_k: int,
    num_layers: int,
    utilization: float,
) -> float:
    """r tokens/s at which the model keeps the device busy ``utilization`` of the time.

    A batch of ``tokens`` tokens costs ``dense`` plus, at mean-cost routing, ``tokens · top_k ·
    num_layers`` assignments to an expert of the mean per-token (E,) costs; its roofline time
    at the base clock divided by ``tokens`` is the busy time per token s, and r = u / s.
    """
    routed = tokens * top_k * num_layers
    work = dense + Work(
        routed * float(np.mean(expert_flops_per_token)),
        routed * float(np.mean(expert_bytes_per_token)),
    )
    seconds_per_token = device.roofline_seconds(work.flops, work.nbytes) / tokens
    return utilization / seconds_per_token


def fixed_power(device: SimulatedDevice, dense: Work, *, tokens: int, rate: float) -> float:
    """Power that routing cannot change: idle plus the dense work's dynamic power at ``rate``
    tokens/s (``dense`` being the work of a batch of ``tokens`` tokens)."""
    return device.idle_power_w + rate * device.work_energy(*dense) / tokens


def routed_energy(joules_per_token: Any, counts: Any, tokens: int) -> float:
    """µJ per token of the routing alone: Σ_l Σ_e counts[l, e] · J_e / tokens · 1e6.

    ``joules_per_token`` (E,) is each expert's dynamic energy per assigned token (the energy
    term's quantity, without weight reads), ``counts`` (..., E) the assignments.
    """
    counts = np.asarray(counts)
    joules = np.asarray(joules_per_token)
    return 1e6 * float(np.sum(counts * joules.reshape((1,) * (counts.ndim - 1) + (-1,)))) / tokens


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
