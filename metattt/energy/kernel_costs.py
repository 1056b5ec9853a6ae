"""Kernel cost profiles: each MoE dispatch backend timed per shape on the running device, a fitted
time (and energy) model per backend, and the backend it predicts to be cheapest for a shape.

The per-expert profiles of :mod:`metattt.energy.costs` price routing decisions; this module
prices *how* the experts run. :func:`measure_dispatch` times the forward pass of
:func:`kernels_pallas.moe_dispatch.moe_dispatch` for every candidate backend on a list of
:class:`DispatchShape` (the backends interleaved, so load that comes and goes hits all alike)
and, with a monitor that measures energy (NVML), the joules per call. Timings are stored in a
small JSON file keyed by device kind and JAX version (:func:`save_timings`,
:func:`load_timings`), so a profile measured on one machine is never applied to another.

:func:`fit_cost_model` fits, per backend, a non-negative linear model of the time (and the
energy) in features of the shape that the backends' costs scale with (:data:`FEATURES`)::

    t_b(shape) ≈ Σ_j c_b,j · φ_j(shape),   c_b,j >= 0

minimising the relative error Σ_i (t̂_i / t_i - 1)² (times span orders of magnitude).
:func:`choose_backend` picks the backend of least predicted time (or energy); a shape that was
measured uses its measurement. :func:`profile_and_choose` is the whole loop for one run: the
timings a file lacks for this device are measured (the rest read back), stored, fitted, and the
backend is chosen at the run's shape.

Candidates are device-aware (:func:`candidate_backends`): the capacity einsum (``"reference"``)
and ``"ragged"`` (``jax.lax.ragged_dot``, where this JAX has it) everywhere, the Pallas grouped
matmul (``"pallas"``) only on accelerators. On the CPU Pallas runs in interpret mode, 2-40x
slower than the jnp forms -- an interpreter, not a kernel -- so it is no fair candidate there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import selftest
from kernels_pallas.moe_dispatch import capacity, moe_dispatch, ragged_dot_available
from metattt import atomic
from metattt.energy.monitor import AbstractMonitor

logger = logging.getLogger(__name__)

KERNEL_COSTS_FORMAT = "metattt.kernel_costs"
KERNEL_COSTS_VERSION = 1
OBJECTIVES = ("seconds", "joules")
#: The shape features φ_j of the cost model; C is the capacity (T when dropless).
FEATURES = (
    "1",  # launch and fixed overhead
    "T·D",  # moving tokens: routing, gather, scatter
    "T·K·D·F",  # the useful expert FLOPs (a grouped matmul)
    "E·C·D·F",  # expert FLOPs over capacity-padded buffers (the einsum)
    "E·T·K·D·F",  # a grouped matmul expanded to dense per group (ragged_dot on the CPU)
    "T·E·C·D",  # the one-hot dispatch and combine products (the einsum)
    "T·K·E·C",  # building the (T, K, E·C) one-hot slot tensor (the einsum; memory-bound)
    "E·D·F",  # reading every expert's weights
)


class DispatchShape(NamedTuple):
    """The static shape of one dispatch: T tokens, D, F, E, K and the capacity factor."""

    tokens: int
    d_model: int
    d_ff: int
    experts: int
    top_k: int
    capacity_factor: float | None = None

    @property
    def capacity(self) -> int:
        """C, assignments per expert (T when dropless)."""
        return capacity(self.tokens, self.experts, self.top_k, self.capacity_factor)

    def key(self) -> str:
        """``"T=..,D=..,F=..,E=..,K=..,cf=.."`` (``cf=none`` when dropless)."""
        cf = "none" if self.capacity_factor is None else f"{self.capacity_factor:g}"
        t, d, f, e, k = self[:5]
        return f"T={t},D={d},F={f},E={e},K={k},cf={cf}"


def _check_shape(shape: DispatchShape) -> None:
    for name in DispatchShape._fields[:5]:
        value = getattr(shape, name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"shape.{name} must be a positive int, got {value!r}")
    if not shape.top_k <= shape.experts:
        raise ValueError(f"shape.top_k must be <= shape.experts, got {shape.top_k}")
    if shape.capacity_factor is not None and not shape.capacity_factor > 0:
        raise ValueError(f"shape.capacity_factor must be > 0 or None, got {shape.capacity_factor}")


def shape_features(shape: DispatchShape) -> np.ndarray:
    """(len(FEATURES),) float64 φ(shape), in :data:`FEATURES` order."""
    _check_shape(shape)
    t, d, f, e, k = (float(v) for v in shape[:5])
    c = float(shape.capacity)
    return np.array([1.0, t * d, t * k * d * f, e * c * d * f, e * t * k * d * f, t * e * c * d,
                     t * k * e * c, e * d * f])  # fmt: skip


def candidate_backends(platform: str | None = None) -> tuple[str, ...]:
    """The dispatch backends worth timing on ``platform`` (default: JAX's default backend).

    ``"reference"`` always; ``"ragged"`` where this JAX has ``ragged_dot``; ``"pallas"``
    only off the CPU (on the CPU it is the Pallas interpreter, see the module docstring).
    """
    platform = jax.default_backend() if platform is None else platform
    out = ["reference"]
    if ragged_dot_available():
        out.append("ragged")
    if platform != "cpu":
        out.append("pallas")
    return tuple(out)


class KernelTiming(NamedTuple):
    """One backend at one shape: median seconds per call and joules per call (NaN: none)."""

    backend: str
    shape: DispatchShape
    seconds: float
    joules: float = math.nan


def _inputs(shape: DispatchShape, seed: int) -> tuple[jax.Array, ...]:
    """Tokens, SwiGLU weight stacks scaled to O(1) activations, and router logits."""
    t, d, f, e, _ = shape[:5]
    keys = jax.random.split(jax.random.key(seed), 5)
    normal = lambda key, s, scale: scale * jax.random.normal(key, s, jnp.float32)
    return (
        normal(keys[0], (t, d), 1.0),
        normal(keys[1], (e, d, f), d**-0.5),
        normal(keys[2], (e, d, f), d**-0.5),
        normal(keys[3], (e, f, d), f**-0.5),
        normal(keys[4], (t, e), 1.0),
    )


def _dispatch_fn(shape: DispatchShape, backend: str):
    def fn(x, w_gate, w_up, w_down, logits):
        return moe_dispatch(
            x, w_gate, w_up, w_down, logits, top_k=shape.top_k,
            capacity_factor=shape.capacity_factor, backend=backend,
        ).out  # fmt: skip

    return jax.jit(fn)


def measure_dispatch(
    shapes: Sequence[DispatchShape],
    backends: Sequence[str] | None = None,
    *,
    repeats: int = 5,
    monitor: AbstractMonitor | None = None,
    seed: int = 0,
) -> list[KernelTiming]:
    """Time the forward dispatch of every backend at every shape on the running device.

    Per shape: draw inputs (seeded), compile and warm up each backend, then ``repeats`` rounds
    that call every backend once in turn; seconds is each backend's median. With ``monitor``,
    each backend then runs ``repeats`` more calls in one measured window and joules is the
    window's energy per call (NaN when the window shows none, e.g. a simulated monitor that is
    fed no work). The dispatches are not recorded as resolutions of the run
    (:func:`kernels_pallas.selftest.unrecorded`).

    Raises:
        ValueError: an invalid shape, ``repeats`` < 1, or an unknown backend.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    backends = candidate_backends() if backends is None else tuple(backends)
    for b in backends:
        if b not in ("reference", "ragged", "pallas"):
            raise ValueError(f"backends must name concrete dispatch backends, got {b!r}")
    for shape in shapes:
        _check_shape(shape)
    with selftest.unrecorded():  # timing every backend is not what a run resolved to
        return _measure(shapes, backends, repeats, monitor, seed)


def _measure(shapes, backends, repeats, monitor, seed) -> list[KernelTiming]:
    out = []
    for shape in shapes:
        args = _inputs(shape, seed)
        fns = [_dispatch_fn(shape, b) for b in backends]
        for fn in fns:
            jax.block_until_ready(fn(*args))
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(repeats):
            for slot, fn in zip(times, fns, strict=True):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                slot.append(time.perf_counter() - start)
        for b, fn, slot in zip(backends, fns, times, strict=True):
            joules = math.nan
            if monitor is not None:
                with monitor.measure() as window:
                    for _ in range(repeats):
                        jax.block_until_ready(fn(*args))
                energy = window.record.energy_j / repeats
                joules = energy if math.isfinite(energy) and energy > 0 else math.nan
            out.append(KernelTiming(b, shape, statistics.median(slot), joules))
    return out


# --- storage ----------------------------------------------------------------------------------


def device_key(device_kind: str | None = None, jax_version: str | None = None) -> str:
    """``"<device kind>|jax-<version>"`` of the running device (or the given ones)."""
    kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    return f"{kind}|jax-{jax.__version__ if jax_version is None else jax_version}"


def _read(path: str) -> dict[str, Any]:
    with open(path) as f:
        try:
            payload = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != KERNEL_COSTS_FORMAT:
        raise ValueError(f"{path}: not a kernel cost file (format != {KERNEL_COSTS_FORMAT!r})")
    if payload.get("version") != KERNEL_COSTS_VERSION:
        raise ValueError(f"{path}: version {payload.get('version')!r}, this code reads "
                         f"version {KERNEL_COSTS_VERSION}")  # fmt: skip
    return payload


def _empty() -> dict[str, Any]:
    return {"format": KERNEL_COSTS_FORMAT, "version": KERNEL_COSTS_VERSION, "devices": {}}


def _write(path: str, payload: dict[str, Any], timings: Sequence[KernelTiming], key: str) -> None:
    """Merge ``timings`` into ``payload`` under ``key``, then replace the file atomically."""
    table = payload["devices"].setdefault(key, {})
    for t in timings:
        table.setdefault(t.backend, {})[t.shape.key()] = {
            "shape": t.shape._asdict(),
            "seconds": t.seconds,
            "joules": None if math.isnan(t.joules) else t.joules,
        }
    atomic.write_json(path, payload, indent=1, sort_keys=True)


def save_timings(
    path: str | os.PathLike, timings: Sequence[KernelTiming], key: str | None = None
) -> None:
    """Merge ``timings`` into the JSON file at ``path`` under ``key`` (default
    :func:`device_key`); a (backend, shape) measured again replaces the old entry, entries of
    other devices or JAX versions are kept. The file is replaced atomically."""
    path, key = os.fspath(path), device_key() if key is None else key
    _write(path, _read(path) if os.path.isfile(path) else _empty(), timings, key)


def _entries(table: dict[str, Any]) -> list[KernelTiming]:
    """The :class:`KernelTiming` of one device's ``{backend: {shape key: entry}}`` table."""
    out = []
    for backend, entries in table.items():
        for entry in entries.values():
            joules = entry["joules"]
            shape = DispatchShape(**entry["shape"])
            _check_shape(shape)
            out.append(KernelTiming(backend, shape, float(entry["seconds"]),
                                    math.nan if joules is None else float(joules)))  # fmt: skip
    return out


def load_timings(path: str | os.PathLike, key: str | None = None) -> list[KernelTiming]:
    """The timings stored under ``key`` (default :func:`device_key`: this device and JAX).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a kernel cost file, another version, or nothing stored under ``key``
            (the message lists the keys that are).
    """
    path, key = os.fspath(path), device_key() if key is None else key
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no kernel cost file at {path!r}: measure_dispatch() then "
                                "save_timings()")  # fmt: skip
    devices = _read(path)["devices"]
    if key not in devices:
        raise ValueError(f"{path}: no timings for {key!r}; stored: {sorted(devices)}")
    return _entries(devices[key])


# --- the model --------------------------------------------------------------------------------


class KernelCostModel(NamedTuple):
    """Per objective and backend, the non-negative coefficients of :data:`FEATURES`, and the
    measurements themselves ``{(objective, backend, shape key): value}``."""

    coefficients: dict[str, dict[str, np.ndarray]]
    measured: dict[tuple[str, str, str], float]

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.coefficients.get("seconds", {}))

    def predict(self, backend: str, shape: DispatchShape, objective: str = "seconds") -> float:
        """The fitted time (or energy) of ``backend`` at ``shape``.

        Raises:
            ValueError: an objective or backend the model was not fitted for.
        """
        if objective not in self.coefficients or backend not in self.coefficients[objective]:
            fitted = sorted(self.coefficients.get(objective, {}))
            raise ValueError(f"no {objective} model for backend {backend!r}; fitted: {fitted}")
        return float(shape_features(shape) @ self.coefficients[objective][backend])


def _fit(rows: list[tuple[DispatchShape, float]]) -> np.ndarray:
    from scipy.optimize import nnls  # here: importing it costs ~0.2 s of `import metattt.energy`

    phi = np.stack([shape_features(s) for s, _ in rows])
    y = np.array([v for _, v in rows], np.float64)
    scale = phi.max(axis=0)  # column scaling keeps NNLS well conditioned
    scale[scale == 0] = 1.0
    coef, _ = nnls(phi / scale / y[:, None], np.ones_like(y), maxiter=50 * phi.shape[1])
    return coef / scale


def fit_cost_model(timings: Sequence[KernelTiming]) -> KernelCostModel:
    """Fit every backend's time (and, where every timing of a backend has one, energy).

    Raises:
        ValueError: no timings, or a backend with fewer timings than 2 (a fit needs some).
    """
    if not timings:
        raise ValueError("timings is empty")
    coefficients: dict[str, dict[str, np.ndarray]] = {}
    measured = {}
    for backend in dict.fromkeys(t.backend for t in timings):
        own = [t for t in timings if t.backend == backend]
        if len(own) < 2:
            raise ValueError(f"backend {backend!r} has {len(own)} timing; a fit needs >= 2")
        for objective in OBJECTIVES:
            values = [getattr(t, objective) for t in own]
            if not all(math.isfinite(v) and v > 0 for v in values):
                continue
            coefficients.setdefault(objective, {})[backend] = _fit(
                [(t.shape, v) for t, v in zip(own, values, strict=True)]
            )
            measured.update({(objective, backend, t.shape.key()): v
                             for t, v in zip(own, values, strict=True)})  # fmt: skip
    return KernelCostModel(coefficients, measured)


def choose_backend(
    model: KernelCostModel,
    shape: DispatchShape,
    *,
    objective: str = "seconds",
    backends: Sequence[str] | None = None,
) -> str:
    """The backend of least predicted ``objective`` at ``shape`` (its measurement if measured).

    Use it at the edge, e.g. ``config._replace(backend=choose_backend(model, shape))`` for a
    :class:`metattt.models.moe.MoEConfig`; ``backends`` restricts the candidates (default:
    every backend the model has for ``objective``).

    Raises:
        ValueError: an unknown objective, or no fitted candidate.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    fitted = model.coefficients.get(objective, {})
    names = list(fitted) if backends is None else [b for b in backends if b in fitted]
    if not names:
        raise ValueError(f"no {objective} model for any of {backends or 'the backends'}; "
                         f"fitted: {sorted(fitted)}")  # fmt: skip
    key = shape.key()

    def cost(b: str) -> float:
        return model.measured.get((objective, b, key), model.predict(b, shape, objective))

    return min(names, key=cost)


# --- one run's choice -------------------------------------------------------------------------


def neighbour_shapes(
    shape: DispatchShape, factors: Sequence[float] = (0.5, 0.25)
) -> list[DispatchShape]:
    """Shapes beside ``shape`` for the fit: its token count T scaled by each factor (at least 1
    token), duplicates and ``shape`` itself left out. Smaller, not larger: the einsum's one-hot
    slot tensor grows as T² when dropless, so a larger T would cost most of the measurement.

    Example: ``neighbour_shapes(DispatchShape(1024, 64, 256, 8, 2))`` holds T = 512 and 256.
    """
    _check_shape(shape)
    out: dict[str, DispatchShape] = {}
    for factor in factors:
        if not factor > 0:
            raise ValueError(f"factors must be > 0, got {factor!r}")
        near = shape._replace(tokens=max(1, round(shape.tokens * factor)))
        if near.key() != shape.key():
            out.setdefault(near.key(), near)
    return list(out.values())


class BackendChoice(NamedTuple):
    """What :func:`profile_and_choose` chose, and from what.

    Attributes:
        backend: the chosen backend.
        shape: the shape it was chosen at.
        objective: ``"seconds"`` or ``"joules"``.
        costs: ``{backend: objective at shape}`` of every candidate, measured (what
            :func:`choose_backend` compares at a measured shape).
        predicted: ``{backend: the fitted model's objective at shape}``.
        measured: how many (backend, shape) timings this call measured (0: all were read from
            the file).
        key: the device key the timings are stored under (:func:`device_key`).
    """

    backend: str
    shape: DispatchShape
    objective: str
    costs: dict[str, float]
    predicted: dict[str, float]
    measured: int
    key: str


def profile_and_choose(
    path: str | os.PathLike,
    shapes: Sequence[DispatchShape],
    *,
    backends: Sequence[str] | None = None,
    objective: str = "seconds",
    repeats: int = 5,
    monitor: AbstractMonitor | None = None,
    key: str | None = None,
    measure: Callable[..., list[KernelTiming]] | None = None,
) -> BackendChoice:
    """The backend of least ``objective`` at ``shapes[0]``, from timings stored at ``path``.

    Every (backend, shape) of ``backends`` (default :func:`candidate_backends`) x ``shapes``
    that the file lacks under ``key`` (default :func:`device_key`) is measured
    (``measure(shapes, backends, repeats=, monitor=)``, default :func:`measure_dispatch`: all
    backends of a shape that lacks any, interleaved) and merged into the file; what it holds is
    read back, not measured again, so a rerun of the same shapes measures nothing. A file that
    cannot be read (not JSON, another format or version, a malformed entry) is logged and
    replaced by a fresh one, as a damaged cache is recomputed. The candidates' timings under
    ``key`` (every shape stored, not only ``shapes``) are fitted (:func:`fit_cost_model`) and
    :func:`choose_backend` picks at ``shapes[0]``, where its measurement decides.

    Args:
        path: the JSON timings file (created if missing).
        shapes: the shape to choose at first, then any others to measure (e.g. another batch
            size the same model runs, and :func:`neighbour_shapes` for the fit).

    Raises:
        ValueError: no shapes, an invalid shape or backend, an unknown objective, fewer than 2
            stored timings of a candidate, or no ``objective`` model (joules need a monitor
            that measures energy).
    """
    if not shapes:
        raise ValueError("shapes is empty")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    for shape in shapes:
        _check_shape(shape)
    path, key = os.fspath(path), device_key() if key is None else key
    backends = candidate_backends() if backends is None else tuple(backends)
    measure = measure_dispatch if measure is None else measure
    payload, stored = _empty(), []
    if os.path.isfile(path):
        try:
            payload = _read(path)
            stored = _entries(payload["devices"].get(key, {}))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            logger.warning("Kernel cost file %s is unreadable (%s); measuring again.", path, err)
            payload, stored = _empty(), []
    have = {(t.backend, t.shape.key()) for t in stored}
    missing = list({s.key(): s for s in shapes
                    if any((b, s.key()) not in have for b in backends)}.values())  # fmt: skip
    new = list(measure(missing, backends, repeats=repeats, monitor=monitor)) if missing else []
    if new:
        _write(path, payload, new, key)
    fresh = {(t.backend, t.shape.key()) for t in new}
    timings = [t for t in stored if (t.backend, t.shape.key()) not in fresh] + new
    # in the file's order, so a fit from what was just measured equals one from the file
    timings = sorted((t for t in timings if t.backend in backends),
                     key=lambda t: (t.backend, t.shape.key()))  # fmt: skip
    model = fit_cost_model(timings)
    shape = shapes[0]
    chosen = choose_backend(model, shape, objective=objective, backends=backends)
    costs = {b: model.measured[(objective, b, shape.key())] for b in backends
             if (objective, b, shape.key()) in model.measured}  # fmt: skip
    predicted = {b: model.predict(b, shape, objective) for b in backends
                 if b in model.coefficients.get(objective, {})}  # fmt: skip
    return BackendChoice(chosen, shape, objective, costs, predicted, len(new), key)
