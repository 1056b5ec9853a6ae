"""Routing explanations (issue 15 item 8) of every method that adapts at test time but the
budgets (whose policy also changes top-k and the expert mask): the router TTT (``ttt``,
``energy_ttt``), its int8 versions and the expert-level methods, with any objective, scheduled
or not; all experts, trained top-k, each through its served model's router (LoRA, fast-weight or
int8 experts: the router probabilities of the served model, whose routing changes when the
router or, in later layers, the experts adapt).

Serving keeps the parameters at the middle of the stream and after the last adaptation
(:class:`Snapshots`). On the stream's last batch the router probabilities under the start (the
trained model as served), the middle and the final parameters (three diagnostic forward passes,
not charged) give, with :mod:`metattt.energy.explain`:

* the assignments the final router avoided and adopted per layer and expert vs the trained one,
  and the energy per token each would have cost / costs (``routing_changes``);
* each expert's share of the assignments before and after (``activation_shares``, the heatmap);
* the top-k agreement of trained vs middle, trained vs final and middle vs final routing: how far
  the router drifted and whether it settled under continued adaptation (``topk_agreement``);
* the token whose routing saved the most energy, in words (``explain_token``).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from experiments.energy_moe.registry import Method
from experiments.energy_moe.runtime import Runtime
from metattt.energy import activation_shares, explain_token, routing_changes, topk_agreement


def explains(method: Method) -> bool:
    """Whether serving ``method`` records routing explanations (it adapts; not a budget, not per
    token window: that path calls neither ``infer`` nor ``adapt``)."""
    return method.adapts and method.kind != "budget" and not method.window


class Snapshots:
    """Wraps serve_stream's ``infer`` and ``adapt`` to keep the parameters the stream's batch
    ``half`` is scored with (``mid``) and the latest ones (``last``)."""

    def __init__(self, infer, adapt, half: int):
        self._infer, self._adapt, self.half = infer, adapt, half
        self.t, self.mid, self.last = 0, None, None

    def infer(self, p, *args):
        if self.t == self.half:
            self.mid = p
        self.t += 1
        self.last = p
        return self._infer(p, *args)

    def adapt(self, p, *args):
        out = self._adapt(p, *args)
        self.last = out[0]
        return out


def explain(
    rt: Runtime, probe: Any, trained: Any, snaps: Snapshots, inputs: np.ndarray
) -> dict[str, Any]:
    """The explanations of one served stream on its last batch ``inputs`` (B, L); ``probe(params,
    inputs, mask)`` gives the served model's router probabilities, ``trained`` are its
    parameters at the start of the stream."""
    mask = jnp.ones((rt.mcfg.num_experts,), bool)
    k, c = rt.mcfg.top_k, rt.joules
    ref, mid, end = (np.asarray(probe(p, inputs, mask)) for p in (trained, snaps.mid, snaps.last))
    changes = routing_changes(ref, end, k, c)
    flat_ref, flat_end = ref.reshape(-1, ref.shape[-1]), end.reshape(-1, end.shape[-1])
    saved = [routing_changes(a[None], b[None], k, c).saved_j_per_token
             for a, b in zip(flat_ref, flat_end, strict=True)]  # fmt: skip
    best = int(np.argmax(saved))
    return {
        "avoided": changes.avoided.tolist(),
        "adopted": changes.adopted.tolist(),
        "avoided_uj_per_token": 1e6 * changes.avoided_j_per_token,
        "adopted_uj_per_token": 1e6 * changes.adopted_j_per_token,
        "saved_uj_per_token": 1e6 * changes.saved_j_per_token,
        "shares_before": activation_shares(ref, k).tolist(),
        "shares_after": activation_shares(end, k).tolist(),
        "agreement_mid": topk_agreement(ref, mid, k),
        "agreement_end": topk_agreement(ref, end, k),
        "agreement_mid_end": topk_agreement(mid, end, k),
        "token": explain_token(flat_ref[best], flat_end[best], k, c, unit="µJ", scale=1e6),
        "token_where": [int(i) for i in np.unravel_index(best, ref.shape[:-1])],
    }
