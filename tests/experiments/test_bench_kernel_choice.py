"""The kernel-choice benchmark: its shape draw, and its hit rate and time lost computed on
timings whose fastest backend is known (no timing)."""

import argparse

import pytest

from experiments.bench import kernel_choice as bench
from metattt.energy import kernel_costs as kc


def test_draw_shapes_are_distinct_valid_and_seeded():
    shapes = bench.draw_shapes(30, seed=1)
    assert len({s.key() for s in shapes}) == 30 and shapes == bench.draw_shapes(30, seed=1)
    for s in shapes:
        assert s.top_k <= s.experts
        assert s.tokens * s.top_k * s.experts * s.capacity <= bench.MAX_ONE_HOT
        kc.shape_features(s)  # valid


def test_evaluate_counts_hits_and_time_lost_by_hand():
    """Training timings follow two cost laws, so the model learns them; on the held-out shapes
    the measured times are set so that one choice is a miss of known cost."""
    shapes = bench.draw_shapes(12, seed=2)
    law = {"reference": lambda s: 1e-9 * s.tokens * s.experts * s.capacity,
           "ragged": lambda s: 1e-6 + 2e-10 * s.tokens * s.d_model}  # fmt: skip
    train = [kc.KernelTiming(b, s, f(s)) for s in shapes[:10] for b, f in law.items()]
    model = kc.fit_cost_model(train)
    a, b = shapes[10:]
    pick_a, pick_b = kc.choose_backend(model, a), kc.choose_backend(model, b)
    other = {"reference": "ragged", "ragged": "reference"}
    # a: the measured times agree with the choice; b: the other backend measured faster
    held = [kc.KernelTiming(pick_a, a, 1.0), kc.KernelTiming(other[pick_a], a, 2.0),
            kc.KernelTiming(pick_b, b, 3.0), kc.KernelTiming(other[pick_b], b, 1.0)]  # fmt: skip
    result = bench.evaluate(model, held)
    assert result["hits"] == 1
    assert result["lost"] == pytest.approx((3.0 - 1.0) / (1.0 + 1.0))
    fixed = {pick_a: 0.0 + (3.0 - 1.0 if pick_b == pick_a else 0.0),
             other[pick_a]: 1.0 + (3.0 - 1.0 if pick_b == other[pick_a] else 0.0)}  # fmt: skip
    for backend, loss in fixed.items():
        assert result["fixed_lost"][backend] == pytest.approx(loss / 2.0)
    args = argparse.Namespace(train=10, held=2, repeats=1, seed=2, write=False)
    text = bench.render(result, args, 10)
    assert "picks the fastest backend on 1 of 2 shapes" in text and text.count("| no |") == 1
    assert bench.VERDICT in text.splitlines()
