"""Selective-copying data against a brute-force reading, and the tiny run end to end."""

import jax
import numpy as np
import pytest

from configs import selective_copy as config
from experiments import selective_copy


def test_answers_are_the_data_tokens_in_order():
    length, k, vocab = 40, 5, 12
    inputs, targets, answer = map(
        np.asarray, selective_copy.sample(jax.random.key(3), 64, length, k, vocab)
    )
    for x, t, a in zip(inputs, targets, answer, strict=True):
        data = [int(v) for v in x[: length - k] if v != 0]  # brute force: scan the prefix
        assert len(data) == k and all(1 <= v < vocab for v in data)
        assert list(x[length - k :]) == [vocab] * k
        assert list(t[a]) == data and not a[: length - k].any()


@pytest.mark.slow
def test_tiny_run_learns_above_chance(tmp_path):
    cfg = config.get_config("tiny")
    results = selective_copy.run(cfg, str(tmp_path))
    chance = 1.0 / (cfg.task.vocab - 1)
    assert results["selective"]["accuracy"] > 1.5 * chance
    assert 0.0 <= results["time_invariant"]["accuracy"] <= 1.0


def test_reading_states_each_check_from_the_numbers():
    met = {"selective": {"accuracy": 0.95, "train_seconds": 300.0}}
    met["time_invariant"] = {"accuracy": 0.6, "train_seconds": 420.0}
    (line,) = selective_copy._reading(met)
    assert "Selective 95.0% (≥ 90% asked: met)" in line
    assert "35.0 points lower (≥ 30 asked: met)" in line and "7.0 min (< 10 asked: met)" in line
    met["time_invariant"] = {"accuracy": 0.7, "train_seconds": 660.0}
    (line,) = selective_copy._reading(met)
    assert "25.0 points lower (≥ 30 asked: not met)" in line
    assert "11.0 min (< 10 asked: not met)" in line
    assert selective_copy._reading({"selective": met["selective"]}) == []
