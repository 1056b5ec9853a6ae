"""The digits-C task: clean 8x8 digits -> a stream of corrupted ones, scored by error rate.

A MoE transformer reads each digit as 64 pixel tokens (intensities quantised to 0..16,
vocabulary 17), classifies the mean-pooled final states, and is trained on the clean train
split. It then serves test digits that cycle through :mod:`metattt.data.digits_c` corruptions
at several severities; adaptation is label-free TENT (the entropy of the class predictions).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from experiments.energy_moe import lm, runtime
from metattt.data import digits_c
from metattt.models import moe

LEVELS = 17  # digits pixels are integers 0..16: one token per intensity
PIXELS = 64  # 8 x 8 tokens per image
NUM_CLASSES = 10


class Examples(NamedTuple):
    """Images as token sequences: ``inputs`` (N, 64) int32, ``targets`` (N,) int32 labels."""

    inputs: np.ndarray
    targets: np.ndarray


def model_config(cfg, top_k: int | None = None) -> moe.MoEConfig:
    """The MoE classifier: pixel-token vocabulary, 64 positions, a 10-way head."""
    return runtime.model_config(cfg, top_k, vocab_size=LEVELS, num_classes=NUM_CLASSES)


def validate_data(cfg) -> None:
    """Raise ValueError for data values that would fail later."""
    d = cfg.data
    if d.length != PIXELS:
        raise ValueError(f"data.length must be {PIXELS} (one token per pixel), got {d.length}")
    if d.batch < 1 or not 0 < d.test_fraction < 1:
        raise ValueError("need data.batch >= 1 and data.test_fraction in (0, 1)")
    if not d.corruptions or not d.severities:
        raise ValueError("data.corruptions and data.severities must be non-empty")
    for name in d.corruptions:
        if name not in digits_c.CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; known: {list(digits_c.CORRUPTIONS)}")
    if any(not 1 <= s <= 5 for s in d.severities):
        raise ValueError(f"data.severities must be in 1..5, got {tuple(d.severities)}")
    segments = len(d.corruptions) * len(d.severities)
    if d.stream_batches < segments or d.stream_batches % segments:
        raise ValueError(
            f"data.stream_batches must be a positive multiple of the {segments} "
            f"(corruption, severity) segments, got {d.stream_batches}"
        )


def tokens(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) images in [0, 1] -> (N, 64) int32 tokens ``round(16 x)`` (row-major)."""
    images = np.asarray(images)
    return (
        np.rint(np.clip(images, 0.0, 1.0) * (LEVELS - 1)).astype(np.int32).reshape(len(images), -1)
    )


def schedule(cfg, batches: int | None = None) -> list[tuple[int, int, str, int]]:
    """Equal segments of ``batches`` (None: ``data.stream_batches``) cycling through every
    (corruption, severity) pair, severity-major."""
    d = cfg.data
    pairs = [(c, s) for s in d.severities for c in d.corruptions]
    length = (batches or d.stream_batches) // len(pairs)
    return [(i * length, (i + 1) * length, c, int(s)) for i, (c, s) in enumerate(pairs)]


def shifted_stream(cfg, x_test: np.ndarray, y_test: np.ndarray, seed: int) -> Examples:
    """(S·B,) corrupted test images as tokens, per :func:`schedule` (seeded)."""
    s = digits_c.make_stream(
        x_test,
        y_test,
        schedule(cfg),
        num_steps=cfg.data.stream_batches,
        batch_size=cfg.data.batch,
        seed=lm.TEST_SEED + seed,
    )
    return Examples(tokens(s.x.reshape(-1, *s.x.shape[2:])), s.y.reshape(-1))


def validation_stream(cfg, seed: int, batches: int) -> Examples:
    """(batches·B,) corrupted images of the seed's train split, per :func:`schedule` over
    ``batches`` (seed ``lm.VALID_SEED + seed``): never an image of the test split, which alone
    feeds the test stream; but the model was trained on their clean versions, so the validation
    errors are lower than the test's -- the tuning compares points on the same stream, by their
    change vs the trained model."""
    x_tr, y_tr, _, _ = digits_c.load_digits_split(seed, cfg.data.test_fraction)
    s = digits_c.make_stream(x_tr, y_tr, schedule(cfg, batches), num_steps=batches,
                             batch_size=cfg.data.batch, seed=lm.VALID_SEED + seed)  # fmt: skip
    return Examples(tokens(s.x.reshape(-1, *s.x.shape[2:])), s.y.reshape(-1))


def digit_batches(cfg, seed: int, x: np.ndarray, y: np.ndarray):
    """``first -> stacked (tokens, labels)`` of clean digits for one call (with replacement).

    The draw of call ``c`` uses its own generator, seeded ``(seed, c)``, so a resumed run
    draws what an uninterrupted one would.
    """
    chunk, batch = cfg.train.steps_per_call, cfg.train.batch
    data = tokens(x)

    def batches(first: int):
        rng = np.random.default_rng((seed, first // chunk))
        idx = rng.integers(0, len(data), size=(chunk, batch))
        return data[idx], y[idx]

    return batches


def clean_error(cfg, rt: runtime.Runtime, params: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Error rate on clean images, in batches of the stream's shape (no new compilation)."""
    return runtime.mean_score(rt, params, *clean_batches(cfg, x, y))


def clean_batches(cfg, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens (N, B, 64), labels (N, B))``: whole batches of clean images."""
    b = cfg.data.batch
    n = len(x) // b * b
    return tokens(x[:n]).reshape(-1, b, PIXELS), y[:n].reshape(-1, b)


def prepare(cfg, rt: runtime.Runtime, seed: int, workdir: str) -> tuple[Any, Examples, dict, Any]:
    """``(params, corrupted stream, training info, clean test batches)`` of one seed (trained
    once, then cached); the clean batches are the in-distribution reference."""
    x_tr, y_tr, x_te, y_te = digits_c.load_digits_split(seed, cfg.data.test_fraction)

    def fit(run_dir: str):
        batches = digit_batches(cfg, seed, x_tr, y_tr)
        params, loss, seconds = runtime.pretrain(cfg, rt, seed, batches, run_dir)
        info = {
            "train_loss_nats": loss,
            "train_seconds": seconds,
            "clean_test_error": clean_error(cfg, rt, runtime.local(rt, params), x_te, y_te),
        }
        return params, info

    params, info = runtime.trained_params(rt, seed, workdir, fit)
    return params, shifted_stream(cfg, x_te, y_te, seed), info, clean_batches(cfg, x_te, y_te)
