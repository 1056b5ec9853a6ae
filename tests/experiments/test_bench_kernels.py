"""The GPU kernel benchmarks still run (smoke sizes, Pallas interpret mode on the CPU)."""

import jax
import jax.numpy as jnp
import pytest

from experiments.bench import dispatch as bench_dispatch
from experiments.bench import kernels as bench_kernels


@pytest.mark.slow
def test_smoke_run_prints_a_table(capsys, tmp_path):
    bench_kernels.main(["--smoke", "--write", "--benchmarks", str(tmp_path / "B.md")])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("|")]
    for backend in ("pallas", "scan", "associative"):
        assert any(f"| {backend} |" in row and "| fwd |" in row for row in rows), backend
    text = (tmp_path / "B.md").read_text()
    assert "<!-- kernels_selective_scan:start -->" in text and "fwd+bwd" in text


@pytest.mark.slow
def test_dispatch_smoke_run_prints_a_table(capsys, tmp_path):
    bench_dispatch.main(["--smoke", "--write", "--benchmarks", str(tmp_path / "B.md")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    for part, backends in (("gmm", ("dense", "pallas", "ragged")), ("dispatch", ("reference",))):
        for backend in backends:
            assert any(f"| {part} | fwd+bwd | {backend} |" in row for row in rows), backend
    errors = [row.split("|")[-3].strip() for row in rows if "| fwd | pallas |" in row]
    assert errors and all(float(e) < 1e-5 for e in errors)
    assert "<!-- kernels_moe_dispatch:start -->" in (tmp_path / "B.md").read_text()


def test_flops_ratio_tells_a_grouped_matmul_from_a_padded_one():
    """The fallback detector: a dense matmul is ~1x the useful FLOPs; multiplying every row by
    every expert's matrix and selecting (the padded expansion) is ~E x."""
    experts, rows, dim, ffn = 8, 64, 32, 16
    keys = jax.random.split(jax.random.key(1), 2)
    lhs = jax.random.normal(keys[0], (rows, dim))
    rhs = jax.random.normal(keys[1], (experts, dim, ffn))
    group = jnp.arange(rows) % experts
    useful = 2.0 * rows * dim * ffn

    def padded(a, w):
        every = jnp.einsum("md,edf->emf", a, w)
        return jnp.take_along_axis(every, group[None, :, None], axis=0)[0]

    dense = bench_dispatch.flops_ratio(lambda a, w: a @ w[0], (lhs, rhs), useful)
    expanded = bench_dispatch.flops_ratio(padded, (lhs, rhs), useful)
    assert 0.9 < dense < 1.5
    assert 0.9 * experts < expanded < 1.5 * experts
