"""Why the router sent a token where it did, and what that saved: routing explanations.

Energy-aware adaptation (or pruning, or a budget) changes which experts a token's top-k picks.
These functions compare two routings of the *same* tokens -- a reference (e.g. the unadapted
router) and the one served -- from their router probabilities, all host-side NumPy:

* :func:`routing_changes`: per layer and expert, how many assignments were avoided (in the
  reference's top-k, not in the served one) and adopted (the reverse), and the energy per token
  of each at the experts' per-token costs: the saving the changes bought, expert by expert.
* :func:`explain_token`: one token's story in one line -- where it went, which experts it
  avoided, their probabilities before and after and what each would have cost.
* :func:`activation_shares`: the share of assignments each expert takes per layer (the
  heatmap of expert activation, before vs after).
* :func:`topk_agreement`: the share of tokens whose top-k set is the same under two routings
  (the router's stability over a long stream under continued adaptation).

Top-k ties are broken like ``lax.top_k`` (the lower expert index first); an expert with
probability 0 (pruned) takes no token, as in :func:`metattt.energy.costs.expected_energy`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "RoutingChanges",
    "activation_shares",
    "explain_token",
    "routing_changes",
    "topk_agreement",
]


def _assignments(probs: Any, top_k: int) -> np.ndarray:
    """(..., E) probabilities -> (..., E) bool: the experts in each token's top-k (stable order:
    the lower index wins a tie), without the zero-probability ones."""
    p = np.asarray(probs, np.float64)
    if not 1 <= top_k <= p.shape[-1]:
        raise ValueError(f"top_k must be in [1, {p.shape[-1]}], got {top_k}")
    order = np.argsort(-p, axis=-1, kind="stable")[..., :top_k]
    chosen = np.zeros(p.shape, bool)
    np.put_along_axis(chosen, order, True, axis=-1)
    return chosen & (p > 0)


def _costs(costs: Any, num_experts: int) -> np.ndarray:
    c = np.asarray(costs, np.float64).reshape(-1)
    if c.shape != (num_experts,):
        raise ValueError(f"costs must hold one value per expert ({num_experts}), got {c.shape}")
    return c


class RoutingChanges(NamedTuple):
    """How the served routing differs from the reference, per layer and expert.

    Attributes:
      avoided: (layers, E) assignments in the reference's top-k but not the served one.
      adopted: (layers, E) assignments in the served top-k but not the reference's.
      avoided_j_per_token: energy per token the avoided assignments would have cost (all
        layers), i.e. Σ avoided · c / tokens.
      adopted_j_per_token: energy per token the adopted assignments cost.
      tokens: tokens per layer.
    """

    avoided: np.ndarray
    adopted: np.ndarray
    avoided_j_per_token: float
    adopted_j_per_token: float
    tokens: int

    @property
    def saved_j_per_token(self) -> float:
        """The net energy per token the changes saved (negative: they cost energy)."""
        return self.avoided_j_per_token - self.adopted_j_per_token


def routing_changes(reference: Any, served: Any, top_k: int, costs: Any) -> RoutingChanges:
    """Compare two routings of the same tokens.

    Args:
      reference, served: router probabilities (layers, ..., E) of the same tokens, e.g. the
        MoE's ``aux["router_probs"]`` (layers, B, L, E) under two parameter sets.
      top_k: K of the routing.
      costs: (E,) per-token energy of each expert (e.g. a cost profile's ``joules_per_token``).

    Raises:
      ValueError: shapes that differ, a bad ``top_k`` or the wrong number of costs.
    """
    ref, srv = np.asarray(reference), np.asarray(served)
    if ref.shape != srv.shape or ref.ndim < 2:
        raise ValueError(
            f"reference and served must be one (layers, ..., E) shape, got {ref.shape} and "
            f"{srv.shape}"
        )
    c = _costs(costs, ref.shape[-1])
    before, after = _assignments(ref, top_k), _assignments(srv, top_k)
    flat = lambda a: a.reshape(a.shape[0], -1, a.shape[-1])
    avoided = flat(before & ~after).sum(1)
    adopted = flat(after & ~before).sum(1)
    tokens = flat(before).shape[1]
    return RoutingChanges(
        avoided,
        adopted,
        float((avoided * c).sum() / tokens),
        float((adopted * c).sum() / tokens),
        tokens,
    )


def explain_token(
    reference: Any, served: Any, top_k: int, costs: Any, *, unit: str = "J", scale: float = 1.0
) -> str:
    """One token's routing in one layer, in words: ``reference`` and ``served`` are its (E,)
    router probabilities. ``scale`` multiplies the costs for display in ``unit`` (e.g. 1e6
    and "µJ")."""
    ref, srv = np.asarray(reference, np.float64), np.asarray(served, np.float64)
    c = _costs(costs, ref.shape[-1]) * scale
    before, after = _assignments(ref, top_k), _assignments(srv, top_k)
    went = ", ".join(f"{e} ({c[e]:.3g} {unit})" for e in np.flatnonzero(after))
    avoided = [
        f"{e} (p {ref[e]:.2f} -> {srv[e]:.2f}; would have cost {c[e]:.3g} {unit})"
        for e in np.flatnonzero(before & ~after)
    ]
    saved = c[before].sum() - c[after].sum()
    return (
        f"routed to expert(s) {went}; "
        + (f"avoided {', '.join(avoided)}" if avoided else "the same experts as before")
        + f"; energy {saved:+.3g} {unit} saved"
    )


def activation_shares(probs: Any, top_k: int) -> np.ndarray:
    """(layers, ..., E) router probabilities -> (layers, E): each expert's share of the
    layer's assignments (rows sum to 1)."""
    chosen = _assignments(probs, top_k)
    counts = chosen.reshape(chosen.shape[0], -1, chosen.shape[-1]).sum(1).astype(np.float64)
    return counts / counts.sum(-1, keepdims=True)


def topk_agreement(a: Any, b: Any, top_k: int) -> float:
    """The share of tokens (over every layer) whose top-k sets under routings ``a`` and ``b``
    are equal."""
    sa, sb = _assignments(a, top_k), _assignments(b, top_k)
    if sa.shape != sb.shape:
        raise ValueError(f"routings of different shapes: {sa.shape} and {sb.shape}")
    return float(np.mean(np.all(sa == sb, axis=-1)))
