"""Pathfinder (Linsley et al., 2018; LRA's image task): are two marked dots joined by a path?

Generator. Every image, positive or negative, holds two main paths A and B and some shorter
distractor paths on a black H x W canvas (white 255 strokes). A path is a smooth random walk:
unit steps whose heading turns by a uniform angle in [-max_turn, max_turn] per step (the
curvature limit), rasterised by rounding dense samples of each step (so a solid path is an
8-connected chain of pixels) and thickened to ``thickness`` x ``thickness`` pixels. Two square
markers of ``marker_size`` pixels are drawn on path ends:

- positive (label 1): both ends of A;
- negative (label 0): one end of A and one end of B.

Both classes are built by the same draws; only the marker placement differs, and exactly half
the examples (``num // 2`` negatives) are positive, in a seeded random order. Every path keeps
a Chebyshev distance of at least ``clearance`` (>= 2) pixels from every other path and from
the other paths' marker squares (each main path reserves marker squares at both its ends,
marked or not), so no two paths touch, not even diagonally: on solid rendering the label is
exactly "the two markers are in the same 8-connected component of the non-zero pixels". A
placement that fails is re-drawn (a step up to 16 times, a path up to 64 times, an image up to
``max_image_tries`` times). Markers are at least ``min_marker_distance`` pixels apart
(Euclidean), so a positive is never decided by proximity alone. ``dashed=True`` draws the
paths as dashes (``dash`` = steps on, steps off), as the original paddle images; the label
is unchanged but is no longer pixel connectivity.

Difficulty per example: the main paths' length in steps and the number of distractors; both
may be ranges drawn per example, and a test split can use longer paths or more distractors
than training (LRA's easy / intermediate / hard splits differ in contour length).

Sequences: :func:`to_sequences` flattens (N, H, W) uint8 images row by row into (N, H W) int32
pixel values 0..255, the input LRA feeds its models.

Official layout (what LRA's ``data/pathfinder.py`` reads): a folder with ``metadata/<k>.npy``
files that are plain text despite the suffix, one image per line,
``<image folder> <file name> <index> <label> [more fields]``, and grayscale PNGs at
``<root>/<image folder>/<file name>``; LRA skips empty image files. :func:`save_pathfinder`
writes that layout (``imgs/<k>/sample_<j>.png``, extra fields: path length and distractor
count) and :func:`load_pathfinder` reads it.

Shapes: N images, H x W pixels.

Example:
    >>> data = generate_pathfinder(200, seed=0, size=(32, 32), path_length=(12, 20))
    >>> data.images.shape, data.labels.mean()            # (200, 32, 32), 0.5
    >>> seq = to_sequences(data.images)                  # (200, 1024) int32 in 0..255
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "Pathfinder",
    "PathfinderFolder",
    "generate_pathfinder",
    "load_pathfinder",
    "save_pathfinder",
    "to_sequences",
]

_STEP_TRIES, _PATH_TRIES = 16, 64
_SAMPLES_PER_STEP = 5  # dense samples per unit step: consecutive rounded pixels stay adjacent


class Pathfinder(NamedTuple):
    """N generated Pathfinder images.

    Attributes:
        images: (N, H, W) uint8, 0 background, 255 strokes and markers.
        labels: (N,) int32, 1 iff the markers are on the same path.
        markers: (N, 2, 2) int32 (row, col) centres of the two markers.
        path_length: (N,) int32 steps of each main path (difficulty).
        num_distractors: (N,) int32 distractor paths (difficulty).
    """

    images: np.ndarray
    labels: np.ndarray
    markers: np.ndarray
    path_length: np.ndarray
    num_distractors: np.ndarray


class PathfinderFolder(NamedTuple):
    """Images read from the official layout.

    Attributes:
        images: (N, H, W) uint8 grayscale.
        labels: (N,) int32.
        paths: N image paths, in metadata order.
    """

    images: np.ndarray
    labels: np.ndarray
    paths: tuple[pathlib.Path, ...]


class _Failed(Exception):
    pass


def _square(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of a size x size square anchored so that size 1 is the pixel itself."""
    off = np.arange(size) - (size - 1) // 2
    dr, dc = np.meshgrid(off, off, indexing="ij")
    return dr.ravel(), dc.ravel()


def _stamp(rows: np.ndarray, cols: np.ndarray, square: tuple[np.ndarray, np.ndarray]):
    return (rows[:, None] + square[0][None]).ravel(), (cols[:, None] + square[1][None]).ravel()


def _walk(
    rng: np.random.Generator,
    steps: int,
    blocked: np.ndarray,
    margin: int,
    max_turn: float,
    pen: tuple[np.ndarray, np.ndarray],
    marker: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """A random walk avoiding ``blocked``: per-step pixels, its pixel mask, its two ends."""
    h, w = blocked.shape
    lo_r, hi_r, lo_c, hi_c = margin, h - 1 - margin, margin, w - 1 - margin

    def free(rows, cols):
        return not blocked[rows, cols].any()

    for _ in range(_PATH_TRIES):
        p = np.array([rng.uniform(lo_r, hi_r), rng.uniform(lo_c, hi_c)])
        heading = rng.uniform(0.0, 2.0 * math.pi)
        start = np.rint(p).astype(np.int64)
        if marker is not None and not free(*_stamp(start[:1], start[1:], marker)):
            continue
        pieces = [_stamp(start[:1], start[1:], pen)]
        if not free(*pieces[0]):
            continue
        ok = True
        for _ in range(steps):
            for _ in range(_STEP_TRIES):
                turn = heading + rng.uniform(-max_turn, max_turn)
                q = p + np.array([math.sin(turn), math.cos(turn)])
                if not (lo_r <= q[0] <= hi_r and lo_c <= q[1] <= hi_c):
                    continue
                t = np.linspace(0.0, 1.0, _SAMPLES_PER_STEP)[1:, None]
                pts = np.rint(p[None] + t * (q - p)[None]).astype(np.int64)
                piece = _stamp(pts[:, 0], pts[:, 1], pen)
                if free(*piece):
                    pieces.append(piece)
                    p, heading = q, turn
                    break
            else:
                ok = False
                break
        end = np.rint(p).astype(np.int64)
        if not ok or (marker is not None and not free(*_stamp(end[:1], end[1:], marker))):
            continue
        mask = np.zeros_like(blocked)
        for rows, cols in pieces:
            mask[rows, cols] = True
        if marker is not None:
            for e in (start, end):
                mask[_stamp(e[:1], e[1:], marker)] = True
        return pieces, mask, np.stack([start, end])
    raise _Failed


def _one_image(
    rng: np.random.Generator,
    label: int,
    size: tuple[int, int],
    steps: int,
    distractors: int,
    distractor_length: int,
    max_turn: float,
    thickness: int,
    marker_size: int,
    clearance: int,
    min_marker_distance: float,
    dashed: bool,
    dash: tuple[int, int],
):
    from scipy import ndimage  # here, not at the top: ~0.3 s for every `import attd`

    h, w = size
    pen, marker = _square(thickness), _square(marker_size)
    margin = max(marker_size, thickness) // 2 + 1
    grow = np.ones((2 * clearance - 1, 2 * clearance - 1), bool)
    blocked = np.zeros((h, w), bool)
    paths = []
    for k in range(2 + distractors):
        main = k < 2
        length = steps if main else distractor_length
        pieces, mask, ends = _walk(
            rng, length, blocked, margin, max_turn, pen, marker if main else None
        )
        blocked |= ndimage.binary_dilation(mask, grow)
        paths.append((pieces, mask, ends))
    (_, _, ends_a), (_, _, ends_b) = paths[0], paths[1]
    j = int(rng.integers(2))
    first = ends_a[j]
    second = ends_a[1 - j] if label else ends_b[int(rng.integers(2))]
    if np.hypot(*(first - second).astype(float)) < min_marker_distance:
        raise _Failed
    image = np.zeros((h, w), np.uint8)
    period = dash[0] + dash[1]
    for pieces, mask, _ in paths:
        if not dashed:
            image[mask] = 255
            continue
        for i, (rows, cols) in enumerate(pieces):
            if i % period < dash[0]:
                image[rows, cols] = 255
    for e in (first, second):
        image[_stamp(e[:1], e[1:], marker)] = 255
    return image, np.stack([first, second]).astype(np.int32)


def _range(value: int | Sequence[int], name: str, low: int) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if not low <= lo <= hi:
        raise ValueError(f"{name} must be an int >= {low} or a range (lo, hi), got {value!r}")
    return int(lo), int(hi)


def generate_pathfinder(
    num: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (32, 32),
    path_length: int | Sequence[int] = 14,
    num_distractors: int | Sequence[int] = 3,
    distractor_length: int = 5,
    max_turn: float = math.pi / 6,
    thickness: int = 1,
    marker_size: int = 3,
    clearance: int = 2,
    min_marker_distance: float = 5.0,
    dashed: bool = False,
    dash: tuple[int, int] = (2, 1),
    max_image_tries: int = 200,
) -> Pathfinder:
    """``num`` Pathfinder images, exactly half positive, deterministic given ``seed``.

    Args:
        num: N.
        seed: seeds the label order and each image (image i from ``(seed, i)``).
        size: (H, W).
        path_length: steps of each main path, or an inclusive range drawn per image.
        num_distractors: distractor paths, or an inclusive range drawn per image.
        distractor_length: steps of each distractor.
        max_turn: largest heading change per step, radians (the curvature limit).
        thickness: stroke width in pixels.
        marker_size: side of the square markers in pixels.
        clearance: smallest Chebyshev distance between different paths, >= 2.
        min_marker_distance: smallest Euclidean distance between the two markers.
        dashed: draw dashes instead of solid strokes.
        dash: (steps drawn, steps skipped) of a dash pattern.
        max_image_tries: attempts per image before giving up.

    Returns:
        A :class:`Pathfinder`.

    Raises:
        ValueError: a bad argument, or an image that cannot be placed in ``max_image_tries``
            attempts (too many or too long paths for the canvas).
    """
    if not isinstance(num, int | np.integer) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    h, w = size
    if min(h, w) < 8:
        raise ValueError(f"size must be at least (8, 8), got {size!r}")
    steps_range = _range(path_length, "path_length", 1)
    distractor_range = _range(num_distractors, "num_distractors", 0)
    if distractor_length < 1:
        raise ValueError(f"distractor_length must be >= 1, got {distractor_length}")
    if not 0.0 <= max_turn <= math.pi:
        raise ValueError(f"max_turn must be in [0, pi], got {max_turn}")
    if thickness < 1 or marker_size < 1:
        raise ValueError(f"thickness and marker_size must be >= 1, got {thickness}, {marker_size}")
    if clearance < 2:
        raise ValueError(f"clearance must be >= 2 (no touching paths), got {clearance}")
    if len(dash) != 2 or dash[0] < 1 or dash[1] < 0:
        raise ValueError(f"dash must be (on >= 1, off >= 0), got {dash!r}")
    # num // 2 negatives, the rest positive, in a seeded random order.
    labels = np.random.default_rng(seed).permutation(np.arange(num) >= num // 2).astype(np.int32)
    images = np.zeros((num, h, w), np.uint8)
    markers = np.zeros((num, 2, 2), np.int32)
    lengths = np.zeros((num,), np.int32)
    counts = np.zeros((num,), np.int32)
    for i in range(num):
        rng = np.random.default_rng([int(seed), i])
        lengths[i] = rng.integers(steps_range[0], steps_range[1] + 1)
        counts[i] = rng.integers(distractor_range[0], distractor_range[1] + 1)
        for _ in range(max_image_tries):
            try:
                images[i], markers[i] = _one_image(
                    rng, int(labels[i]), (h, w), int(lengths[i]), int(counts[i]),
                    distractor_length, max_turn, thickness, marker_size, clearance,
                    min_marker_distance, dashed, tuple(dash),
                )  # fmt: skip
                break
            except _Failed:
                continue
        else:
            raise ValueError(
                f"num_distractors / path_length: image {i} could not be placed in "
                f"{max_image_tries} tries on a {h}x{w} canvas"
            )
    return Pathfinder(images, labels, markers, lengths, counts)


def to_sequences(images: np.ndarray) -> np.ndarray:
    """(N, H, W) pixel values -> (N, H W) int32 sequences in 0..255 (row-major).

    Float images in [0, 1] are scaled by 255 and rounded; integer images are kept.

    Raises:
        ValueError: not (N, H, W), or values outside the range.
    """
    x = np.asarray(images)
    if x.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError("images: float images must lie in [0, 1]")
        x = np.rint(x * 255.0)
    elif x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError("images: integer images must lie in 0..255")
    return x.reshape(x.shape[0], -1).astype(np.int32)


def save_pathfinder(
    root: str | pathlib.Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    extra: Sequence[Sequence[int]] | None = None,
    per_folder: int = 1000,
) -> None:
    """Write images and labels in the official layout (see the module docstring).

    Args:
        root: the folder (e.g. ``pathfinder32/curv_baseline``); created if missing.
        images: (N, H, W) uint8.
        labels: (N,) 0 / 1.
        extra: per image, more integer fields appended to its metadata line.
        per_folder: images per ``imgs/<k>`` folder and per ``metadata/<k>.npy`` file.
    """
    from PIL import Image

    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W) uint8, got {images.shape} {images.dtype}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    root = pathlib.Path(root)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for k in range(math.ceil(images.shape[0] / per_folder)):
        folder = root / "imgs" / str(k)
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for j in range(k * per_folder, min((k + 1) * per_folder, images.shape[0])):
            name = f"sample_{j}.png"
            Image.fromarray(images[j]).save(folder / name)
            fields = [f"imgs/{k}", name, str(j), str(int(labels[j]))]
            fields += [str(int(v)) for v in (extra[j] if extra is not None else ())]
            lines.append(" ".join(fields))
        (root / "metadata" / f"{k}.npy").write_text("\n".join(lines) + "\n")


def load_pathfinder(root: str | pathlib.Path) -> PathfinderFolder:
    """Read the official layout: ``metadata/*.npy`` (text) listing PNG paths and labels.

    Metadata files are read in numeric order of their stem (``0.npy, 1.npy, ..., 10.npy``);
    empty image files are skipped, as LRA does.

    Raises:
        ValueError: no metadata, metadata listing no image, a malformed line, a label other
            than 0 or 1, a missing or unreadable (e.g. truncated) image, or images of
            different sizes; the message names the file.
    """
    from PIL import Image

    root = pathlib.Path(root)
    metas = sorted(
        (root / "metadata").glob("*.npy"),
        key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem),
    )
    if not metas:
        raise ValueError(f"root: no metadata/*.npy under {root}")
    images, labels, paths = [], [], []
    for meta in metas:
        for n, line in enumerate(meta.read_text().splitlines()):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4 or not fields[3].lstrip("-").isdigit():
                raise ValueError(f"root: {meta} line {n + 1} is not '<dir> <file> <i> <label>'")
            if fields[3] not in ("0", "1"):
                raise ValueError(f"root: {meta} line {n + 1}: label {fields[3]} is not 0 or 1")
            path = root / fields[0] / fields[1]
            if not path.is_file():
                raise ValueError(f"root: {meta} line {n + 1} names a missing image {path}")
            if path.stat().st_size == 0:
                continue
            try:
                with Image.open(path) as img:
                    images.append(np.asarray(img.convert("L"), np.uint8))
            except (OSError, SyntaxError) as err:  # PIL: truncated or not an image
                raise ValueError(f"root: image {path} is unreadable ({err})") from None
            labels.append(int(fields[3]))
            paths.append(path)
    if not images:
        raise ValueError(f"root: the metadata under {root / 'metadata'} lists no image")
    if len({im.shape for im in images}) > 1:
        raise ValueError(f"root: images of different sizes under {root}")
    stacked = np.stack(images) if images else np.zeros((0, 0, 0), np.uint8)
    return PathfinderFolder(stacked, np.array(labels, np.int32), tuple(paths))
