"""The meta-step overhead benchmark runs, and its steps agree with plain JAX before timing."""

from experiments.bench import meta_overhead as bench


def test_measure_checks_parity_and_times_every_step():
    ms = bench.measure(steps=1, first_order=True, rounds=3)
    assert set(ms) == {"plain", "guard on", "guard off"} and all(v > 0 for v in ms.values())
