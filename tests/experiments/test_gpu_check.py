"""The one-call GPU check (``make gpu-check``) on the CPU: the same sections at tiny sizes, the
kernels in Pallas interpret mode. What a GPU adds (compiled kernels, realistic sizes, timings
that mean something) cannot be checked here.

The quick test runs the driver with the kernel check of the scan, the GPU-marked tests (skipped
here) and the environment, and a section forced over its timeout; the slow one runs the rest
(self-tests and the dispatch). Not run here, to keep ``make test`` short: the ``models``
section (one step of each GPU-sized model, kernel vs jnp path; the kernels' agreement with
their references is tested in tests/kernels_pallas) and the ``run:NAME`` sections (each
config's tiny run, which the experiments' own tests cover). On a GPU they run in their own
processes, so a failure there is recorded without hiding the other sections.
"""

import json

import pytest

from experiments.gpu_check import main as gpu_check


def run_check(tmp_path, *argv):
    out = tmp_path / "out"
    code = gpu_check.main(["--out", str(out), "--size", "tiny", "--runs", "none", *argv])
    report = json.loads((out / "gpu_check.json").read_text())
    return code, report, (out / "gpu_check.log").read_text()


def kernel_rows(section):
    (block,) = section["results"].values()  # one dtype at tiny sizes
    return {(r.get("part", "scan"), r["pass"], r["backend"]): r for r in block["rows"]}


def test_sections_run_in_their_own_processes_and_a_hang_hides_nothing(tmp_path, capsys):
    code, report, log = run_check(
        tmp_path, "--sections", "env,selftest,scan,pytest_gpu", "--timeout", "selftest=0.5"
    )
    sections = report["sections"]
    assert list(sections) == ["env", "selftest", "scan", "pytest_gpu"]
    # The section over its timeout is killed and recorded; the later ones still run.
    assert sections["selftest"]["status"] == "timeout" and code == 1
    for name in ("env", "pytest_gpu", "scan"):
        assert sections[name]["status"] == "ok", (name, sections[name])
    env = sections["env"]["results"]
    assert env["versions"]["jax"] and env["devices"]["default_backend"] == "cpu"
    assert env["auto"]["selective_scan"] == "reference"  # not proven on the CPU
    tests = sections["pytest_gpu"]["results"]
    assert tests["tests"] >= 3 and tests["skipped"] == tests["tests"]  # no GPU here
    rows = kernel_rows(sections["scan"])
    for passname in ("fwd", "fwd+bwd"):
        kernel = rows["scan", passname, "pallas"]
        assert kernel["error"] is not None and kernel["error_ok"], kernel
        assert kernel["x_floor"] > 0 and rows["scan", passname, "scan"]["seconds"] > 0
    assert "=== [selftest] timeout" in log and "=== [scan] ok" in log
    assert "gpu check summary" in capsys.readouterr().out

    # A section that would start with too little of the budget left is skipped, by name.
    code, report, _ = run_check(tmp_path, "--sections", "env", "--budget", "5")
    assert report["sections"]["env"]["status"] == "skipped (budget spent)" and code == 1


@pytest.mark.slow
def test_self_tests_and_dispatch(tmp_path):
    code, report, _ = run_check(
        tmp_path,
        "--sections",
        "selftest,dispatch",
    )
    sections = report["sections"]
    assert code == 0, {k: v["status"] for k, v in sections.items()}
    verdicts = sections["selftest"]["results"]
    assert (
        verdicts["selective_scan/float32"]["passed"] and verdicts["moe_dispatch/float32"]["passed"]
    )
    rows = kernel_rows(sections["dispatch"])
    for part in ("gmm", "dispatch"):
        for passname in ("fwd", "fwd+bwd"):
            assert rows[part, passname, "pallas"]["error_ok"], (part, passname)
