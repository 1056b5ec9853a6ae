"""Adaptation per token window (issue 15 item 7) as methods: ``<method>~w<W>`` for the router TTT
kinds (:data:`.registry.WINDOW_KINDS`: ``ttt``, ``energy_ttt/<λ>``, ``int8_ttt``,
``int8_energy_ttt/<λ>``), named in ``window.methods``.

Each served batch is read in causal chunks of W tokens (:func:`metattt.energy.serve_windows`):
chunk c is scored with the parameters adapted on chunks < c (of this batch and every earlier
one), then the router (and whatever ``ttt.params`` selects) takes ``ttt.steps`` steps on the
chunk's tokens of the first ``ttt.windows`` sequences -- after every chunk of every batch, where
the method without ``~`` adapts on whole sequences of every ``ttt.every``-th batch. Each chunk
is charged as a forward pass of (B, W) tokens (the dense layers of W-token sequences: the
attention over the earlier chunks, which a key-value cache would read, is not charged), each
adaptation step as ``1 + BACKWARD_FACTOR`` passes over (rows, W) tokens. Only the LM head:
a classifier predicts once per sequence, so its sequence has no per-token score to serve
prequentially.
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
def windowed(mcfg: moe.MoEConfig, adapt: Any, window: int, rows: int):
    """The jitted ``(params, inputs, targets, lam, mask, adapting=...) -> WindowServed`` of
    :func:`metattt.energy.serving.serve_stream`, compiled once per (model, window, rows)."""
    served = functools.partial(serve_windows, token_infer(mcfg), adapt, window=window, rows=rows)
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
        if head != "lm":
            raise ValueError(f"window.methods entry {name!r} needs the LM head, got {head!r}")
        if cfg.data.length % window:
            raise ValueError(f"window.methods entry {name!r}: W must divide data.length="
                             f"{cfg.data.length}")  # fmt: skip
