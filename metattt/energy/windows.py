"""Window-level test-time adaptation inside each served batch (issue 15 item 7).

Token windows (``axis=1``, a sequence model that scores every token): a batch of B sequences of
L tokens is read in C = L / W causal chunks of W tokens. Chunk c is
scored with the parameters θ_c, then the model adapts on it (``adapt`` on the chunk's tokens of
the first ``rows`` sequences) to θ_{c+1}, which scores chunk c + 1: prequential inside the
sequence, so no token's score uses an update made after it was read. The chunks are one
``lax.scan`` (one compilation per W); a causal model's prediction at a token reads only the
tokens up to it, so each chunk is scored by a forward pass over the whole sequence at θ_c,
keeping only the chunk's tokens (the same value as a pass over its prefix, at one static shape).

Sequence windows (``axis=0``, a model that predicts once per sequence, e.g. a classifier of
images read as token sequences): the batch's B sequences are read in C = B / W windows of W
consecutive sequences. Window c is scored with θ_c by a forward pass over its own W sequences
(the sequences are independent under dropless routing), then the model adapts on the first
``rows`` of them to θ_{c+1}: no sequence's score uses an update made on it or after it.

The model enters as functions: ``token_infer(params, inputs, targets, mask) -> (scores,
assign (layers, B, L, E))``, the scores (B, L) per token (``axis=1``) or (B,) per sequence
(``axis=0``) and the expert assignments (0/1, or counts);
``adapt(params, tokens (rows, W) or (rows, L), lam, mask) -> (params, stats)``, e.g. the compiled
:func:`metattt.energy.EnergyTTT.adapt` with ``stats`` its per-step
:class:`metattt.energy.RoutingStats`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class WindowServed(NamedTuple):
    """One batch served window by window.

    Attributes:
        params: θ_C, the parameters after the adaptation on the last chunk.
        scores: (C,) each chunk's mean score (per token or per sequence), at the parameters
            before its adaptation.
        counts: (C, layers, E) each chunk's expert assignments in its scoring pass.
        stats: the adaptation's per-step statistics, stacked over chunks (leading axis C); None
            when not adapting.
    """

    params: Any
    scores: jax.Array
    counts: jax.Array
    stats: Any


def check_window(length: int, window: int, what: str = "the sequence length") -> int:
    """C = ``length`` / ``window``, or a one-line ValueError when W does not divide it."""
    if not isinstance(window, int) or window < 1 or length % window:
        raise ValueError(f"window must be a positive divisor of {what} {length}, "
                         f"got {window!r}")  # fmt: skip
    return length // window


def serve_windows(
    token_infer: Callable[..., tuple[jax.Array, jax.Array]],
    adapt: Callable[..., tuple[Any, Any]],
    params: Any,
    inputs: jax.Array,
    targets: jax.Array,
    lam: float | jax.Array,
    mask: jax.Array,
    *,
    window: int,
    rows: int,
    adapting: bool = True,
    axis: int = 1,
) -> WindowServed:
    """Serve one (B, L) batch in chunks of ``window`` tokens (``axis=1``) or sequences
    (``axis=0``), adapting after each (jittable with ``window``, ``rows``, ``adapting`` and
    ``axis`` static).

    Args:
      token_infer, adapt: the model's functions (module docstring).
      params: θ_0, the parameters the batch arrives with.
      inputs: (B, L) tokens; targets: what ``token_infer`` scores against.
      lam, mask: λ_energy and the (E,) expert mask of every adaptation and scoring pass.
      window: W, a divisor of L (``axis=1``) or of B (``axis=0``).
      rows: the adaptation reads the chunk of the first ``rows`` sequences (1 <= rows <= B;
        ``axis=0``: the first ``rows`` sequences of the window, 1 <= rows <= W).
      adapting: False scores every chunk at θ_0 (the same program without the steps).
      axis: 1, windows of tokens; 0, windows of sequences (module docstring).

    Returns:
      A :class:`WindowServed`; ``mean(scores)`` is the batch's mean score.

    Raises:
      ValueError: inputs not (B, L), an axis not 0 or 1, a window that does not divide L (or
        B), or rows out of range.
    """
    if jnp.ndim(inputs) != 2:
        raise ValueError(f"inputs must have shape (B, L), got {jnp.shape(inputs)}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (sequence windows) or 1 (token windows), got {axis!r}")
    batch, length = jnp.shape(inputs)
    if axis == 1:
        chunks, most = check_window(length, window), batch
    else:
        chunks, most = check_window(batch, window, "the batch"), window
    if not 1 <= rows <= most:
        raise ValueError(f"rows must be in [1, {most}], got {rows}")

    def tokens_body(p, c):
        start = c * window
        scores, assign = token_infer(p, inputs, targets, mask)
        score = jnp.mean(lax.dynamic_slice_in_dim(scores, start, window, axis=1))
        counts = jnp.sum(lax.dynamic_slice_in_dim(assign, start, window, axis=2), axis=(1, 2))
        stats = None
        if adapting:
            tokens = lax.dynamic_slice_in_dim(inputs[:rows], start, window, axis=1)
            p, stats = adapt(p, tokens, lam, mask)
        return p, (score, counts, stats)

    def sequences_body(p, c):
        xs = lax.dynamic_slice_in_dim(inputs, c * window, window, axis=0)
        ys = lax.dynamic_slice_in_dim(targets, c * window, window, axis=0)
        scores, assign = token_infer(p, xs, ys, mask)
        score, counts, stats = jnp.mean(scores), jnp.sum(assign, axis=(1, 2)), None
        if adapting:
            p, stats = adapt(p, xs[:rows], lam, mask)
        return p, (score, counts, stats)

    body = tokens_body if axis == 1 else sequences_body

    params, (scores, counts, stats) = lax.scan(body, params, jnp.arange(chunks))
    return WindowServed(params, scores, counts, stats)
