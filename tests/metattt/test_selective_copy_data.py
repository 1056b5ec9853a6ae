"""Selective-copying sequences against a brute-force reading of each one (a Python loop)."""

import jax
import numpy as np
import pytest

from metattt.data import selective_copy


def _read(x: np.ndarray, length: int, k: int) -> list[int]:
    """The data tokens of one input sequence, in order: every non-noise token of the prefix."""
    return [int(v) for v in x[: length - k] if v != 0]


@pytest.mark.parametrize("length, k, vocab", [(40, 5, 12), (9, 4, 3)])
def test_answers_are_the_data_tokens_in_order(length, k, vocab):
    batch = selective_copy.sample(jax.random.key(length), 64, length, k, vocab)
    inputs, targets, answer = map(np.asarray, batch)
    assert inputs.shape == targets.shape == answer.shape == (64, length)
    for x, t, a in zip(inputs, targets, answer, strict=True):
        data = _read(x, length, k)
        assert len(data) == k and all(1 <= v < vocab for v in data)
        assert list(x[length - k :]) == [vocab] * k  # the answer markers
        assert list(a) == [False] * (length - k) + [True] * k
        assert list(t[length - k :]) == data and not t[: length - k].any()


def test_positions_and_tokens_are_uniform():
    """Over many draws every prefix slot holds data with probability K / (L - K), and every
    data token value is equally likely (counted with NumPy, 5-sigma bounds)."""
    length, k, vocab, n = 20, 4, 6, 2000
    inputs, _, _ = map(np.asarray, selective_copy.sample(jax.random.key(0), n, length, k, vocab))
    prefix = inputs[:, : length - k]
    p = k / (length - k)
    slot_rate = (prefix != 0).mean(axis=0)
    assert np.all(np.abs(slot_rate - p) < 5 * np.sqrt(p * (1 - p) / n))
    counts = np.bincount(prefix[prefix != 0], minlength=vocab)[1:]
    q = 1 / (vocab - 1)
    assert np.all(np.abs(counts / (n * k) - q) < 5 * np.sqrt(q * (1 - q) / (n * k)))


def test_a_key_fixes_the_batch():
    a = selective_copy.sample(jax.random.key(5), 8, 24, 4, 10)
    b = selective_copy.sample(jax.random.key(5), 8, 24, 4, 10)
    c = selective_copy.sample(jax.random.key(6), 8, 24, 4, 10)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, c.inputs)


@pytest.mark.parametrize(
    "length, k, vocab, message",
    [(10, 0, 5, "num_tokens must be in 1..length/2 = 5, got 0"), (10, 6, 5, "got 6"),
     (10, 2, 1, "vocab must be >= 2")],
)  # fmt: skip
def test_bad_sizes_are_refused(length, k, vocab, message):
    with pytest.raises(ValueError, match=message):
        selective_copy.sample(jax.random.key(0), 2, length, k, vocab)
