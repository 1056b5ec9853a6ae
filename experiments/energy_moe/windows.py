"""Adaptation per window (issue 15 item 7) as methods: ``<method>~w<W>`` for the router TTT
kinds (:data:`.registry.WINDOW_KINDS`: ``ttt``, ``energy_ttt/<λ>``, ``int8_ttt``,
``int8_energy_ttt/<λ>``), named in ``window.methods``.

LM: each served batch is read in causal chunks of W tokens (:func:`metattt.energy.serve_windows`,
``axis=1``): chunk c is scored with the parameters adapted on chunks < c (of this batch and every
earlier one), then the router (and whatever ``ttt.params`` selects) takes ``ttt.steps`` steps on
the chunk's tokens of the first ``ttt.windows`` sequences -- after every chunk of every batch,
where the method without ``~`` adapts on whole sequences of every ``ttt.every``-th batch. Each
chunk is charged as a forward pass of (B, W) tokens (the dense layers of W-token sequences: the
attention over the earlier chunks, which a key-value cache would read, is not charged), each
adaptation step as ``1 + BACKWARD_FACTOR`` passes over (rows, W) tokens.

Classifier (digits): its unit of prediction is an image, so a window is W consecutive *images*
of the stream batch (``axis=0``): window c is scored with the parameters from before its update,
then adapted on (its first min(``ttt.windows``, W) images) -- the same causality as the LM's
token windows. Each window is charged as a forward pass of (W, L) tokens, each adaptation step
as ``1 + BACKWARD_FACTOR`` passes over its (rows, L) tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from experiments.energy_moe import runtime
from experiments.energy_moe.registry import parse_method
from metattt.energy import serve_windows
from metattt.models import moe


def token_infer(mcfg: moe.MoEConfig):
    """``(params, inputs, targets, mask) -> (nll (B, L), assign (layers, B, L, E))``: each token's
    next-byte nats and its expert assignments (parameters with int8 experts too)."""
    apply = runtime.served_apply(mcfg)

    def infer(p, inputs, targets, mask):
        out = apply(p, inputs, expert_mask=mask)
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), -1)[..., 0]
        kept = ~out.aux["dropped"][..., None] if "dropped" in out.aux else True
        one_hot = jax.nn.one_hot(out.aux["expert_ids"], mcfg.num_experts, dtype=jnp.int32)
        return nll, jnp.sum(one_hot * kept, -2)

    return infer


@functools.lru_cache(maxsize=8)
def image_infer(mcfg: moe.MoEConfig):
    """``(params, inputs, targets, mask) -> (errors (B,), assign (layers, B, L, E))``: each
    image's 0/1 error and its tokens' expert assignments (parameters with int8 experts too)."""
    apply = runtime.served_apply(mcfg)

    def infer(p, inputs, targets, mask):
        out = apply(p, inputs, expert_mask=mask)
        wrong = (jnp.argmax(out.class_logits, axis=-1) != targets).astype(jnp.float32)
        kept = ~out.aux["dropped"][..., None] if "dropped" in out.aux else True
        one_hot = jax.nn.one_hot(out.aux["expert_ids"], mcfg.num_experts, dtype=jnp.int32)
        return wrong, jnp.sum(one_hot * kept, -2)

    return infer


def axis_of(mcfg: moe.MoEConfig) -> int:
    """1 (token windows) for the LM, 0 (image windows) for the classifier."""
    return 0 if mcfg.num_classes else 1


def adapt_rows(cfg, mcfg: moe.MoEConfig, window: int) -> int:
    """The rows each window's adaptation reads: ``ttt.windows`` sequences (LM), or the first
    min(``ttt.windows``, W) images of the window (classifier)."""
    return min(cfg.ttt.windows, window) if axis_of(mcfg) == 0 else cfg.ttt.windows


@functools.lru_cache(maxsize=8)
def windowed(mcfg: moe.MoEConfig, adapt: Any, window: int, rows: int):
    """The jitted ``(params, inputs, targets, lam, mask, adapting=...) -> WindowServed`` of
    :func:`metattt.energy.serving.serve_stream`, compiled once per (model, window, rows); token
    windows for the LM, image windows for the classifier (:func:`axis_of`)."""
    axis = axis_of(mcfg)
    infer = image_infer(mcfg) if axis == 0 else token_infer(mcfg)
    served = functools.partial(serve_windows, infer, adapt, window=window, rows=rows, axis=axis)
    return jax.jit(served, static_argnames="adapting")


def warm_up(fn, params: Any, inputs: Any, targets: Any, mask: Any) -> None:
    """Compile both programs (with and without adaptation) before the timed stream."""
    for adapting in (False, True):
        jax.block_until_ready(fn(params, inputs, targets, jnp.float32(0), mask, adapting=adapting))


def validate(cfg, head: str) -> None:
    """Raise ValueError for a ``window`` section that would fail later (absent: nothing)."""
    if "window" not in cfg:
        return
    for name in cfg.window.methods:
        window = parse_method(name).window
        if not window:
            raise ValueError(f"window.methods entries end in ~w<W>, got {name!r}")
        if head == "lm" and cfg.data.length % window:
            raise ValueError(f"window.methods entry {name!r}: W must divide data.length="
                             f"{cfg.data.length}")  # fmt: skip
        if head != "lm" and cfg.data.batch % window:
            raise ValueError(f"window.methods entry {name!r}: W (images) must divide "
                             f"data.batch={cfg.data.batch}")  # fmt: skip
