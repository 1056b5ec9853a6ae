"""The language-model task: English docs (``pydoc_data``) -> Python source, scored in bits/char.

A byte-level MoE LM is trained on the English help topics (90% of the topics, seeded) and then
serves windows of every top-level module of the standard library; the held-out topics measure
the model's in-domain bits/char, the size of the shift's baseline.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from experiments.energy_moe import runtime
from metattt.data import text_corpora as tc
from metattt.models import moe

TEST_SEED = 10_000  # stream windows come from seeds no training batch uses
VALID_SEED = 20_000  # the validation windows' offsets (then filtered: see validation_stream)
MAX_DRAWS = 100  # rounds of offset draws before validation_stream gives up


class Streams(NamedTuple):
    """Byte streams: ``train`` and ``heldout`` English docs (disjoint topics), ``shifted`` code."""

    train: np.ndarray
    heldout: np.ndarray
    shifted: np.ndarray


def model_config(cfg, top_k: int | None = None) -> moe.MoEConfig:
    """The byte-level MoE language model."""
    return runtime.model_config(cfg, top_k)


def validate_data(cfg) -> None:
    """Raise ValueError for data values that would fail later."""
    if cfg.data.length < 2 or cfg.data.batch < 1 or cfg.data.stream_batches < 1:
        raise ValueError("data.length must be >= 2, data.batch and data.stream_batches >= 1")
    if cfg.data.heldout_windows < 1 or cfg.data.heldout_windows % cfg.data.batch:
        raise ValueError(
            f"data.heldout_windows must be a positive multiple of data.batch={cfg.data.batch}"
        )


def load_streams(seed: int) -> Streams:
    """Docs split by topic (90/10, seeded) and every top-level stdlib module as the shift."""
    _, names, labels = tc.list_documents("doc_vs_code")
    docs = [n for n, label in zip(names, labels, strict=True) if label == 0]
    code = [n for n, label in zip(names, labels, strict=True) if label == 1]
    train_idx, held_idx = tc.split_documents([0] * len(docs), (0.9, 0.1), seed=seed)
    return Streams(
        tc.concat_documents([docs[i] for i in train_idx]),
        tc.concat_documents([docs[i] for i in held_idx]),
        tc.concat_documents(code),
    )


def shifted_stream(cfg, streams: Streams, seed: int) -> tc.LMWindows:
    """(S·B, L) windows of code at seeded random offsets (S stream batches of B)."""
    n = cfg.data.stream_batches * cfg.data.batch
    return tc.lm_windows(streams.shifted, cfg.data.length, n, seed=TEST_SEED + seed)


def validation_stream(cfg, seed: int, batches: int) -> tc.LMWindows:
    """(batches·B, L) windows of code that share no byte with any window of the seed's test
    stream (:func:`shifted_stream`, unchanged): offsets drawn with seed ``VALID_SEED + seed``,
    those whose L + 1 bytes (inputs and targets) touch a test window's dropped. Disjoint in
    position, not in content: the same modules, so the same shift (text repeated verbatim
    elsewhere in the corpus may repeat).

    Raises:
        ValueError: too few offsets left after :data:`MAX_DRAWS` rounds of draws.
    """
    streams = load_streams(seed)
    data, span = streams.shifted, cfg.data.length + 1
    test = shifted_stream(cfg, streams, seed)
    edges = np.zeros(data.size + 1, np.int64)  # +1 where a test window starts, -1 past its end
    np.add.at(edges, test.start, 1)
    np.add.at(edges, test.start + span, -1)
    read = np.concatenate([[0], np.cumsum(np.cumsum(edges)[:-1] > 0)])  # test bytes before i
    rng, n, starts = np.random.default_rng(VALID_SEED + seed), batches * cfg.data.batch, []
    for _ in range(MAX_DRAWS):
        draw = rng.integers(0, data.size - span + 1, size=n, dtype=np.int64)
        starts.extend(draw[read[draw + span] == read[draw]][: n - len(starts)])
        if len(starts) == n:
            index = np.asarray(starts)[:, None] + np.arange(span)[None, :]
            windows = data[index].astype(np.int32) + 1
            return tc.LMWindows(windows[:, :-1], windows[:, 1:], np.asarray(starts))
    raise ValueError(f"fewer than {n} validation windows of {span} bytes outside the test stream")


def doc_batches(cfg, seed: int, streams: Streams):
    """``first -> stacked (inputs, targets)`` windows of the training docs for one call."""
    chunk, batch, length = cfg.train.steps_per_call, cfg.train.batch, cfg.data.length
    shape = (chunk, batch, length)

    def batches(first: int):
        call = first // chunk
        w = tc.lm_windows(streams.train, length, chunk * batch, seed=seed * 100_003 + call)
        return w.inputs.reshape(shape), w.targets.reshape(shape)

    return batches


def fit(cfg, rt: runtime.Runtime, seed: int, streams: Streams, run_dir: str):
    """Train (resumable in ``run_dir``), then measure the held-out docs' bits/char (the size of
    the shift's baseline)."""
    batches = doc_batches(cfg, seed, streams)
    params, loss, seconds = runtime.pretrain(cfg, rt, seed, batches, run_dir)
    info = {"train_loss_nats": loss, "train_seconds": seconds}
    nats = runtime.mean_score(rt, runtime.local(rt, params), *heldout_batches(cfg, streams, seed))
    info["heldout_doc_bpc"] = nats / math.log(2)
    return params, info


def heldout_batches(cfg, streams: Streams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` (N, B, L) windows of the held-out docs, in the stream's batch shape
    (so nothing compiles again)."""
    held = tc.lm_windows(streams.heldout, cfg.data.length, cfg.data.heldout_windows, seed=seed)
    shape = (-1, cfg.data.batch, cfg.data.length)
    return held.inputs.reshape(shape), held.targets.reshape(shape)


def prepare(cfg, rt: runtime.Runtime, seed: int, workdir: str) -> tuple[Any, Any, dict, Any]:
    """``(params, shifted stream, training info, held-out doc batches)`` of one seed (trained
    once, then cached); the held-out batches are the in-distribution reference."""
    streams = load_streams(seed)
    params, info = runtime.trained_params(
        rt, seed, workdir, lambda run_dir: fit(cfg, rt, seed, streams, run_dir)
    )
    return params, shifted_stream(cfg, streams, seed), info, heldout_batches(cfg, streams, seed)
