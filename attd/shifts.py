"""Classification tasks whose test shift is a shift in temporal dynamics (issue 17).

The LRA shifts (deeper expressions, longer paths, held-out files) do not change an input's
timescales, so adapting an SSM's dynamics cannot be expected to fix them. These tasks do:

- **time warp** (:func:`timewarp_split`): which of ``num_classes`` periodic templates (a few
  harmonics with random amplitudes and phases) a sequence shows. Every example has its own
  phase, amplitude, period jitter and noise; the shift plays it ``w`` times slower (a sampling-
  rate change), so its period is ``period * w``.
- **latent timescale** (:func:`oscillator_split`): which of ``num_classes`` latent linear
  systems (damped complex modes with class-specific frequencies, driven by white noise)
  produced a sequence. The shift multiplies the modes' decay time (``shift="decay"``: the
  spectral peaks sharpen or broaden, the frequencies stay) or their frequencies
  (``shift="frequency"``).
- **recorded** (:func:`recorded_split`): which class a real recording of the UCR archive shows
  (GunPoint by default: a hand drawing a gun or pointing, filmed at 30 frames/s; see
  :mod:`metattt.data.ucr`), resampled to ``seq_len`` samples at factor 1 and to ``seq_len * w``
  samples under the shift: the same motion sampled at a ``w`` times higher rate (w < 1: lower),
  so it unfolds over ``w`` times as many steps. The sequences of a split are padded on the right
  to its longest (``mask`` marks the samples). The recordings are split by seed into training
  and held-out ones; the test splits draw only held-out recordings.

A split draws each example's shift factor from ``bands``, a tuple of ``(lo, hi)`` intervals:
an interval is picked uniformly, then the factor log-uniformly inside it (``((1, 1),)`` is the
unshifted distribution). Its difficulty is ``|log factor|``, and the factor itself is kept.
Signals are quantised to ``vocab_size`` tokens so that the project's token Mamba reads them.
Classes (templates, mode frequencies) depend on the run seed only, so every split of one seed
shares them; the examples of a split depend on ``(seed, offset)`` as in :mod:`attd.lra.tasks`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from attd.lra.tasks import Split, data_seed
from metattt.data import ucr

CLASS_OFFSET = 9_973  # the data-seed offset of a run seed's class definitions
IN_DISTRIBUTION = ((1.0, 1.0),)


class ShiftSplit(NamedTuple):
    """A :class:`~attd.lra.tasks.Split` and its examples' shift factors (N,)."""

    split: Split
    factor: np.ndarray


class ShiftTask(NamedTuple):
    """A dynamics-shift task: train and in-distribution test (factor 1), shifted test, and
    (optionally) an outer-training split on other shift bands than the test's."""

    train: ShiftSplit
    test_id: ShiftSplit
    test_shift: ShiftSplit
    vocab_size: int
    num_classes: int
    outer: ShiftSplit | None = None


def _check_bands(bands) -> tuple[tuple[float, float], ...]:
    bands = tuple((float(lo), float(hi)) for lo, hi in bands)
    if not bands or any(not 0 < lo <= hi for lo, hi in bands):
        raise ValueError(
            f"bands must be non-empty (lo, hi) intervals with 0 < lo <= hi, got {bands}"
        )
    return bands


def sample_factors(rng: np.random.Generator, num: int, bands) -> np.ndarray:
    """``num`` shift factors: an interval of ``bands`` uniformly, then log-uniform inside it."""
    bands = np.log(np.asarray(_check_bands(bands)))
    pick = rng.integers(len(bands), size=num)
    return np.exp(rng.uniform(bands[pick, 0], bands[pick, 1]))


def quantise(x: np.ndarray, vocab_size: int, clip: float) -> np.ndarray:
    """Tokens ``0 .. vocab_size - 1`` of ``x`` in equal bins over ``[-clip, clip]`` (values
    beyond are clipped to the end bins)."""
    edges = np.linspace(-clip, clip, vocab_size + 1)[1:-1]
    return np.searchsorted(edges, x).astype(np.int32)


def warp_templates(num_classes: int, harmonics: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the amplitudes and phases (C, H) of harmonics 1..H, scaled to unit RMS."""
    rng = np.random.default_rng(data_seed(seed, CLASS_OFFSET))
    amp = rng.uniform(0.2, 1.0, (num_classes, harmonics))
    amp /= np.sqrt(0.5 * (amp**2).sum(-1, keepdims=True))
    return amp, rng.uniform(0, 2 * np.pi, (num_classes, harmonics))


def timewarp_signals(
    num: int,
    seed: int,
    *,
    offset: int,
    num_classes: int = 4,
    harmonics: int = 3,
    seq_len: int = 128,
    period: float = 24.0,
    period_jitter: float = 0.15,
    bands=IN_DISTRIBUTION,
    noise: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``num`` real-valued warped sequences (N, L), their labels and warp factors (N,).

    Example i of class c is ``s * f_c(t / (P w) + φ) + σ ε`` with f_c the class template
    (period 1), P = ``period`` times a factor uniform in ``1 ± period_jitter``, w its warp,
    a phase φ uniform in [0, 1), an amplitude s uniform in [0.8, 1.2] and Gaussian noise."""
    amp, phase = warp_templates(num_classes, harmonics, seed)
    rng = np.random.default_rng(data_seed(seed, offset))
    labels = rng.integers(num_classes, size=num)
    warp = sample_factors(rng, num, bands)
    p = period * rng.uniform(1 - period_jitter, 1 + period_jitter, num) * warp
    u = np.arange(seq_len)[None, :] / p[:, None] + rng.uniform(0, 1, (num, 1))  # cycles
    h = np.arange(1, harmonics + 1)
    x = (
        amp[labels][:, None, :] * np.sin(2 * np.pi * h * u[..., None] + phase[labels][:, None, :])
    ).sum(-1)
    x = rng.uniform(0.8, 1.2, (num, 1)) * x + noise * rng.standard_normal(x.shape)
    return x, labels, warp


def timewarp_split(
    num: int, seed: int, *, offset: int, vocab_size: int = 32, clip: float = 2.5, **kw
) -> ShiftSplit:
    """:func:`timewarp_signals` as ``vocab_size`` tokens (difficulty ``|log w|``)."""
    x, labels, warp = timewarp_signals(num, seed, offset=offset, **kw)
    tokens = quantise(x, vocab_size, clip)
    return ShiftSplit(Split(tokens, np.ones_like(tokens, bool), labels, np.abs(np.log(warp))), warp)


def oscillator_modes(num_classes: int, modes: int, seed: int, freq_range=(0.03, 0.2)) -> np.ndarray:
    """Per class, ``modes`` frequencies (cycles per step) in ``freq_range``; classes are
    sets drawn on a grid so that no two classes share a set."""
    rng = np.random.default_rng(data_seed(seed, CLASS_OFFSET + 1))
    grid = np.linspace(*freq_range, 8)
    sets: list[tuple[float, ...]] = []
    while len(sets) < num_classes:
        s = tuple(sorted(rng.choice(grid, modes, replace=False)))
        if s not in sets:
            sets.append(s)
    return np.array(sets)


def oscillator_signals(
    num: int,
    seed: int,
    *,
    offset: int,
    num_classes: int = 4,
    modes: int = 2,
    seq_len: int = 128,
    decay: float = 16.0,
    bands=IN_DISTRIBUTION,
    shift: str = "decay",
    noise: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``num`` real-valued sequences (N, L) of latent damped modes, labels, shift factors.

    Mode k of class c is ``z_{t+1} = λ z_t + ε_t``, ``λ = exp(-1/τ + 2πi f_{c,k})`` with
    complex Gaussian ε, started in its stationary distribution and scaled to unit stationary
    variance of Re z; the sequence is ``Σ_k Re z_k`` plus observation noise. The shift factor
    multiplies τ = ``decay`` (``shift="decay"``) or every f (``shift="frequency"``)."""
    if shift not in ("decay", "frequency"):
        raise ValueError(f"shift must be 'decay' or 'frequency', got {shift!r}")
    freqs = oscillator_modes(num_classes, modes, seed)
    rng = np.random.default_rng(data_seed(seed, offset))
    labels = rng.integers(num_classes, size=num)
    factor = sample_factors(rng, num, bands)
    f = freqs[labels] * (factor[:, None] if shift == "frequency" else 1.0)  # (N, K)
    tau = decay * (factor[:, None] if shift == "decay" else np.ones((num, 1)))
    lam = np.exp(-1.0 / tau + 2j * np.pi * f)
    scale = np.sqrt(1 - np.abs(lam) ** 2)  # unit stationary variance of the complex z
    z = (rng.standard_normal((num, modes)) + 1j * rng.standard_normal((num, modes))) / np.sqrt(2)
    eps = (
        rng.standard_normal((seq_len, num, modes)) + 1j * rng.standard_normal((seq_len, num, modes))
    ) / np.sqrt(2)
    x = np.empty((num, seq_len))
    for t in range(seq_len):
        x[:, t] = np.sqrt(2) * z.real.sum(-1)  # Re z has variance 1/2 per mode
        z = lam * z + scale * eps[t]
    return x / np.sqrt(modes) + noise * rng.standard_normal(x.shape), labels, factor


def oscillator_split(
    num: int, seed: int, *, offset: int, vocab_size: int = 32, clip: float = 2.5, **kw
) -> ShiftSplit:
    """:func:`oscillator_signals` as ``vocab_size`` tokens (difficulty ``|log factor|``)."""
    x, labels, factor = oscillator_signals(num, seed, offset=offset, **kw)
    tokens = quantise(x, vocab_size, clip)
    return ShiftSplit(
        Split(tokens, np.ones_like(tokens, bool), labels, np.abs(np.log(factor))), factor
    )


#: The offsets of :func:`shift_task`'s in-distribution and shifted test splits: the splits a
#: recorded task draws from held-out recordings (the others draw training recordings).
TEST_OFFSETS = (1, 2)


@functools.lru_cache(maxsize=4)
def _recordings(dataset: str, data_dir: str | None) -> ucr.UCRSeries:
    """The dataset's recordings (TRAIN and TEST pooled), each z-normalised."""
    data = ucr.load_dataset(dataset, data_dir)
    x = data.series - data.series.mean(1, keepdims=True)
    return data._replace(series=x / np.maximum(x.std(1, keepdims=True), 1e-8))


def recorded_signals(
    num: int,
    seed: int,
    *,
    offset: int,
    dataset: str = "GunPoint",
    data_dir: str | None = None,
    seq_len: int = 64,
    held_out: float = 0.4,
    crop: float = 0.05,
    bands=IN_DISTRIBUTION,
    noise: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``num`` resampled recordings (N, L) padded on the right, their mask (N, L), labels and
    sampling-rate factors w (N,); L is the longest, ``round(seq_len * max w)``.

    Example i takes a recording (a share ``held_out`` of them, chosen by ``seed``, is kept for
    the splits at :data:`TEST_OFFSETS`), crops up to ``crop`` of its length at each end,
    samples the rest by linear interpolation at ``round(seq_len * w)`` evenly spaced times and
    scales it by a factor uniform in [0.8, 1.2], plus Gaussian noise."""
    if not 0 < held_out < 1 or not 0 <= crop < 0.5:
        raise ValueError(f"need 0 < held_out < 1 and 0 <= crop < 0.5, got {held_out}, {crop}")
    data = _recordings(dataset, data_dir)
    order = np.random.default_rng(data_seed(seed, CLASS_OFFSET + 2)).permutation(len(data.labels))
    cut = int(round(held_out * len(order)))
    pool = order[:cut] if offset in TEST_OFFSETS else order[cut:]
    rng = np.random.default_rng(data_seed(seed, offset))
    pick = pool[rng.integers(len(pool), size=num)]
    warp = sample_factors(rng, num, bands)
    lengths = np.maximum(np.round(seq_len * warp).astype(int), 2)
    span = data.series.shape[1] - 1
    starts = rng.uniform(0, crop * span, num)
    ends = rng.uniform((1 - crop) * span, span, num)
    scale = rng.uniform(0.8, 1.2, num)
    width = int(round(seq_len * max(hi for _, hi in _check_bands(bands))))
    x, mask = np.zeros((num, width)), np.zeros((num, width), bool)
    for i, n in enumerate(lengths):
        t = np.linspace(starts[i], ends[i], n)
        x[i, :n] = scale[i] * np.interp(t, np.arange(span + 1), data.series[pick[i]])
        mask[i, :n] = True
    x = np.where(mask, x + noise * rng.standard_normal(x.shape), 0.0)
    return x, mask, data.labels[pick], warp


def recorded_split(
    num: int, seed: int, *, offset: int, vocab_size: int = 32, clip: float = 2.5, **kw
) -> ShiftSplit:
    """:func:`recorded_signals` as ``vocab_size`` tokens (difficulty ``|log w|``)."""
    x, mask, labels, warp = recorded_signals(num, seed, offset=offset, **kw)
    tokens = np.where(mask, quantise(x, vocab_size, clip), 0)
    return ShiftSplit(Split(tokens, mask, labels, np.abs(np.log(warp))), warp)


def _num_classes(kind: str, kw) -> int:
    if kind == "recorded":
        return len(_recordings(kw.get("dataset", "GunPoint"), kw.get("data_dir")).classes)
    return kw.get("num_classes", 4)


_SPLITS = {"timewarp": timewarp_split, "oscillator": oscillator_split, "recorded": recorded_split}


def shift_task(
    kind: str,
    seed: int,
    *,
    num_train: int,
    num_test: int,
    shift_bands,
    num_outer: int = 0,
    outer_bands=IN_DISTRIBUTION,
    vocab_size: int = 32,
    **kw,
) -> ShiftTask:
    """Train and in-distribution test at factor 1, shifted test with factors from
    ``shift_bands`` and, with ``num_outer``, an outer-training split with factors from
    ``outer_bands`` (e.g. factor 1 and milder bands than the test's, so that settings are not
    chosen on the test's shifts); ``kw`` are the generator's settings (shared by all splits)."""
    if kind not in _SPLITS:
        raise ValueError(f"unknown dynamics-shift task {kind!r}; known: {sorted(_SPLITS)}")
    if "bands" in kw:
        raise ValueError(
            "shift_task: train and in-distribution splits are unshifted; "
            "give the shifted split's factors as shift_bands, not bands"
        )
    make = _SPLITS[kind]
    common = dict(seed=seed, vocab_size=vocab_size, **kw)
    return ShiftTask(
        make(num_train, offset=0, **common),
        make(num_test, offset=1, **common),
        make(num_test, offset=2, bands=shift_bands, **common),
        vocab_size,
        _num_classes(kind, kw),
        make(num_outer, offset=3, bands=outer_bands, **common) if num_outer else None,
    )
