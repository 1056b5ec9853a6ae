"""Memory pressure (issue 15 item 6) as a method: ``memory`` serves the trained model while other
tenants take a changing share of a simulated device's memory.

The serving levels (:func:`metattt.energy.serving_ladder`: batch chunks ``memory.chunks``, then
capacity factors ``memory.capacity_factors``, then top-k down to ``memory.min_top_k``) are
priced by XLA's peak bytes of the compiled forward pass at each level's chunk size
(:func:`metattt.energy.peak_bytes`). A capacity factor c drops the assignments past
C = ceil(c·T·K/E) per expert among the T tokens of a served slice (lowest gates first): the
classifier's levels only -- it predicts once per image from all its tokens, while for the LM
which tokens are dropped would depend on later tokens (not causal), so the LM stays dropless.
The simulated device holds ``memory.limit_x`` times the full-service level's bytes; the other
tenants use the share ``memory.pressure[i]`` of it during segment i of the stream (equal
segments). After each batch
the device is read (:class:`metattt.energy.SimulatedMemory`: the tenants plus what the served
level holds) and :func:`metattt.energy.memory_policy` picks the level of the next batch: down
at once, up after ``memory.patience`` calm readings.

A chunked batch runs the compiled inference on each slice (the same predictions, one slice's
activations alive at a time) and is priced per slice: each used expert's weights are read once
per slice. The cell records the level of each batch, the batches whose served level did not fit
the memory the tenants left (the reading comes after the batch, so a sudden rise is met one
batch late), and the batches in which full service would not have fit.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.energy_moe.runtime import Runtime, compile_infer
from metattt.energy import SimulatedMemory, memory_policy, peak_bytes, serving_ladder
from metattt.energy.memory import level_config


def tenant_trace(cfg, steps: int, limit: int) -> list[int]:
    """Bytes the other tenants use during each of the ``steps`` batches."""
    shares = np.asarray(cfg.memory.pressure, np.float64)
    segment = np.minimum(np.arange(steps) * len(shares) // steps, len(shares) - 1)
    return [round(limit * s) for s in shares[segment]]


class MemoryPressure:
    """The ``memory`` method's serving state: the ladder, its bytes, the simulated device and the
    policy's decision; ``infer``, ``work`` and ``on_window`` plug into
    :func:`metattt.energy.serving.serve_stream`."""

    def __init__(self, cfg, rt: Runtime, params: Any, x: np.ndarray, y: np.ndarray, work):
        """``x``, ``y``: one full stream batch (B, ...); ``work(counts, rows)`` prices one
        forward pass of ``rows`` rows."""
        m = cfg.memory
        self.rt, self.work_of = rt, work
        self.ladder = serving_ladder(rt.mcfg.top_k, capacity_factors=capacity_factors(cfg),
                                     chunks=tuple(m.chunks), min_top_k=m.min_top_k)  # fmt: skip
        mask = jnp.ones((rt.mcfg.num_experts,), bool)
        self.need, self.fns, compiled = [], [], {}
        for level in self.ladder:  # price, and compile, every level before serving
            rows = len(x) // level.chunks
            fn = level_infer(rt, level, compiled)
            self.fns.append(fn)
            self.need.append(peak_bytes(fn, params, x[:rows], y[:rows], mask))
            jax.block_until_ready(fn(params, x[:rows], y[:rows], mask))
        steps = cfg.data.stream_batches
        self.limit = round(m.limit_x * self.need[0])
        self.others = tenant_trace(cfg, steps, self.limit)
        self.device = SimulatedMemory(self.limit, self.others)
        self.policy = memory_policy(self.need, margin=m.margin, patience=int(m.patience))
        self.decision = self.policy.init()
        self.levels: list[int] = []
        self._chunk_counts: list[np.ndarray] = []

    def infer(self, p, x, y, k, mask):
        """The batch at the current level: ``chunks`` slices, scores averaged (equal slices),
        counts summed."""
        level, fn = self.ladder[self.decision.level], self.fns[self.decision.level]
        outs = [fn(p, xs, ys, jnp.asarray(mask)) for xs, ys in
                zip(np.split(x, level.chunks), np.split(y, level.chunks), strict=True)]  # fmt: skip
        self._chunk_counts = [np.asarray(c) for _, c in outs]
        self.levels.append(self.decision.level)
        return jnp.mean(jnp.stack([s for s, _ in outs])), sum(self._chunk_counts)

    def work(self, counts, rows: int):
        """The last batch's work, slice by slice (``counts`` is their sum)."""
        del counts
        parts = [self.work_of(c, rows // len(self._chunk_counts)) for c in self._chunk_counts]
        return functools.reduce(operator.add, parts)

    def on_window(self, record, counts) -> None:
        """Read the device (the tenants plus the served level's bytes); decide the next level."""
        del record, counts
        self.device.hold(self.need[self.decision.level])
        self.decision = self.policy.update(self.decision, self.device.read())

    def summary(self) -> dict[str, Any]:
        """What the cell records (see the module docstring)."""
        room = [self.limit - o for o in self.others]
        served = [self.need[lv] for lv in self.levels]
        return {
            "memory_levels": [list(lv) for lv in self.ladder],
            "memory_level_bytes": self.need,
            "memory_limit_bytes": self.limit,
            "memory_level_trace": self.levels,
            "memory_over": int(sum(s > r for s, r in zip(served, room, strict=True))),
            "memory_over_full": int(sum(self.need[0] > r for r in room)),
            "memory_degraded_share": float(np.mean(np.asarray(self.levels) > 0)),
            "memory_level_shares": (
                np.bincount(self.levels, minlength=len(self.ladder)) / max(len(self.levels), 1)
            ).tolist(),
        }


def capacity_factors(cfg) -> tuple[float | None, ...]:
    """``memory.capacity_factors`` (absent: ``(None,)``, dropless only)."""
    return tuple(cfg.memory.get("capacity_factors", (None,)))


def level_infer(rt: Runtime, level, compiled: dict) -> Any:
    """The jitted inference of a ladder level: ``rt.infer[top_k]`` when dropless, else the
    model at the level's capacity factor (compiled once per (capacity factor, top-k) into
    ``compiled``)."""
    if level.capacity_factor is None:
        return rt.infer[level.top_k]
    key = (level.capacity_factor, level.top_k)
    if key not in compiled:
        head = "class" if rt.mcfg.num_classes else "lm"
        compiled[key] = compile_infer(level_config(rt.mcfg, level), head)
    return compiled[key]


def validate(cfg, top_k: int, head: str = "lm") -> None:
    """Raise ValueError for a ``memory`` section that would fail later (absent or off:
    nothing)."""
    if "memory" not in cfg or not cfg.memory.enabled:
        return
    m = cfg.memory
    cfs = capacity_factors(cfg)
    given = [c for c in cfs if c is not None]
    valid = all(isinstance(c, int | float) and c > 0 for c in given)
    if not cfs or not valid or given != sorted(set(given), reverse=True) or None in cfs[1:]:
        raise ValueError(f"memory.capacity_factors must be None (dropless) or > 0, from the "
                         f"most generous (None first, then decreasing), got {cfs}")  # fmt: skip
    if given and head == "lm":
        raise ValueError(f"memory.capacity_factors must be (None,) for the LM, got {cfs}: "
                         "capacity dropping is not causal (which tokens are dropped depends on "
                         "later tokens)")  # fmt: skip
    serving_ladder(top_k, chunks=tuple(m.chunks), min_top_k=m.min_top_k)  # raises
    if any(cfg.data.batch % c for c in m.chunks):
        raise ValueError(f"memory.chunks must divide data.batch={cfg.data.batch}, got "
                         f"{tuple(m.chunks)}")  # fmt: skip
    if not m.limit_x > 0 or not m.pressure or not all(0 <= p < 1 for p in m.pressure):
        raise ValueError(f"need memory.limit_x > 0 and memory.pressure shares in [0, 1), got "
                         f"{m.limit_x}, {tuple(m.pressure)}")  # fmt: skip
    memory_policy([1], margin=m.margin, patience=int(m.patience))  # raises
