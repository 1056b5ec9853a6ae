"""The meta-step overhead benchmark runs, and its steps agree with plain JAX before timing."""

from experiments.bench import meta_overhead as bench


def test_measure_checks_parity_and_times_every_step():
    ms = bench.measure(steps=1, first_order=True, rounds=3)
    names = {"plain", "guard on", "guard off"}
    assert set(ms) == names | {f"ops {n}" for n in names} and all(v > 0 for v in ms.values())
    assert ms["ops guard off"] < ms["ops guard on"]  # the guard compiles out
