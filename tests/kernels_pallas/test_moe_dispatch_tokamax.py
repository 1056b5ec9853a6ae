"""Backend ``"tokamax"`` (the optional tokamax package's ``ragged_dot`` as the grouped matmuls)
against the capacity-padded einsum (backend ``"reference"``).

Random float32 inputs at tiny sizes (T = 12, D = 6, F = 8, E = 4, top-2), dropless and with
drops; errors are ‖got − want‖ / ‖want‖ with the bounds of ``test_moe_dispatch.py`` (1e-5;
matmuls at the highest precision, see ``tests/conftest.py``). On the CPU tokamax runs its XLA
implementation; the tests also check that every grouped product went through tokamax (not
``jax.lax.ragged_dot``). Skipped where tokamax is not installed (it is the ``tokamax`` extra,
not part of ``dev``: ``pip install -e '.[tokamax]'``); the error without it is always tested.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import selftest
from kernels_pallas.moe_dispatch import moe_dispatch, resolve_backend, tokamax_ops
from tests.kernels_pallas.test_moe_dispatch import (  # the same sizes and inputs
    DIM,
    EXPERTS,
    TOKENS,
    TOP_K,
    make_inputs,
    rel_err,
)

TOL = 1e-5  # float32, relative norm error (outputs and gradients)

needs_tokamax = pytest.mark.skipif(
    importlib.util.find_spec("tokamax") is None,
    reason="tokamax is not installed (optional extra: pip install -e '.[tokamax]')",
)


def test_without_tokamax_the_error_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(tokamax_ops, "available", lambda: False)
    x, wg, wu, wd, logits = make_inputs(0)
    with pytest.raises(ImportError, match=r"tokamax.*\[tokamax\]") as info:
        moe_dispatch(x, wg, wu, wd, logits, top_k=TOP_K, backend="tokamax")
    assert "\n" not in str(info.value)
    assert tokamax_ops.version() == "absent"


def test_implementation_follows_the_platform():
    assert tokamax_ops.implementation("gpu") == ("mosaic", "triton")
    assert tokamax_ops.implementation("tpu") == ("mosaic",)
    assert tokamax_ops.implementation("cpu") == ("xla",)


@needs_tokamax
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's implementations")
def test_accepted_names_the_implementation_tokamax_runs():
    lhs, rhs = jnp.ones((9, 3)), jnp.ones((3, 3, 4))
    sizes = jnp.asarray([2, 0, 5], jnp.int32)
    assert tokamax_ops.accepted("gmm", lhs, rhs, sizes) == "xla"
    assert tokamax_ops.accepted("tgmm", lhs, jnp.ones((9, 4)), sizes) == "xla"
    # the GPU kernels refuse the CPU (NotImplementedError), as tokamax's fallback expects
    assert tokamax_ops.accepted("gmm", lhs, rhs, sizes, impl=("mosaic", "triton")) is None
    with pytest.raises(ValueError, match="product"):
        tokamax_ops.accepted("dot", lhs, rhs, sizes)


class _Spy:
    """Counts the calls (at trace time) of tokamax's two entry points."""

    def __init__(self, monkeypatch):
        import tokamax

        self.calls = {"ragged_dot": 0, "ragged_dot_general": 0}
        for name in self.calls:
            monkeypatch.setattr(tokamax, name, self._wrap(name, getattr(tokamax, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            assert kwargs["implementation"] == tokamax_ops.implementation()
            return fn(*args, **kwargs)

        return counted


@needs_tokamax
@pytest.mark.parametrize("factor", [None, 0.5])
def test_forward_and_gradients_match_the_capacity_einsum(monkeypatch, factor):
    spy = _Spy(monkeypatch)
    x, wg, wu, wd, logits = make_inputs(1 if factor is None else 2)
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((TOKENS, DIM)), jnp.float32)

    def loss(backend):
        def total(x, wg, wu, wd, logits):
            res = moe_dispatch(
                x, wg, wu, wd, logits, top_k=TOP_K, capacity_factor=factor, backend=backend
            )
            return jnp.sum(res.out * weights), res

        return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3, 4), has_aux=True))

    ((_, got), got_grads) = loss("tokamax")(x, wg, wu, wd, logits)
    ((_, want), want_grads) = loss("reference")(x, wg, wu, wd, logits)
    # forward: 3 gmm; backward: 3 gmm (d rows) and 3 tgmm (d weights), all on tokamax
    assert spy.calls["ragged_dot"] >= 6 and spy.calls["ragged_dot_general"] >= 3, spy.calls
    assert rel_err(got.out, want.out) <= TOL
    np.testing.assert_array_equal(got.expert_counts, want.expert_counts)
    np.testing.assert_array_equal(got.dropped, want.dropped)
    assert bool(jnp.any(got.dropped)) == (factor is not None)  # the drop path is exercised
    for name, g, w in zip(
        ("x", "w_gate", "w_up", "w_down", "logits"), got_grads, want_grads, strict=True
    ):
        assert float(jnp.linalg.norm(w)) > 0, name
        assert rel_err(g, w) <= TOL, name


@needs_tokamax
def test_vmaps_per_example_and_differentiates_twice():
    """Per-example dispatch (vmap over examples, shared experts) and a MAML-style second-order
    gradient through the expert weights: tokamax == reference. tokamax's own ``ragged_dot``
    refuses both; the wrappers of :mod:`.grouped` provide them."""
    batch, factor = 2, 0.5
    x, wg, wu, wd, logits = make_inputs(4, tokens=batch * 6)
    x, logits = x.reshape(batch, 6, DIM), logits.reshape(batch, 6, EXPERTS)

    def run(backend, w):
        one = lambda xi, li: (
            (
                moe_dispatch(
                    xi, w, wu, wd, li, top_k=TOP_K, capacity_factor=factor, backend=backend
                )
            ).out
        )
        return jax.vmap(one)(x, logits)

    def meta(backend):
        inner = lambda w: jnp.sum(run(backend, w) ** 2)
        outer = lambda w: jnp.sum(jax.grad(inner)(w) ** 2)
        return jax.jit(lambda w: (run(backend, w), jax.grad(outer)(w)))(wg)

    (out_tok, meta_tok), (out_ref, meta_ref) = meta("tokamax"), meta("reference")
    assert rel_err(out_tok, out_ref) <= TOL
    assert float(jnp.linalg.norm(meta_ref)) > 0
    assert rel_err(meta_tok, meta_ref) <= TOL


@needs_tokamax
def test_recorded_and_never_chosen_by_auto():
    selftest.reset()
    x, wg, wu, wd, logits = make_inputs(5)
    jax.eval_shape(
        lambda *a: moe_dispatch(*a, top_k=TOP_K, backend="tokamax"), x, wg, wu, wd, logits
    )
    (entry,) = [e for e in selftest.resolutions() if e["backend"] == "tokamax"]
    assert entry["requested"] == "tokamax"
    assert str(tokamax_ops.implementation()) in entry["config"]
    assert tokamax_ops.version() in entry["config"]
    assert resolve_backend("auto") != "tokamax"  # "auto" waits for the GPU check's verdict
