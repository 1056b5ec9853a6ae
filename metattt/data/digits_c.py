"""digits-C: scikit-learn's bundled 8x8 handwritten digits under seeded corruptions.

In the spirit of ImageNet-C (Hendrycks & Dietterich, 2019): each corruption has five severity
levels, each a value of one parameter (a noise standard deviation, an angle, a kernel width),
applied with a seeded generator so that a (images, corruption, severity, seed) quadruple
always gives the same images. The data are the 1797 real 8x8 digits that ship with
scikit-learn (``sklearn.datasets.load_digits``, pixel values 0..16), scaled to [0, 1]; nothing
is downloaded. Everything here is NumPy (and ``scipy.ndimage``); images are float32 arrays of
shape (N, H, W) with values in [0, 1] (N images of H x W pixels; 8 x 8 for the digits).

Corruptions (parameter per severity 1..5; the parameter value that is the identity):

==============  =========================================================  ======  ========
name            what it does                                               levels  identity
==============  =========================================================  ======  ========
gaussian_noise  x + sigma * N(0, 1)                                        sigma   0
shot_noise      Poisson(lambda * x) / lambda (photon noise)                lambda  inf
impulse_noise   a fraction p of pixels set to 0 or 1 (salt and pepper)     p       0
gaussian_blur   Gaussian filter of width sigma pixels (zero border)        sigma   0
contrast        (x - mean) * c + mean, mean per image                      c       1
brightness      x + b                                                      b       0
rotate          rotation by +-theta degrees about the centre, random sign  theta   0
translate       shift by d pixels in a random direction (bilinear)         d       0
pixelate        area-average to (f H) x (f W) cells, back by area          f       1
elastic         smooth random displacement field of RMS d pixels           d       0
==============  =========================================================  ======  ========

Every result is clipped to [0, 1]. The random draws of a corruption depend on the seed and the
corruption only, not on the severity (common random numbers): raising the severity scales the
same Gaussian noise, widens the same set of impulse pixels, turns the same images the same way
and scales the same displacement field (shot noise is the exception: Poisson draws cannot be
shared across rates). Gaussian and impulse noise therefore move every pixel at least as far
from the clean image at a higher severity; for all corruptions the mean absolute difference
from the clean images grows with the severity (checked in the tests).

Streams. :func:`make_stream` draws a batch per step and corrupts it according to a schedule
of ``(start, end, corruption, severity)`` segments (steps ``start <= t < end``); steps outside
every segment are clean. :func:`ramp` builds the usual drift: clean until T, then a corruption
switching on at severity 1, intensifying to 5 and switching off.

Example:
    >>> x_tr, y_tr, x_te, y_te = load_digits_split(seed=0, test_fraction=0.25)
    >>> x_blur = corrupt(x_te, "gaussian_blur", severity=3, seed=0)
    >>> stream = make_stream(x_te, y_te, ramp("gaussian_noise", start=200, steps_per_severity=40),
    ...                      num_steps=600, batch_size=32, seed=0)
    >>> stream.x.shape, stream.severity.shape        # (600, 32, 8, 8), (600,)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "CORRUPTIONS",
    "DigitsStream",
    "IDENTITY_LEVELS",
    "LEVELS",
    "corrupt",
    "corrupt_at",
    "load_digits_split",
    "make_stream",
    "ramp",
]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "gaussian_blur",
    "contrast",
    "brightness",
    "rotate",
    "translate",
    "pixelate",
    "elastic",
)

#: The corruption parameter at severities 1..5.
LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.16, 0.24, 0.32, 0.40),
    "shot_noise": (60.0, 25.0, 12.0, 5.0, 3.0),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "gaussian_blur": (0.4, 0.6, 0.8, 1.0, 1.3),
    "contrast": (0.5, 0.4, 0.3, 0.2, 0.1),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "rotate": (6.0, 12.0, 18.0, 24.0, 30.0),
    "translate": (0.25, 0.5, 0.75, 1.0, 1.5),
    "pixelate": (0.75, 0.625, 0.5, 0.375, 0.25),
    "elastic": (0.15, 0.3, 0.45, 0.6, 0.8),
}

#: The parameter value at which each corruption leaves the images unchanged.
IDENTITY_LEVELS: dict[str, float] = {
    "gaussian_noise": 0.0,
    "shot_noise": math.inf,
    "impulse_noise": 0.0,
    "gaussian_blur": 0.0,
    "contrast": 1.0,
    "brightness": 0.0,
    "rotate": 0.0,
    "translate": 0.0,
    "pixelate": 1.0,
    "elastic": 0.0,
}


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 1797 digits, scaled to [0, 1], in a stratified train/test split.

    Args:
        seed: the split's random state.
        test_fraction: share of the images in the test split, in (0, 1).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images (N, 8, 8) float32 and labels (N,) int32.

    Raises:
        ValueError: ``test_fraction`` outside (0, 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return x_tr, y_tr, x_te, y_te


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {images.shape}")
    return images.astype(np.float32, copy=False)


def _check_corruption(corruption: str) -> int:
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; known: {list(CORRUPTIONS)}")
    return CORRUPTIONS.index(corruption)


def _warp(images: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear resampling of each image at (rows, cols) (N, H, W), zero outside."""
    from scipy import ndimage  # here, not at the top: it adds ~0.2 s to every `import metattt.data`

    n = np.broadcast_to(np.arange(images.shape[0], dtype=np.float64)[:, None, None], rows.shape)
    coords = np.stack([n, rows, cols])
    return ndimage.map_coordinates(images.astype(np.float64), coords, order=1, cval=0.0)


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    _, h, w = shape
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64))
    return np.broadcast_to(rows.T, shape), np.broadcast_to(cols.T, shape)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) area-averaging resampling: output cell j averages its overlap."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    m = np.zeros((n_out, n_in))
    for j in range(n_out):
        for i in range(n_in):
            m[j, i] = max(0.0, min(edges[j + 1], i + 1) - max(edges[j], i))
    return m / m.sum(axis=1, keepdims=True)


def _pixelate_matrix(n: int, n_small: int) -> np.ndarray:
    """(n, n) linear map: area-average to n_small cells, then back by area overlap.

    Each output pixel averages the coarse cells it overlaps (weighted by overlap), so when
    n_small divides n the result is exact blocks, and otherwise the coarsening still grows
    monotonically as n_small shrinks (nearest-neighbour upsampling would not: its uneven
    blocks make 5 cells look closer to the original than 6).
    """
    down = _area_matrix(n, n_small)
    up = down.T / down.T.sum(axis=1, keepdims=True)
    return up @ down


def corrupt_at(images: np.ndarray, corruption: str, level: float, seed: int = 0) -> np.ndarray:
    """Apply ``corruption`` with its raw parameter ``level`` (see the module table).

    ``corrupt(images, c, s, seed)`` is ``corrupt_at(images, c, LEVELS[c][s - 1], seed)``; at
    ``IDENTITY_LEVELS[c]`` the images come back unchanged (clipped to [0, 1]).

    Args:
        images: (N, H, W) with values in [0, 1].
        corruption: a name from :data:`CORRUPTIONS`.
        level: the corruption's parameter.
        seed: seeds the corruption's random draws (with the corruption's index).

    Returns:
        (N, H, W) float32 in [0, 1].

    Raises:
        ValueError: unknown ``corruption``, bad ``images`` shape, or a ``level`` outside the
            corruption's meaningful range.
    """
    from scipy import ndimage  # here, not at the top (see _warp)

    x = _check_images(images)
    index = _check_corruption(corruption)
    level = float(level)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), index]))
    n, h, w = x.shape
    positive = {"shot_noise", "pixelate"}
    if math.isnan(level) or level < 0 or (corruption in positive and level <= 0):
        bound = "> 0" if corruption in positive else ">= 0"
        raise ValueError(f"level for {corruption} must be {bound}, got {level}")

    if corruption == "gaussian_noise":
        out = x + level * rng.standard_normal(x.shape)
    elif corruption == "shot_noise":
        out = x if math.isinf(level) else rng.poisson(x.astype(np.float64) * level) / level
    elif corruption == "impulse_noise":
        u, v = rng.random(x.shape), rng.random(x.shape)
        out = np.where(u < level, (v < 0.5).astype(np.float32), x)
    elif corruption == "gaussian_blur":
        out = ndimage.gaussian_filter(x.astype(np.float64), (0.0, level, level), mode="constant")
    elif corruption == "contrast":
        mean = x.mean(axis=(1, 2), keepdims=True)
        out = (x - mean) * level + mean
    elif corruption == "brightness":
        out = x + level
    elif corruption == "rotate":
        theta = np.deg2rad(level) * np.where(rng.random(n) < 0.5, -1.0, 1.0)[:, None, None]
        rows, cols = _grid(x.shape)
        cr, cc = (h - 1) / 2.0, (w - 1) / 2.0
        dr, dc = rows - cr, cols - cc
        # Output pixel (r, c) samples the input at the inverse rotation of its position.
        src_r = cr + np.cos(theta) * dr - np.sin(theta) * dc
        src_c = cc + np.sin(theta) * dr + np.cos(theta) * dc
        out = _warp(x, src_r, src_c)
    elif corruption == "translate":
        phi = rng.uniform(0.0, 2.0 * np.pi, n)[:, None, None]
        rows, cols = _grid(x.shape)
        out = _warp(x, rows - level * np.sin(phi), cols - level * np.cos(phi))
    elif corruption == "pixelate":
        if level > 1:
            raise ValueError(f"level for pixelate must be in (0, 1], got {level}")
        sh, sw = max(1, round(level * h)), max(1, round(level * w))
        rows_m, cols_m = _pixelate_matrix(h, sh), _pixelate_matrix(w, sw)
        out = np.einsum("ij,njk,lk->nil", rows_m, x.astype(np.float64), cols_m)
    else:  # elastic
        field = ndimage.gaussian_filter(rng.standard_normal((2, n, h, w)), (0, 0, 1.5, 1.5))
        rms = np.sqrt(np.mean(field**2, axis=(0, 2, 3), keepdims=True))
        field = field / np.maximum(rms, 1e-12)
        rows, cols = _grid(x.shape)
        out = _warp(x, rows + level * field[0], cols + level * field[1])
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    return int(severity)


def corrupt(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt images with ``corruption`` at ``severity`` 1..5, deterministically in ``seed``.

    Args:
        images: (N, H, W) with values in [0, 1].
        corruption: a name from :data:`CORRUPTIONS`.
        severity: 1 (mild) .. 5 (severe).
        seed: seeds the random draws; the same seed gives the same draws at every severity.

    Returns:
        (N, H, W) float32 in [0, 1].

    Raises:
        ValueError: unknown ``corruption`` or ``severity`` outside 1..5.
    """
    _check_corruption(corruption)
    severity = _check_severity(severity)
    return corrupt_at(images, corruption, LEVELS[corruption][severity - 1], seed)


class DigitsStream(NamedTuple):
    """A stream of T batches of B images.

    Attributes:
        x: (T, B, H, W) float32 images in [0, 1].
        y: (T, B) int32 labels.
        severity: (T,) int32, 0 on clean steps.
        corruption: (T,) int32 index into :data:`CORRUPTIONS`, -1 on clean steps.
    """

    x: np.ndarray
    y: np.ndarray
    severity: np.ndarray
    corruption: np.ndarray


Segment = tuple[int, int, str, int]


def ramp(
    corruption: str,
    start: int,
    steps_per_severity: int,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
) -> list[Segment]:
    """Drift that switches on at ``start`` and steps through ``severities``, then off.

    Returns:
        Segments ``(start + i * L, start + (i + 1) * L, corruption, severities[i])`` with
        L = ``steps_per_severity``; after the last one the stream is clean again.

    Raises:
        ValueError: unknown corruption, a severity outside 1..5, negative ``start`` or
            non-positive ``steps_per_severity``.
    """
    _check_corruption(corruption)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if steps_per_severity < 1:
        raise ValueError(f"steps_per_severity must be >= 1, got {steps_per_severity}")
    length = steps_per_severity
    return [
        (start + i * length, start + (i + 1) * length, corruption, _check_severity(s))
        for i, s in enumerate(severities)
    ]


def make_stream(
    images: np.ndarray,
    labels: np.ndarray,
    schedule: Sequence[Segment],
    *,
    num_steps: int,
    batch_size: int,
    seed: int = 0,
) -> DigitsStream:
    """A stream of corrupted batches following ``schedule``.

    Step t draws ``batch_size`` distinct images (uniformly, independently per step) and, if
    a segment ``(start, end, corruption, severity)`` has ``start <= t < end``, corrupts them
    with that corruption and severity; otherwise they are clean. Both draws are seeded by
    ``(seed, t)``, so a stream is a pure function of its arguments.

    Args:
        images: (N, H, W) source images in [0, 1] (e.g. a test split).
        labels: (N,) their labels.
        schedule: non-overlapping segments; ``0 <= start < end <= num_steps``.
        num_steps: T.
        batch_size: B <= N.
        seed: the stream's seed.

    Returns:
        A :class:`DigitsStream`.

    Raises:
        ValueError: mismatched ``images``/``labels``, a bad ``batch_size`` or ``num_steps``,
            and segments that overlap, leave [0, num_steps), name an unknown corruption or a
            severity outside 1..5.
    """
    x = _check_images(images)
    labels = np.asarray(labels)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape (N,) = ({x.shape[0]},), got {labels.shape}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= x.shape[0]:
        raise ValueError(f"batch_size must be an int in [1, N={x.shape[0]}], got {batch_size!r}")
    corruption_ids = np.full((num_steps,), -1, np.int32)
    severities = np.zeros((num_steps,), np.int32)
    for segment in schedule:
        if len(segment) != 4:
            raise ValueError(
                f"schedule entries are (start, end, corruption, severity), got {segment!r}"
            )
        start, end, name, severity = segment
        index = _check_corruption(name)
        severity = _check_severity(severity)
        if not 0 <= start < end <= num_steps:
            raise ValueError(
                f"schedule segment {segment!r} must satisfy 0 <= start < end <= num_steps "
                f"= {num_steps}"
            )
        if np.any(corruption_ids[start:end] >= 0):
            raise ValueError(f"schedule segment {segment!r} overlaps an earlier one")
        corruption_ids[start:end] = index
        severities[start:end] = severity
    xs = np.empty((num_steps, batch_size) + x.shape[1:], np.float32)
    ys = np.empty((num_steps, batch_size), np.int32)
    for t in range(num_steps):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), t]))
        idx = rng.choice(x.shape[0], batch_size, replace=False)
        batch = x[idx]
        if corruption_ids[t] >= 0:
            noise_seed = int(rng.integers(2**31 - 1))
            batch = corrupt(batch, CORRUPTIONS[corruption_ids[t]], int(severities[t]), noise_seed)
        xs[t] = batch
        ys[t] = labels[idx]
    return DigitsStream(xs, ys, severities, corruption_ids)
