"""The CPU scan benchmark's float64 reference loop, and a smoke run where mambapy is installed."""

import numpy as np
import pytest

from experiments.bench import scan_mambapy as bench


def test_reference_loop_gradients_match_finite_differences():
    inputs = {k: v.astype(np.float64) for k, v in bench.make_inputs(2, 7, 3, 4, seed=3).items()}
    _, grads = bench.reference_loop(inputs)
    objective = lambda inp: float(np.sum(bench.reference_loop(inp)[0] * inp["g"]))
    rng = np.random.default_rng(0)
    eps = 1e-6
    for name in bench.NAMES:
        direction = rng.standard_normal(inputs[name].shape)
        plus = dict(inputs, **{name: inputs[name] + eps * direction})
        minus = dict(inputs, **{name: inputs[name] - eps * direction})
        numeric = (objective(plus) - objective(minus)) / (2 * eps)
        analytic = float(np.sum(grads[name] * direction))
        assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-8), name


def test_reference_loop_output_is_the_recurrence():
    inputs = {k: v.astype(np.float64) for k, v in bench.make_inputs(1, 5, 2, 3, seed=4).items()}
    y, _ = bench.reference_loop(inputs)
    x, dt, A, B, C, D = (inputs[k][0] if inputs[k].ndim == 3 else inputs[k] for k in bench.NAMES)
    h = np.zeros_like(A)
    for t in range(x.shape[0]):
        h = np.exp(dt[t][:, None] * A) * h + (dt[t] * x[t])[:, None] * B[t][None, :]
        np.testing.assert_allclose(y[0, t], h @ C[t] + D * x[t], rtol=1e-12)


def test_quick_run_checks_parity_and_prints_a_table(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("mambapy")
    bench.main(["--quick", "--no-write"])
    out = capsys.readouterr().out
    assert "| fwd+bwd |" in out and "mambapy" in out
