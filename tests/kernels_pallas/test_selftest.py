"""``backend="auto"`` cannot break a run: the allow-list, the one-time self-test, the fallback.

The machinery of :mod:`kernels_pallas.selftest` on its own (phases, tolerance, verdict cache,
records), then both kernels through their public functions on a device pretended to be
allow-listed: a kernel that raises or returns wrong numbers falls back to the ``jnp`` path with
exactly one warning and one self-test per process; a kernel that passes is used (in interpret
mode on the CPU); and an unlisted device never reaches a kernel.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import selftest
from kernels_pallas.moe_dispatch import api as moe_api
from kernels_pallas.moe_dispatch import moe_dispatch
from kernels_pallas.selective_scan import api as scan_api
from kernels_pallas.selective_scan import selective_scan


@pytest.fixture(autouse=True)
def fresh_registry():
    selftest.reset()
    yield
    selftest.reset()


@pytest.fixture
def allow(monkeypatch):
    """Pretend this device kind has ``kernels`` proven."""

    def allow(*kernels):
        monkeypatch.setattr(selftest, "PROVEN", {selftest.device_kind(): frozenset(kernels)})

    return allow


def fallback_warnings(caught):
    return [w for w in caught if issubclass(w.category, selftest.KernelFallbackWarning)]


def count_self_tests(monkeypatch, module) -> list:
    """Patch ``module._self_test`` to count its runs (delegating to the real one)."""
    runs = []
    real = module._self_test

    def counting(*args):
        runs.append(args)
        return real(*args)

    monkeypatch.setattr(module, "_self_test", counting)
    return runs


def resolution(kernel):
    """The one recorded resolution of ``kernel`` asked for as "auto"."""
    entries = [
        e for e in selftest.resolutions() if (e["kernel"], e["requested"]) == (kernel, "auto")
    ]
    assert len(entries) == 1, entries
    return entries[0]


# --- the machinery --------------------------------------------------------------------------


def test_run_compiled_runs_while_a_caller_is_traced_and_names_the_failing_phase():
    seen = []

    @jax.jit
    def caller(y):
        seen.append(selftest.run_compiled(lambda a: jnp.sin(a) * 2, np.arange(3.0)))
        return y + 1

    caller(jnp.ones(2))
    np.testing.assert_allclose(seen[0], 2 * np.sin(np.arange(3.0)), rtol=1e-6)

    def bad_lowering(a):
        raise ValueError("no tile rule for this shape\nsecond line")

    with pytest.raises(selftest.SelfTestError, match="^lowering failed: ValueError: no tile rule"):
        selftest.run_compiled(bad_lowering, np.ones(3))

    def host_failure(v):
        raise MemoryError("simulated out of resources")

    def bad_run(a):
        return jax.pure_callback(host_failure, jax.ShapeDtypeStruct(a.shape, a.dtype), a)

    with pytest.raises(selftest.SelfTestError, match="^running failed: "):
        selftest.run_compiled(bad_run, np.ones(3, np.float32))


def test_check_close_uses_the_dtype_tolerance_and_names_the_leaf():
    rng = np.random.default_rng(0)
    want = {"a": rng.standard_normal(50), "b": rng.standard_normal((4, 5))}
    noise = rng.standard_normal(50)
    near = {"a": want["a"] + 1e-4 * noise, "b": want["b"]}
    selftest.check_close(("a", "b"), near, want, np.float32)  # 1e-4 relative: within 5e-3
    with pytest.raises(selftest.SelfTestError, match="mismatch: a relative error"):
        selftest.check_close(("a", "b"), near, want, np.float64)  # 1e-8 allowed
    wrong_b = {"a": want["a"], "b": want["b"] * 1.1}
    with pytest.raises(selftest.SelfTestError, match="mismatch: b relative error 1.00e-01"):
        selftest.check_close(("a", "b"), wrong_b, want, jnp.bfloat16)
    nan = {"a": np.full(50, np.nan), "b": want["b"]}
    with pytest.raises(selftest.SelfTestError, match="mismatch: a relative error nan"):
        selftest.check_close(("a", "b"), nan, want, jnp.bfloat16)


def test_verdict_runs_each_self_test_once_and_warns_once(allow):
    runs = []

    def failing():
        runs.append(1)
        raise RuntimeError("No supported GPU devices found")

    def passing():
        runs.append(2)

    assert selftest.verdict("k", failing, dtype=jnp.float32, config="c") == (
        False,
        f"the k kernel is not proven on {selftest.device_kind()!r} (kernels_pallas.selftest)",
    )
    assert runs == []  # not allow-listed: no self-test at all
    allow("k")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            use, reason = selftest.verdict("k", failing, dtype=jnp.float32, config="c")
            assert not use
            assert reason == "self-test failed: RuntimeError: No supported GPU devices found"
        assert selftest.verdict("k", passing, dtype=jnp.bfloat16, config="c")[0]  # another key
        assert selftest.verdict("k", failing, dtype=jnp.bfloat16, config="c")[0]  # cached pass
    assert runs == [1, 2]
    (warning,) = fallback_warnings(caught)
    message = str(warning.message)
    assert message.startswith("k: backend='auto' falls back to the jnp path on ")
    assert "float32, c" in message and message.endswith("No supported GPU devices found")


def test_record_keeps_each_distinct_resolution_once_in_order():
    selftest.record("k", "auto", "ref", "why", dtype="float32")
    selftest.record("j", "pallas", "pallas", "asked for", dtype="bfloat16")
    selftest.record("k", "auto", "ref", "why", dtype="float32")
    kind, version = selftest.device_kind(), jax.__version__
    assert selftest.resolutions() == [
        {"kernel": "k", "requested": "auto", "backend": "ref", "reason": "why",
         "device_kind": kind, "jax": version, "dtype": "float32"},
        {"kernel": "j", "requested": "pallas", "backend": "pallas", "reason": "asked for",
         "device_kind": kind, "jax": version, "dtype": "bfloat16"},
    ]  # fmt: skip
    selftest.reset()
    assert selftest.resolutions() == []


def test_calls_inside_unrecorded_are_not_listed():
    """A MoE dispatch traced inside ``unrecorded`` (a cost measurement) leaves no record; the
    same call outside it does."""
    x, w, w_down = jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.ones((2, 3, 2))
    call = lambda: jax.eval_shape(  # recorded when traced: no need to compile
        lambda: moe_dispatch(x, w, w, w_down, jnp.zeros((4, 2)), top_k=1, backend="reference")
    )
    with selftest.unrecorded():
        with selftest.unrecorded():
            call()
        call()
    assert selftest.resolutions() == []
    call()
    assert [r["requested"] for r in selftest.resolutions()] == ["reference"]


# --- the selective scan ---------------------------------------------------------------------


def scan_inputs(seed, batch=2, length=9, dim=6, state=3):
    """(x, delta, A, B, C, D, z, delta_bias), float32, random."""
    rng = np.random.default_rng(seed)
    seq, per_step = (batch, length, dim), (batch, length, state)
    shapes = (seq, seq, (dim, state), per_step, per_step, (dim,), seq, (dim,))
    args = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    args[2] = -np.exp(0.5 * args[2])
    return tuple(jnp.asarray(a) for a in args)


def call_scan(backend, args):
    """A fresh jit (so "auto" is resolved again at its trace): (out, last_state)."""

    def scan(x, delta, A, B, C, D, z, bias):
        return selective_scan(
            x, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=True, backend=backend,
            return_last_state=True,
        )  # fmt: skip

    return jax.tree.map(np.asarray, jax.jit(scan)(*args))


def scaled_jnp_scan(*args, delta_softplus, config, lean_chunk):
    """A stand-in kernel that returns wrong numbers (the jnp scan's output times 1.5)."""
    del config
    out, h_last = scan_api._jnp_scan(*args, delta_softplus, "reference", True, lean_chunk)
    return 1.5 * out, h_last


@pytest.mark.parametrize("failure", ["raises", "wrong_numbers"])
def test_scan_kernel_failure_falls_back_to_the_reference_once(allow, monkeypatch, failure):
    allow("selective_scan")
    kernel_calls = []

    def broken(*args, **kwargs):
        kernel_calls.append(1)
        if failure == "raises":
            raise RuntimeError("No supported GPU devices found (simulated)")
        return scaled_jnp_scan(*args, **kwargs)

    monkeypatch.setattr(scan_api, "pallas_scan", broken)
    runs = count_self_tests(monkeypatch, scan_api)
    args = scan_inputs(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = call_scan("auto", args)
        second = call_scan("auto", args)  # traced again: the cached verdict, no second test
    assert len(runs) == 1 and len(kernel_calls) == 1  # the self-test's one call only
    (warning,) = fallback_warnings(caught)
    expected = (
        "lowering failed: RuntimeError: No supported GPU devices found (simulated)"
        if failure == "raises"
        else "mismatch: loss relative error"
    )
    assert expected in str(warning.message)
    reference = call_scan("reference", args)
    for got in (first, second):
        np.testing.assert_array_equal(got[0], reference[0])
        np.testing.assert_array_equal(got[1], reference[1])
    entry = resolution("selective_scan")
    assert (entry["requested"], entry["backend"], entry["dtype"]) == (
        "auto",
        "reference",
        "float32",
    )
    assert entry["reason"].startswith("self-test failed: ") and expected in entry["reason"]


def test_scan_auto_uses_a_proven_kernel_that_passes_its_self_test(allow, monkeypatch):
    allow("selective_scan")
    kernel_calls = []
    real = scan_api.pallas_scan

    def counting(*args, **kwargs):
        kernel_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_api, "pallas_scan", counting)
    runs = count_self_tests(monkeypatch, scan_api)
    args = scan_inputs(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", selftest.KernelFallbackWarning)
        out, last = call_scan("auto", args)
        assert len(runs) == 1 and len(kernel_calls) == 2  # the self-test's, then the call's
        call_scan("auto", args)
    assert len(runs) == 1 and len(kernel_calls) == 3
    reference = call_scan("reference", args)
    np.testing.assert_allclose(out, reference[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, reference[1], rtol=1e-5, atol=1e-5)
    entry = resolution("selective_scan")
    assert (entry["backend"], entry["reason"]) == (
        "pallas",
        f"proven on {selftest.device_kind()!r}; its self-test passed",
    )


# --- the MoE dispatch -----------------------------------------------------------------------


def moe_inputs(seed, tokens=16, dim=8, hidden=16, experts=4):
    """(x, w_gate, w_up, w_down, router_logits), float32, random."""
    rng = np.random.default_rng(seed)
    shapes = ((tokens, dim), (experts, dim, hidden), (experts, dim, hidden))
    shapes += ((experts, hidden, dim), (tokens, experts))
    return tuple(jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes)


def call_moe(backend, args):
    """A fresh jit (so "auto" is resolved again at its trace): the combined output."""

    def dispatch(*a):
        return moe_dispatch(*a, top_k=2, backend=backend).out

    return np.asarray(jax.jit(dispatch)(*args))


def test_moe_kernel_failure_falls_back_to_ragged_once(allow, monkeypatch):
    allow("moe_dispatch")
    kernel_calls = []

    def broken(*args, **kwargs):
        kernel_calls.append(1)
        raise RuntimeError("RESOURCE_EXHAUSTED: shared memory 294912 > 232448 (simulated)")

    monkeypatch.setattr(moe_api, "dispatch_pallas", broken)
    runs = count_self_tests(monkeypatch, moe_api)
    args = moe_inputs(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = call_moe("auto", args)
        second = call_moe("auto", args)
    assert len(runs) == 1 and len(kernel_calls) == 1
    (warning,) = fallback_warnings(caught)
    assert "lowering failed: RuntimeError: RESOURCE_EXHAUSTED" in str(warning.message)
    reference = call_moe("ragged", args)
    np.testing.assert_array_equal(first, reference)
    np.testing.assert_array_equal(second, reference)
    entry = resolution("moe_dispatch")
    assert (entry["backend"], entry["precision"]) == ("ragged", "None")
    assert entry["reason"].startswith("self-test failed: lowering failed: RuntimeError")


def test_moe_auto_uses_proven_kernels_that_pass_their_self_test(allow, monkeypatch):
    allow("moe_dispatch")
    kernel_calls = []
    real = moe_api.dispatch_pallas

    def counting(*args, **kwargs):
        kernel_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(moe_api, "dispatch_pallas", counting)
    runs = count_self_tests(monkeypatch, moe_api)
    args = moe_inputs(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", selftest.KernelFallbackWarning)
        out = call_moe("auto", args)
    assert len(runs) == 1 and len(kernel_calls) == 2  # the self-test's, then the call's
    np.testing.assert_allclose(out, call_moe("reference", args), rtol=1e-5, atol=1e-5)
    assert resolution("moe_dispatch")["backend"] == "pallas"


# --- an unlisted device ---------------------------------------------------------------------


def test_auto_on_an_unlisted_gpu_never_calls_a_kernel(monkeypatch):
    """A GPU that is not on the allow-list (as every GPU is today): no self-test, no kernel,
    no warning; the results are the jnp paths' exactly."""
    scan_args, moe_args = scan_inputs(2), moe_inputs(2)
    scan_ref, moe_ref = call_scan("reference", scan_args), call_moe("ragged", moe_args)

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel or self-test ran on an unlisted device")

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(selftest, "device_kind", lambda: "NVIDIA L40S")
    for module, name in ((scan_api, "pallas_scan"), (moe_api, "dispatch_pallas")):
        monkeypatch.setattr(module, name, forbidden)
        monkeypatch.setattr(module, "_self_test", forbidden)
    selftest.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", selftest.KernelFallbackWarning)
        scan_out, moe_out = call_scan("auto", scan_args), call_moe("auto", moe_args)
    np.testing.assert_array_equal(scan_out[0], scan_ref[0])
    np.testing.assert_array_equal(moe_out, moe_ref)
    for kernel, backend in (("selective_scan", "reference"), ("moe_dispatch", "ragged")):
        entry = resolution(kernel)
        assert (entry["backend"], entry["device_kind"]) == (backend, "NVIDIA L40S")
        assert entry["reason"] == (
            f"the {kernel} kernel is not proven on 'NVIDIA L40S' (kernels_pallas.selftest)"
        )
