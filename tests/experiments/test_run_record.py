"""experiments.run records the kernel backends a run resolved to, at its end, failed or not."""

import json
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import run
from kernels_pallas import selftest
from kernels_pallas.moe_dispatch import moe_dispatch
from kernels_pallas.selective_scan import selective_scan


def _draw(rng, *shapes):
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _scan(config, workdir):
    x, delta, A, B, C = _draw(
        np.random.default_rng(0), (1, 4, 3), (1, 4, 3), (3, 2), (1, 4, 2), (1, 4, 2)
    )
    selective_scan(x, delta, -jnp.exp(A), B, C, delta_softplus=True, backend="auto")
    return {"done": True}


def _dispatch_then_fail(config, workdir):
    x, wg, wu, wd, logits = _draw(
        np.random.default_rng(1), (5, 4), (2, 4, 3), (2, 4, 3), (2, 3, 4), (5, 2)
    )
    moe_dispatch(x, wg, wu, wd, logits, top_k=1, backend="auto")
    raise RuntimeError("the run failed after tracing its model")


def _backends(workdir):
    info = json.loads((workdir / "run_info.json").read_text())
    return [(e["kernel"], e["requested"], e["backend"]) for e in info["kernel_backends"]]


def test_run_recorded_writes_the_kernel_backends_at_the_end(tmp_path):
    selftest.reset()
    config = ml_collections.ConfigDict({"experiment": "fake"})
    module = types.SimpleNamespace(run=_scan)
    assert run.run_recorded(module, config, str(tmp_path / "ok")) == {"done": True}
    assert _backends(tmp_path / "ok") == [("selective_scan", "auto", "reference")]
    module = types.SimpleNamespace(run=_dispatch_then_fail)
    with pytest.raises(RuntimeError, match="after tracing"):
        run.run_recorded(module, config, str(tmp_path / "failed"))
    assert _backends(tmp_path / "failed") == [
        ("selective_scan", "auto", "reference"),  # the registry is the process's
        ("moe_dispatch", "auto", "ragged"),
    ]
    selftest.reset()
