"""Routing explanations (metattt.energy.explain) against per-token Python loops."""

import jax
import numpy as np
import pytest

from metattt.energy import explain

LAYERS, B, L, E, K = 2, 3, 5, 6, 2


def _probs(seed, pruned=()):
    p = np.random.default_rng(seed).dirichlet(np.ones(E), size=(LAYERS, B, L))
    p[..., list(pruned)] = 0.0
    return p / p.sum(-1, keepdims=True)


def _topk_set(p, k):
    """A token's top-k, ties to the lower index, zero-probability experts left out."""
    ranked = sorted(range(len(p)), key=lambda e: (-p[e], e))[:k]
    return {e for e in ranked if p[e] > 0}


def test_routing_changes_match_a_loop_over_tokens():
    ref, srv = _probs(0), _probs(1, pruned=(4,))
    costs = np.random.default_rng(2).uniform(0.1, 2.0, size=E)
    got = explain.routing_changes(ref, srv, K, costs)
    avoided, adopted = np.zeros((LAYERS, E)), np.zeros((LAYERS, E))
    for layer in range(LAYERS):
        for b in range(B):
            for t in range(L):
                before = _topk_set(ref[layer, b, t], K)
                after = _topk_set(srv[layer, b, t], K)
                for e in before - after:
                    avoided[layer, e] += 1
                for e in after - before:
                    adopted[layer, e] += 1
    np.testing.assert_array_equal(got.avoided, avoided)
    np.testing.assert_array_equal(got.adopted, adopted)
    assert got.tokens == B * L
    np.testing.assert_allclose(got.avoided_j_per_token, (avoided * costs).sum() / (B * L))
    np.testing.assert_allclose(
        got.saved_j_per_token, ((avoided - adopted) * costs).sum() / (B * L), rtol=1e-12
    )
    assert got.adopted[:, 4].sum() == 0  # a pruned expert is never adopted
    same = explain.routing_changes(ref, ref, K, costs)
    assert same.avoided.sum() == 0 and same.saved_j_per_token == 0.0


def test_ties_go_to_the_lower_index_like_lax_top_k():
    p = np.array([[[0.3, 0.2, 0.3, 0.2]]])  # (layers, tokens, E)
    shares = explain.activation_shares(p, 2)
    np.testing.assert_array_equal(shares, [[0.5, 0.0, 0.5, 0.0]])
    _, idx = jax.lax.top_k(p[0, 0], 2)
    assert set(np.asarray(idx).tolist()) == {0, 2}


def test_explain_token_names_the_avoided_expert_and_its_cost():
    costs = np.array([1.0, 2.0, 4.0, 0.5])
    ref = np.array([0.1, 0.2, 0.6, 0.1])  # top-2: experts 2 and 1
    srv = np.array([0.5, 0.3, 0.1, 0.1])  # top-2: experts 0 and 1
    text = explain.explain_token(ref, srv, 2, costs, unit="µJ")
    assert text == (
        "routed to expert(s) 0 (1 µJ), 1 (2 µJ); avoided 2 (p 0.60 -> 0.10; would have cost "
        "4 µJ); energy +3 µJ saved"
    )
    assert "the same experts as before" in explain.explain_token(ref, ref, 2, costs)


def test_activation_shares_and_agreement_match_loops():
    p, q = _probs(3), _probs(4)
    shares = explain.activation_shares(p, K)
    counts = np.zeros((LAYERS, E))
    agree = []
    for layer in range(LAYERS):
        for b in range(B):
            for t in range(L):
                for e in _topk_set(p[layer, b, t], K):
                    counts[layer, e] += 1
                agree.append(_topk_set(p[layer, b, t], K) == _topk_set(q[layer, b, t], K))
    np.testing.assert_allclose(shares, counts / counts.sum(1, keepdims=True))
    np.testing.assert_allclose(shares.sum(1), 1.0)
    assert explain.topk_agreement(p, q, K) == pytest.approx(np.mean(agree))
    assert explain.topk_agreement(p, p, K) == 1.0


def test_bad_arguments_are_refused_in_one_line():
    p = _probs(5)
    with pytest.raises(ValueError, match="top_k must be in"):
        explain.activation_shares(p, E + 1)
    with pytest.raises(ValueError, match="one value per expert"):
        explain.routing_changes(p, p, K, np.ones(E - 1))
    with pytest.raises(ValueError, match="one \\(layers, ..., E\\) shape"):
        explain.routing_changes(p, p[:, :2], K, np.ones(E))
