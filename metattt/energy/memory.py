"""Memory pressure: read it, price each serving level's memory, and step down before running out.

A MoE server shares its accelerator (or host) with other tenants, whose memory use it does not
control. When the headroom shrinks, it should degrade gracefully -- serve with a smaller
footprint -- rather than fail an allocation. The pieces:

* **Readings** (:class:`MemoryReading`): :func:`read_device_memory` (JAX's
  ``Device.memory_stats()``: bytes in use and the allocator's limit, on GPUs and TPUs),
  :func:`read_host_memory` (``/proc/meminfo``: total minus available, for the CPU), and
  :func:`read_memory` (the device's where it reports one, else the host's).
  :class:`SimulatedMemory` replays a trace of other tenants' use plus what the server holds, for
  tests and for the CPU experiments.
* **Levels** (:class:`ServingLevel`): a capacity factor, a top-k and a number of batch chunks
  (the batch is served ``chunks`` slices at a time). :func:`serving_ladder` orders them from
  full service to the most degraded; :func:`peak_bytes` prices one by XLA's own memory
  analysis of the compiled forward pass (arguments + outputs + temporaries - aliased), so the
  price is the program's, not a formula's. Pruning experts is not a rung: with static shapes a
  masked expert's weights and dispatch buffers stay allocated, so it frees no memory (it is an
  *energy* lever, :func:`metattt.energy.budget.prune_experts`).
* **Policy** (:func:`memory_policy`): given each level's bytes, serve at the least degraded
  level whose bytes fit the headroom left by the others (limit - (used - what we hold)) with a
  safety ``margin``; step down at once when the current level stops fitting, step back up (to
  the nearest better level that fits, one rung at a time) only after ``patience`` consecutive
  readings in which a better level fits (no oscillation on a noisy trace). When no level
  fits, the most degraded one is served and the decision says so.

Everything but :func:`peak_bytes` is host-side Python over readings (a monitor is a side
effect); the policy's state is a small NamedTuple, so a serving loop checkpoints it with the
rest.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = [
    "MemoryDecision",
    "MemoryPolicy",
    "MemoryReading",
    "ServingLevel",
    "SimulatedMemory",
    "memory_policy",
    "peak_bytes",
    "read_device_memory",
    "read_host_memory",
    "read_memory",
    "level_config",
    "serve_chunked",
    "serving_ladder",
]


class MemoryReading(NamedTuple):
    """One reading: bytes in use (by everyone), the limit, and where it came from."""

    used_bytes: int
    limit_bytes: int
    source: str

    @property
    def free_bytes(self) -> int:
        return self.limit_bytes - self.used_bytes


def read_device_memory(device: jax.Device | None = None) -> MemoryReading | None:
    """The allocator's bytes in use and limit on ``device`` (default: the first), or None where
    the backend reports no memory statistics (JAX's CPU backend)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_in_use" not in stats or "bytes_limit" not in stats:
        return None
    return MemoryReading(int(stats["bytes_in_use"]), int(stats["bytes_limit"]), device.platform)


def read_host_memory(path: str | os.PathLike[str] = "/proc/meminfo") -> MemoryReading:
    """Host memory from a Linux ``meminfo`` file: used = MemTotal - MemAvailable.

    Raises:
      ValueError: the file lacks MemTotal or MemAvailable, or a value is not a number of kB
        (one line naming the file).
      FileNotFoundError: no such file (not Linux): one line naming it.
    """
    values: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no meminfo file (host memory is read on Linux)") from None
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            number, _, unit = rest.strip().partition(" ")
            if not number.isdigit() or unit.strip() != "kB":
                raise ValueError(f"{path}: {key} is {rest.strip()!r}, expected '<int> kB'")
            values[key] = 1024 * int(number)
    missing = [k for k in ("MemTotal", "MemAvailable") if k not in values]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} line")
    total = values["MemTotal"]
    return MemoryReading(total - values["MemAvailable"], total, "host")


def read_memory(device: jax.Device | None = None) -> MemoryReading:
    """The device's reading where it reports one, otherwise the host's."""
    return read_device_memory(device) or read_host_memory()


class SimulatedMemory:
    """A device of ``limit_bytes`` shared with other tenants whose use follows ``trace``.

    Each :meth:`read` returns the next trace entry plus what the server holds (set with
    :meth:`hold`); after the trace ends its last value stays.
    """

    def __init__(self, limit_bytes: int, trace: Sequence[int]):
        trace = [int(t) for t in trace]
        if not limit_bytes > 0 or not trace or min(trace) < 0:
            raise ValueError("need limit_bytes > 0 and a non-empty trace of bytes >= 0")
        self.limit_bytes = int(limit_bytes)
        self._trace = trace
        self._index = 0
        self.held_bytes = 0

    def hold(self, nbytes: int) -> None:
        """What the server now has allocated."""
        self.held_bytes = int(nbytes)

    def read(self) -> MemoryReading:
        others = self._trace[min(self._index, len(self._trace) - 1)]
        self._index += 1
        return MemoryReading(others + self.held_bytes, self.limit_bytes, "simulated")


class ServingLevel(NamedTuple):
    """One way to serve: capacity factor (None: dropless), top-k, and batch chunks."""

    capacity_factor: float | None
    top_k: int
    chunks: int


def serving_ladder(
    top_k: int,
    *,
    capacity_factors: Sequence[float | None] = (None,),
    chunks: Sequence[int] = (1,),
    min_top_k: int = 1,
) -> list[ServingLevel]:
    """Levels from full service to the most degraded: the gentlest measure changes first.

    Order: batch chunks (same outputs, more sequential calls), then the capacity factor (drops
    overflow tokens), then top-k (a different model's routing). ``capacity_factors`` are given
    from the most to the least generous, ``chunks`` increasing.

    Raises:
      ValueError: ``min_top_k`` not in [1, top_k], or chunks not positive and increasing.
    """
    if not 1 <= min_top_k <= top_k:
        raise ValueError(f"min_top_k must be in [1, top_k={top_k}], got {min_top_k}")
    if not chunks or any(c < 1 for c in chunks) or list(chunks) != sorted(set(chunks)):
        raise ValueError(f"chunks must be positive and increasing, got {tuple(chunks)}")
    ks = range(top_k, min_top_k - 1, -1)
    return [ServingLevel(cf, k, c) for k, cf, c in itertools.product(ks, capacity_factors, chunks)]


def peak_bytes(fn: Callable[..., Any], *args: Any) -> int:
    """XLA's estimate of the peak memory of ``jax.jit(fn)(*args)``: its arguments, outputs and
    temporaries, less the outputs aliased to arguments (from the compiled program's
    ``memory_analysis``; compiles, never runs)."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    if stats is None:
        raise RuntimeError("this backend's compiler gives no memory analysis")
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


class MemoryDecision(NamedTuple):
    """The policy's state after a reading, which is also its decision.

    Attributes:
      level: index into the ladder of the level to serve now.
      calm: consecutive readings in which the next better level fitted (for stepping up).
      fits: whether the served level fits the headroom (False: even the last level does not).
    """

    level: int
    calm: int
    fits: bool


class MemoryPolicy(NamedTuple):
    """``init() -> MemoryDecision``; ``update(decision, reading) -> MemoryDecision``."""

    init: Callable[[], MemoryDecision]
    update: Callable[[MemoryDecision, MemoryReading], MemoryDecision]


def memory_policy(
    level_bytes: Sequence[int], *, margin: float = 0.1, patience: int = 3
) -> MemoryPolicy:
    """Choose a serving level from memory readings (see the module docstring).

    Args:
      level_bytes: the bytes each level of the ladder needs (e.g. :func:`peak_bytes`), full
        service first.
      margin: keep this share of the headroom free (allocator fragmentation, noise).
      patience: readings the better level must fit in a row before stepping up to it.

    The headroom for the server is ``limit - (used - level_bytes[current])``: a reading's
    ``used`` includes what the server holds at its current level.

    Raises:
      ValueError: empty ``level_bytes``, ``margin`` outside [0, 1), ``patience`` < 1.
    """
    need = [int(b) for b in level_bytes]
    if not need:
        raise ValueError("level_bytes must name at least one level")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be a positive int, got {patience!r}")
    last = len(need) - 1

    def init() -> MemoryDecision:
        return MemoryDecision(0, 0, True)

    def update(state: MemoryDecision, reading: MemoryReading) -> MemoryDecision:
        others = reading.used_bytes - need[state.level]
        room = (1 - margin) * (reading.limit_bytes - others)
        fitting = [i for i, b in enumerate(need) if b <= room]
        best = fitting[0] if fitting else last
        if best > state.level or not fitting:  # step down (or stay at the bottom) at once
            return MemoryDecision(best, 0, bool(fitting))
        if best == state.level:
            return MemoryDecision(state.level, 0, True)
        # A better level fits: after `patience` such readings, step up to the nearest better
        # level that fits (the ladder's bytes need not be monotone across its measures).
        calm = state.calm + 1
        if calm >= patience:
            return MemoryDecision(max(i for i in fitting if i < state.level), 0, True)
        return MemoryDecision(state.level, calm, True)

    return MemoryPolicy(init, update)


def level_config(config: Any, level: ServingLevel) -> Any:
    """A :class:`metattt.models.moe.MoEConfig` serving at ``level`` (same parameter shapes)."""
    return config._replace(capacity_factor=level.capacity_factor, top_k=level.top_k)


def serve_chunked(fn: Callable[..., Any], params: Any, tokens: Any, chunks: int) -> Any:
    """``fn(params, tokens)`` on ``chunks`` equal slices of the batch, outputs concatenated
    along the batch axis (every output leaf must have it first; the same outputs where rows are
    independent, with one chunk's activations alive at a time).

    Raises:
      ValueError: the batch does not split into ``chunks`` equal slices.
    """
    tokens = np.asarray(tokens)
    if chunks < 1 or tokens.shape[0] % chunks:
        raise ValueError(f"the batch of {tokens.shape[0]} does not split into {chunks} chunks")
    outs = [fn(params, part) for part in np.split(tokens, chunks)]
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *outs)
