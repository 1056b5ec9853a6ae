"""Objectives against numpy formulas; leak-free support/query windows."""

import jax
import numpy as np
import pytest

from metattt import objectives as O
from metattt.data import windows


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(size=(3, 7, 5)).astype(np.float32)


def test_entropy(logits):
    logp = _log_softmax(logits.astype(np.float64))
    expected = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(O.entropy(logits), expected.mean(), rtol=1e-5)
    mask = np.random.default_rng(1).random((3, 7)) > 0.5
    np.testing.assert_allclose(O.entropy(logits, mask), expected[mask].mean(), rtol=1e-5)


def test_next_token_and_masked_reconstruction(logits):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 5, size=(3, 7))
    logp = _log_softmax(logits.astype(np.float64))
    nll = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    shifted = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(
        O.next_token_cross_entropy(logits, tokens), shifted.mean(), rtol=1e-5
    )
    hidden = rng.random((3, 7)) < 0.3
    np.testing.assert_allclose(
        O.masked_reconstruction(logits, tokens, hidden), nll[hidden].mean(), rtol=1e-5
    )
    mask = O.random_token_mask(jax.random.key(0), (200, 50), 0.15)
    assert 0.12 < float(mask.mean()) < 0.18


def test_mse_and_shape_errors(logits):
    a, b = logits, logits[::-1]
    np.testing.assert_allclose(O.mse(a, b), ((a - b) ** 2).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="prediction shape"):
        O.mse(a, b[:, :3])
    with pytest.raises(ValueError, match="labels must be integers"):
        O.cross_entropy(logits, np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="tokens shape"):
        O.next_token_cross_entropy(logits, np.zeros((3, 6), np.int32))


def test_support_query_split_has_no_shared_time_step():
    series = np.arange(100)[:, None] * 1.0 + np.random.default_rng(3).normal(size=(100, 2))
    task = windows.support_query_split(
        series, context=6, horizon=3, support_fraction=0.6, stride=2
    )  # overlapping windows
    index = np.arange(100)[:, None] * np.ones((1, 2))
    idx_task = windows.support_query_split(
        index, context=6, horizon=3, support_fraction=0.6, stride=2
    )
    support_t = set(np.unique(np.concatenate([idx_task.support[0], idx_task.support[1]], 1)))
    query_t = set(np.unique(np.concatenate([idx_task.query[0], idx_task.query[1]], 1)))
    assert support_t and query_t and not support_t & query_t
    assert max(support_t) < 60 <= min(query_t)
    x_s, y_s = task.support
    assert x_s.shape[1:] == (6, 2) and y_s.shape[1:] == (3, 2)
    # overlap: consecutive support windows share context - 2 steps
    np.testing.assert_array_equal(idx_task.support[0][1, :4], idx_task.support[0][0, 2:])
    with pytest.raises(ValueError, match="holds no window"):
        windows.sliding_windows(series[:5], context=6, horizon=3)
