"""The GPU kernel benchmark still runs (smoke sizes, Pallas interpret mode on the CPU)."""

import pytest

from experiments import bench_kernels


@pytest.mark.slow
def test_smoke_run_prints_a_table(capsys, tmp_path):
    bench_kernels.main(["--smoke", "--write", "--benchmarks", str(tmp_path / "B.md")])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("|")]
    for backend in ("pallas", "scan", "associative"):
        assert any(f"| {backend} |" in row and "| fwd |" in row for row in rows), backend
    text = (tmp_path / "B.md").read_text()
    assert "<!-- kernels_selective_scan:start -->" in text and "fwd+bwd" in text
