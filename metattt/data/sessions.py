"""Multi-session neural population recordings: a generator, an on-disk loader, padding, windows.

Generator (POCO-style synthetic data). One *system* -- a multi-region chaotic rate RNN -- is
shared by every session; each session observes it through its own neurons:

1. Latent dynamics. U = R * M rate units in R regions of M units,
   ``x' = -x + J tanh(x) + sigma * xi(t)``, integrated with Euler steps of ``dt`` (time in units
   of the RNN time constant), one recorded sample every ``substeps`` steps. Within a region
   J_ij ~ N(0, g^2 / M) (chaotic for g > 1, Sompolinsky et al., 1988); between regions J is
   sparse (density p) with entries N(0, (c g)^2 / (p M)). A finite network of that law
   sometimes settles on a stable fixed point instead; the system is therefore redrawn (from the
   next of its seeded streams) until a noise-free probe run keeps a mean temporal std of
   tanh(x) of at least ``min_activity`` (0 turns the probe off, e.g. for a stable g < 1).
   A session may jitter J by ``dynamics_jitter`` times an independent draw of the same law
   (0: identical dynamics). Each session starts from its own random state and is recorded
   after a burn-in.
2. Neurons. A session has N_s neurons (uniform in [min_neurons, max_neurons]) and observes a
   random subset (``observed_fraction``) of the latent units; each neuron reads ``fan_in`` of
   those with weights N(0, 1) * loading_scale / sqrt(fan_in). Drive z = L tanh(x); rate
   softplus(z).
3. Calcium. An exponential kernel with time constant tau (recorded samples),
   ``c_t = a c_{t-1} + (1 - a) r_t``, a = exp(-1 / tau) (tau = 0: no smoothing).
4. Observation. ``y = gain * c + offset + noise_std * eps``, gain = exp(gain_log_std * N(0,1))
   and offset ~ N(0, offset_std^2) per neuron.

Drift. With ``drift`` = m > 0 each neuron's loading row rotates, in the plane of its initial row
l_n and a random row l_n^perp orthogonal to it with the same norm, by an angle that grows
linearly from 0 to theta_T = 2 arcsin(m / 2) over the recording:
``L(t) = cos(theta_t) L0 + sin(theta_t) Lperp``. Row norms stay fixed and the relative
Frobenius change ``||L(t) - L0|| / ||L0|| = 2 sin(theta_t / 2)`` reaches exactly m at the last
sample; m = 0 gives a stationary session (L(t) = L0).

Randomness. Every component of session s draws from its own stream seeded by
``(seed, session_id, component)`` and the system from ``(seed, 2**31 - 1, draw)``: the same
``(seed, session_id)`` gives the same session however many sessions are generated, and sessions
that differ only in ``drift`` share latents, neurons, gains, offsets and noise (common random
numbers), so a drift comparison isolates the drift.

Shapes: N neurons, T recorded time steps, U latent units, S sessions, C context steps,
P forecast horizon, W windows. Recordings are (N, T) float32 (neurons x time).

On disk, a folder holds one ``<name>.npy`` array per session (N, T) and an optional
``<name>.json`` metadata file beside it (:func:`save_session`, :func:`load_sessions`).

Batching: :func:`pad_sessions` pads to a common neuron count with a mask,
:func:`assign_unit_ids` gives each neuron a global id (its row in the model's unit-embedding
table), and :func:`session_windows` / :func:`session_task` / :func:`stack_session_tasks` cut
(context C, horizon P) windows with the same leak-free rule as :mod:`metattt.data.windows`.
:mod:`metattt.data.session_tasks` does all of it in one call (``make_recordings``) and samples
meta-training batches of tasks.

Example:
    >>> sessions = generate_sessions(4, seed=0, num_steps=2000, drift=0.1)
    >>> padded = pad_sessions(sessions)                   # data (4, N_max, 2000), mask (4, N_max)
    >>> ids = assign_unit_ids([s.meta["num_neurons"] for s in sessions], padded.mask.shape[1])
    >>> tasks = stack_session_tasks(padded.data, padded.mask, ids, np.arange(4),
    ...                             context=16, horizon=4)
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from metattt.data.windows import sliding_windows
from metattt.meta import Task

__all__ = [
    "PaddedSessions",
    "Session",
    "SessionConfig",
    "SessionTruth",
    "WindowBatch",
    "assign_unit_ids",
    "generate_sessions",
    "load_sessions",
    "pad_sessions",
    "save_session",
    "session_task",
    "session_windows",
    "stack_session_tasks",
]

# Stream labels of the per-session random components (fixed: changing them changes the data).
_LATENT, _NEURONS, _GAINS, _DRIFT, _NOISE, _JITTER = range(6)
_SYSTEM = 2**31 - 1  # the system's stream: (seed, _SYSTEM) cannot collide with (seed, session_id)


@dataclasses.dataclass(frozen=True)
class SessionConfig:
    """Everything that defines the generator (see the module docstring for the model).

    Attributes:
        num_steps: T, recorded samples per session.
        min_neurons, max_neurons: range of N_s (inclusive), drawn uniformly per session.
        num_regions: R, regions of the latent RNN.
        units_per_region: M, rate units per region.
        gain: g, the recurrent gain (> 1 is chaotic).
        inter_density: p, fraction of nonzero inter-region couplings.
        inter_strength: c, inter-region coupling scale relative to g.
        dt: Euler step in units of the RNN time constant.
        substeps: Euler steps per recorded sample.
        burn_in: recorded-sample periods simulated and discarded before recording.
        process_noise: sigma, the latent noise intensity (per sqrt time unit).
        min_activity: redraw the system until its noise-free activity has at least this mean
            temporal std of tanh(x) (0: accept the first draw).
        dynamics_jitter: per-session perturbation of J, relative to its law (0: shared J).
        observed_fraction: fraction of the latent units a session's neurons can read.
        fan_in: latent units each neuron reads (at most the observed units).
        loading_scale: scale of a neuron's loading row (its drive has std ~ scale * std tanh).
        calcium_tau: tau of the calcium kernel in recorded samples (0: none).
        gain_log_std: std of log gain per neuron.
        offset_std: std of the offset per neuron.
        noise_std: observation noise std.
        drift: m, the relative Frobenius change of the loadings over the session, in [0, 2].
    """

    num_steps: int = 2000
    min_neurons: int = 32
    max_neurons: int = 64
    num_regions: int = 3
    units_per_region: int = 64
    gain: float = 1.8
    inter_density: float = 0.1
    inter_strength: float = 0.5
    dt: float = 0.1
    substeps: int = 5
    burn_in: int = 200
    process_noise: float = 0.05
    min_activity: float = 0.05
    dynamics_jitter: float = 0.0
    observed_fraction: float = 0.5
    fan_in: int = 8
    loading_scale: float = 2.0
    calcium_tau: float = 3.0
    gain_log_std: float = 0.5
    offset_std: float = 0.5
    noise_std: float = 0.1
    drift: float = 0.0

    @property
    def num_units(self) -> int:
        """U, the number of latent units."""
        return self.num_regions * self.units_per_region

    def validate(self) -> SessionConfig:
        """Raise ``ValueError`` naming the first field out of range; return ``self``."""
        positive_ints = (
            "num_steps",
            "min_neurons",
            "num_regions",
            "units_per_region",
            "substeps",
            "fan_in",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_neurons < self.min_neurons:
            raise ValueError(
                f"max_neurons ({self.max_neurons}) must be >= min_neurons ({self.min_neurons})"
            )
        if not isinstance(self.burn_in, (int, np.integer)) or self.burn_in < 0:
            raise ValueError(f"burn_in must be a non-negative int, got {self.burn_in!r}")
        for name in ("gain", "dt", "loading_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        nonneg = (
            "inter_strength",
            "process_noise",
            "min_activity",
            "dynamics_jitter",
            "calcium_tau",
            "gain_log_std",
            "offset_std",
            "noise_std",
        )
        for name in nonneg:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.inter_density <= 1.0:
            raise ValueError(f"inter_density must be in [0, 1], got {self.inter_density}")
        if not 0.0 < self.observed_fraction <= 1.0:
            raise ValueError(f"observed_fraction must be in (0, 1], got {self.observed_fraction}")
        if self.num_observed < 2:
            raise ValueError(
                f"observed_fraction * num_units = {self.observed_fraction} * {self.num_units} "
                "leaves fewer than 2 observed latent units"
            )
        if not 0.0 <= self.drift <= 2.0:
            raise ValueError(
                f"drift must be in [0, 2] (a relative Frobenius change), got {self.drift}"
            )
        return self

    @property
    def num_observed(self) -> int:
        """Latent units a session observes."""
        return int(round(self.observed_fraction * self.num_units))


class SessionTruth(NamedTuple):
    """The generator's hidden variables of one session (None for loaded recordings).

    Attributes:
        latents: (U, T) latent states x (before tanh) at the recorded samples.
        coupling: (U, U) the session's J.
        loadings: (N, U) L0, the loadings at t = 0.
        loadings_perp: (N, U) the rotation partner of each row (orthogonal, same norm).
        angles: (T,) rotation angle theta_t of the loadings.
        rates: (N, T) softplus(L(t) tanh(x_t)), before calcium smoothing.
        gains: (N,) per-neuron gains.
        offsets: (N,) per-neuron offsets.
        calcium_decay: a = exp(-1 / tau) (0 when tau = 0).
    """

    latents: np.ndarray
    coupling: np.ndarray
    loadings: np.ndarray
    loadings_perp: np.ndarray
    angles: np.ndarray
    rates: np.ndarray
    gains: np.ndarray
    offsets: np.ndarray
    calcium_decay: float

    def loadings_at(self, t: int) -> np.ndarray:
        """L(t) = cos(theta_t) L0 + sin(theta_t) Lperp, shape (N, U)."""
        theta = self.angles[t]
        return np.cos(theta) * self.loadings + np.sin(theta) * self.loadings_perp


class Session(NamedTuple):
    """One recording: ``data`` (N, T) float32, JSON-able ``meta`` and, if generated, ``truth``.

    ``meta`` holds at least ``session_id`` and ``num_neurons``; generated sessions add
    ``num_steps``, ``drift`` and ``seed``.
    """

    data: np.ndarray
    meta: dict
    truth: SessionTruth | None = None


# --------------------------------------------------------------------------------------------
# Generator


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([int(e) for e in entropy])


def _coupling(rng: np.random.Generator, cfg: SessionConfig) -> np.ndarray:
    """The (U, U) multi-region coupling: dense N(0, g^2/M) blocks, sparse between regions."""
    m, u = cfg.units_per_region, cfg.num_units
    region = np.repeat(np.arange(cfg.num_regions), m)
    same = region[:, None] == region[None, :]
    dense = rng.normal(size=(u, u))
    sparse = rng.random((u, u)) < cfg.inter_density
    within = cfg.gain / math.sqrt(m)
    between = cfg.inter_strength * cfg.gain / math.sqrt(max(cfg.inter_density, 1e-12) * m)
    return np.where(same, within * dense, np.where(sparse, between * dense, 0.0))


def _simulate(
    rng: np.random.Generator,
    coupling: np.ndarray,
    cfg: SessionConfig,
    num_samples: int,
    process_noise: float,
) -> np.ndarray:
    """Euler-integrate the RNN from a N(0, 1) state; (U, num_samples) states, one every
    ``substeps`` steps."""
    u = coupling.shape[0]
    x = rng.normal(size=u)
    noise_scale = process_noise * math.sqrt(cfg.dt)
    out = np.empty((u, num_samples))
    chunk = 512  # noise is drawn in chunks of samples (same stream as one draw, less memory)
    for start in range(0, num_samples, chunk):
        stop = min(start + chunk, num_samples)
        kicks = noise_scale * rng.normal(size=(stop - start, cfg.substeps, u))
        for t in range(start, stop):
            out[:, t] = x
            for k in range(cfg.substeps):
                x = x + cfg.dt * (np.tanh(x) @ coupling.T - x)
                if noise_scale:
                    x = x + kicks[t - start, k]
    return out


_MAX_SYSTEM_DRAWS = 20
_PROBE_SAMPLES = 200


def _system(seed: int, cfg: SessionConfig) -> np.ndarray:
    """The shared coupling: the first draw whose noise-free probe run stays active."""
    for attempt in range(_MAX_SYSTEM_DRAWS):
        rng = _rng(seed, _SYSTEM, attempt)
        coupling = _coupling(rng, cfg)
        if cfg.min_activity <= 0:
            return coupling
        probe = np.tanh(_simulate(rng, coupling, cfg, 2 * _PROBE_SAMPLES, 0.0))
        if probe[:, _PROBE_SAMPLES:].std(axis=1).mean() >= cfg.min_activity:
            return coupling
    raise ValueError(
        f"no latent system with min_activity >= {cfg.min_activity} in {_MAX_SYSTEM_DRAWS} "
        f"draws (gain = {cfg.gain}); raise gain or units_per_region, or set min_activity=0"
    )


def _loadings(
    rng: np.random.Generator, cfg: SessionConfig, num_neurons: int
) -> tuple[np.ndarray, np.ndarray]:
    """L0 (N, U) over a random observed subset, and the drift partners Lperp (N, U)."""
    u, k = cfg.num_units, min(cfg.fan_in, cfg.num_observed)
    observed = rng.choice(u, size=cfg.num_observed, replace=False)
    loadings = np.zeros((num_neurons, u))
    for n in range(num_neurons):
        cols = rng.choice(observed, size=k, replace=False)
        loadings[n, cols] = rng.normal(size=k) * cfg.loading_scale / math.sqrt(k)
    # Partner rows: random over the observed units, orthogonalised against L0's row, same norm.
    perp = np.zeros_like(loadings)
    perp[:, observed] = rng.normal(size=(num_neurons, observed.size))
    norms = np.linalg.norm(loadings, axis=1, keepdims=True)
    unit = loadings / np.maximum(norms, 1e-12)
    perp -= np.sum(perp * unit, axis=1, keepdims=True) * unit
    perp *= norms / np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-12)
    return loadings, perp


def _generate_one(cfg: SessionConfig, seed: int, session_id: int, system: np.ndarray) -> Session:
    coupling = system
    if cfg.dynamics_jitter > 0:
        jitter = _coupling(_rng(seed, session_id, _JITTER), cfg)
        coupling = system + cfg.dynamics_jitter * jitter
    t_total = cfg.burn_in + cfg.num_steps
    latents = _simulate(_rng(seed, session_id, _LATENT), coupling, cfg, t_total, cfg.process_noise)

    neuron_rng = _rng(seed, session_id, _NEURONS)
    num_neurons = int(neuron_rng.integers(cfg.min_neurons, cfg.max_neurons + 1))
    loadings, perp = _loadings(neuron_rng, cfg, num_neurons)

    theta_end = 2.0 * math.asin(cfg.drift / 2.0)
    ramp = np.arange(cfg.num_steps) / max(cfg.num_steps - 1, 1)
    angles = np.concatenate([np.zeros(cfg.burn_in), theta_end * ramp])
    activity = np.tanh(latents)
    drive = np.cos(angles) * (loadings @ activity) + np.sin(angles) * (perp @ activity)
    rates = np.logaddexp(0.0, drive)  # softplus, overflow-free

    decay = math.exp(-1.0 / cfg.calcium_tau) if cfg.calcium_tau > 0 else 0.0
    # c_t = a c_{t-1} + (1 - a) r_t, started at c_0 = r_0 and run through the burn-in.
    from scipy import signal  # here, not at the top: importing scipy.signal takes ~0.8 s

    calcium = signal.lfilter([1.0 - decay], [1.0, -decay], rates, axis=1, zi=decay * rates[:, :1])[
        0
    ]

    gain_rng = _rng(seed, session_id, _GAINS)
    gains = np.exp(cfg.gain_log_std * gain_rng.normal(size=num_neurons))
    offsets = cfg.offset_std * gain_rng.normal(size=num_neurons)
    rec = slice(cfg.burn_in, None)
    data = gains[:, None] * calcium[:, rec] + offsets[:, None]
    if cfg.noise_std > 0:
        data = data + cfg.noise_std * _rng(seed, session_id, _NOISE).normal(size=data.shape)

    truth = SessionTruth(
        latents=latents[:, rec].astype(np.float32),
        coupling=coupling,
        loadings=loadings,
        loadings_perp=perp,
        angles=angles[rec],
        rates=rates[:, rec].astype(np.float32),
        gains=gains,
        offsets=offsets,
        calcium_decay=decay,
    )
    meta = {
        "session_id": int(session_id),
        "num_neurons": num_neurons,
        "num_steps": int(cfg.num_steps),
        "drift": float(cfg.drift),
        "seed": int(seed),
    }
    return Session(data.astype(np.float32), meta, truth)


def generate_sessions(
    num_sessions: int,
    seed: int,
    config: SessionConfig | None = None,
    *,
    first_session_id: int = 0,
    **overrides: Any,
) -> list[Session]:
    """Generate sessions ``first_session_id, ..., first_session_id + num_sessions - 1``.

    All sessions of one ``seed`` observe the same latent system; held-out sessions of that
    system are other ids (``first_session_id``).

    Args:
        num_sessions: S >= 1.
        seed: the system's seed (and part of every session's seed).
        config: a :class:`SessionConfig` (default: the defaults).
        first_session_id: id of the first session.
        **overrides: fields replacing those of ``config`` (``num_steps=200, drift=0.1``).

    Returns:
        S :class:`Session` s, each ``data`` (N_s, T) float32 with ``truth``.

    Raises:
        ValueError: bad ``num_sessions``, ``first_session_id`` or configuration field.
    """
    if not isinstance(num_sessions, (int, np.integer)) or num_sessions < 1:
        raise ValueError(f"num_sessions must be a positive int, got {num_sessions!r}")
    if not isinstance(first_session_id, (int, np.integer)) or first_session_id < 0:
        raise ValueError(f"first_session_id must be a non-negative int, got {first_session_id!r}")
    cfg = config or SessionConfig()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SessionConfig)}
    if unknown:
        raise ValueError(f"unknown SessionConfig fields: {sorted(unknown)}")
    cfg = dataclasses.replace(cfg, **overrides).validate()
    system = _system(seed, cfg)
    return [
        _generate_one(cfg, seed, first_session_id + i, system) for i in range(int(num_sessions))
    ]


# --------------------------------------------------------------------------------------------
# On disk


def save_session(path: str | pathlib.Path, session: Session) -> pathlib.Path:
    """Write ``session.data`` to ``path`` (``.npy`` added if missing) and its meta beside it.

    The metadata goes to the same name with ``.json`` (written only when ``meta`` is non-empty).
    ``truth`` is not stored.

    Returns:
        The ``.npy`` path written.

    Raises:
        ValueError: ``session.data`` is not a 2-D floating array.
    """
    path = pathlib.Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    data = np.asarray(session.data)
    _check_recording(data, f"session.data for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, data, allow_pickle=False)
    if session.meta:
        path.with_suffix(".json").write_text(json.dumps(session.meta, indent=1, sort_keys=True))
    return path


def _check_recording(data: np.ndarray, where: str) -> None:
    if data.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D (neurons, time) array, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"{where}: expected a floating-point array, got dtype {data.dtype}")
    if data.shape[0] < 1 or data.shape[1] < 1:
        raise ValueError(f"{where}: empty recording of shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{where}: contains non-finite values")


def load_sessions(folder: str | pathlib.Path, *, wide_ok: bool = False) -> list[Session]:
    """Load every ``*.npy`` recording in ``folder`` (sorted by name), with ``*.json`` metadata.

    Each array must be 2-D (neurons, time), floating and finite; it is returned as float32.
    Without a metadata file, ``meta`` is ``{"session_id": i, "num_neurons": N, "name": stem}``
    with i the file's index; a metadata file must be a JSON object and, if it states
    ``num_neurons``, agree with the array. An array with more rows than columns is refused as
    probably transposed (time, neurons) unless ``wide_ok`` (a short recording of many units).

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        NotADirectoryError: ``folder`` is not a directory.
        ValueError: no ``.npy`` file, or a file that is unreadable, of the wrong rank or
            dtype, non-finite, or whose metadata is invalid (the message names the file).
    """
    folder = pathlib.Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"recording folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"recording folder {folder} is not a directory")
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise ValueError(f"recording folder {folder} holds no .npy files")
    sessions = []
    for i, file in enumerate(files):
        try:
            data = np.load(file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{file}: not a readable .npy array ({err})") from err
        _check_recording(data, str(file))
        if data.shape[0] > data.shape[1] and not wide_ok:
            raise ValueError(
                f"{file}: {data.shape[0]} neurons but only {data.shape[1]} time steps: is it "
                "(time, neurons)? Transpose it, or pass wide_ok=True if it really is that short"
            )
        meta: dict = {"session_id": i, "num_neurons": int(data.shape[0]), "name": file.stem}
        meta_file = file.with_suffix(".json")
        if meta_file.exists():
            try:
                stored = json.loads(meta_file.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{meta_file}: invalid JSON ({err})") from err
            if not isinstance(stored, dict):
                raise ValueError(f"{meta_file}: metadata must be a JSON object")
            if "num_neurons" in stored and stored["num_neurons"] != data.shape[0]:
                raise ValueError(
                    f"{meta_file}: num_neurons = {stored['num_neurons']} but {file} has "
                    f"{data.shape[0]} rows"
                )
            meta.update(stored)
        sessions.append(Session(data.astype(np.float32), meta))
    return sessions


# --------------------------------------------------------------------------------------------
# Padding, unit ids and windows


class PaddedSessions(NamedTuple):
    """Padded sessions: data (S, N_max, T) float32 (0 where padded) and mask (S, N_max) bool."""

    data: np.ndarray
    mask: np.ndarray


def _as_array(item: Session | np.ndarray) -> np.ndarray:
    return np.asarray(item.data if isinstance(item, Session) else item)


def pad_sessions(
    sessions: Sequence[Session | np.ndarray], max_neurons: int | None = None
) -> PaddedSessions:
    """Stack recordings of different neuron counts (same T) into one padded array and a mask.

    Args:
        sessions: S sessions (or (N_s, T) arrays) with a common T.
        max_neurons: N_max (default: the largest N_s).

    Raises:
        ValueError: no sessions, unequal T, a non-2-D recording, or ``max_neurons`` < some N_s.
    """
    arrays = [_as_array(s) for s in sessions]
    if not arrays:
        raise ValueError("sessions is empty")
    for i, a in enumerate(arrays):
        if a.ndim != 2:
            raise ValueError(f"sessions[{i}] must be (neurons, time), got shape {a.shape}")
    lengths = {a.shape[1] for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"sessions must share the number of time steps, got {sorted(lengths)}")
    counts = [a.shape[0] for a in arrays]
    n_max = max(counts) if max_neurons is None else int(max_neurons)
    if n_max < max(counts):
        raise ValueError(
            f"max_neurons = {max_neurons} is below the largest session ({max(counts)})"
        )
    data = np.zeros((len(arrays), n_max, lengths.pop()), np.float32)
    mask = np.zeros((len(arrays), n_max), bool)
    for i, a in enumerate(arrays):
        data[i, : a.shape[0]] = a
        mask[i, : a.shape[0]] = True
    return PaddedSessions(data, mask)


def assign_unit_ids(
    num_neurons: Sequence[int], max_neurons: int | None = None, *, start: int = 0
) -> np.ndarray:
    """Consecutive global unit ids: session s's neurons get the next N_s ids after session s-1's.

    Padded slots get id 0 (they are masked, so the id is never used).

    Returns:
        (S, N_max) int32.
    """
    counts = [int(n) for n in num_neurons]
    if not counts or min(counts) < 1:
        raise ValueError(f"num_neurons must be a non-empty list of positive ints, got {counts}")
    n_max = max(counts) if max_neurons is None else int(max_neurons)
    if n_max < max(counts):
        raise ValueError(f"max_neurons = {max_neurons} is below the largest count ({max(counts)})")
    ids = np.zeros((len(counts), n_max), np.int32)
    offset = int(start)
    for i, n in enumerate(counts):
        ids[i, :n] = offset + np.arange(n)
        offset += n
    return ids


class WindowBatch(NamedTuple):
    """(context, horizon) windows of one or more sessions; what the forecaster reads.

    Attributes:
        context: (W, N, C) the past C steps of every neuron.
        target: (W, N, P) the next P steps.
        mask: (W, N) bool, real (True) or padded neuron.
        unit_ids: (W, N) int32 global unit ids.
        session_id: (W,) int32.
        start: (W,) int32 time index of each window's first context step.
    """

    context: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    unit_ids: np.ndarray
    session_id: np.ndarray
    start: np.ndarray


def session_windows(
    data: np.ndarray,
    *,
    context: int,
    horizon: int,
    stride: int = 1,
    offset: int = 0,
    mask: np.ndarray | None = None,
    unit_ids: np.ndarray | None = None,
    session_id: int = 0,
) -> WindowBatch:
    """All (C, P) windows of one (possibly padded) session (N, T) starting at ``offset``.

    Windows are cut along time by :func:`metattt.data.windows.sliding_windows`.

    Args:
        data: (N, T) recording.
        context, horizon: C and P.
        stride: step between window starts.
        offset: first admissible start.
        mask: (N,) real neurons (default: all).
        unit_ids: (N,) global ids (default: 0..N-1).
        session_id: the session's id.

    Returns:
        A :class:`WindowBatch` with W windows.
    """
    data = np.asarray(data, np.float32)
    if data.ndim != 2:
        raise ValueError(f"data must be (neurons, time), got shape {data.shape}")
    n = data.shape[0]
    mask = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    unit_ids = np.arange(n, dtype=np.int32) if unit_ids is None else np.asarray(unit_ids, np.int32)
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape ({n},), got {mask.shape}")
    if unit_ids.shape != (n,):
        raise ValueError(f"unit_ids must have shape ({n},), got {unit_ids.shape}")
    win = sliding_windows(data.T, context=context, horizon=horizon, stride=stride, offset=offset)
    w = win.starts.size
    return WindowBatch(
        context=np.ascontiguousarray(win.inputs.transpose(0, 2, 1)),
        target=np.ascontiguousarray(win.targets.transpose(0, 2, 1)),
        mask=np.broadcast_to(mask, (w, n)).copy(),
        unit_ids=np.broadcast_to(unit_ids, (w, n)).copy(),
        session_id=np.full((w,), session_id, np.int32),
        start=win.starts.astype(np.int32),
    )


def session_task(
    data: np.ndarray,
    *,
    context: int,
    horizon: int,
    support_fraction: float = 0.5,
    stride: int | None = None,
    mask: np.ndarray | None = None,
    unit_ids: np.ndarray | None = None,
    session_id: int = 0,
) -> Task:
    """Support windows before a time cut, query windows after it: no shared time step.

    The rule of :func:`metattt.data.windows.support_query_split`: time is cut at
    ``int(T * support_fraction)``; support windows end at or before the cut, query windows
    start at or after it; ``stride`` defaults to C + P (non-overlapping windows).

    Returns:
        ``Task(support=WindowBatch, query=WindowBatch)``.
    """
    data = np.asarray(data, np.float32)
    if data.ndim != 2:
        raise ValueError(f"data must be (neurons, time), got shape {data.shape}")
    if not 0.0 < support_fraction < 1.0:
        raise ValueError(f"support_fraction must be in (0, 1), got {support_fraction}")
    stride = stride or context + horizon
    cut = int(data.shape[1] * support_fraction)
    kw = dict(context=context, horizon=horizon, stride=stride, mask=mask, unit_ids=unit_ids)
    support = session_windows(data[:, :cut], session_id=session_id, **kw)
    query = session_windows(data, offset=cut, session_id=session_id, **kw)
    return Task(support, query)


def stack_session_tasks(
    data: np.ndarray,
    mask: np.ndarray,
    unit_ids: np.ndarray,
    session_ids: Sequence[int] | np.ndarray,
    *,
    context: int,
    horizon: int,
    support_fraction: float = 0.5,
    stride: int | None = None,
) -> Task:
    """One :func:`session_task` per padded session, stacked on a leading task axis S.

    Args:
        data: (S, N_max, T) from :func:`pad_sessions`.
        mask: (S, N_max).
        unit_ids: (S, N_max) from :func:`assign_unit_ids`.
        session_ids: (S,).

    Returns:
        A ``Task`` whose leaves have a leading axis S (what ``jax.vmap`` over tasks expects).
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"data must be (sessions, neurons, time), got shape {data.shape}")
    s, n = data.shape[:2]
    if np.shape(mask) != (s, n):
        raise ValueError(f"mask must have shape {(s, n)}, got {np.shape(mask)}")
    if np.shape(unit_ids) != (s, n):
        raise ValueError(f"unit_ids must have shape {(s, n)}, got {np.shape(unit_ids)}")
    if np.shape(session_ids) != (s,):
        raise ValueError(f"session_ids must have shape ({s},), got {np.shape(session_ids)}")
    tasks = [
        session_task(
            data[i],
            context=context,
            horizon=horizon,
            support_fraction=support_fraction,
            stride=stride,
            mask=mask[i],
            unit_ids=unit_ids[i],
            session_id=int(session_ids[i]),
        )
        for i in range(s)
    ]
    return Task(
        WindowBatch(*(np.stack(f) for f in zip(*(t.support for t in tasks), strict=True))),
        WindowBatch(*(np.stack(f) for f in zip(*(t.query for t in tasks), strict=True))),
    )
