"""The GPU check's driver: every section in its own process under its own timeout, one JSON and
one log.

    python -m experiments.gpu_check --out DIR [--budget 460] [--size auto|gpu|tiny]
        [--sections env,selftest,...] [--timeout NAME=SECONDS ...] [--runs all|none|a,b]

Sections, in priority order (what matters most first; later ones get what time is left):
``env`` (versions, device, Pallas lowering flag, tiles, what ``"auto"`` resolves to),
``selftest`` (each kernel's self-test: the allow-list verdict), ``scan`` and ``dispatch``
(kernels vs their ``jnp`` paths at realistic sizes, errors, timings, roofline floor),
``pytest_gpu`` (the tests marked ``gpu``), ``models`` (one loss-and-gradient step of the ATTD
Mamba at ``lra_full`` sizes and of the MoE model, kernel vs ``jnp``), then ``run:NAME``: each
config's ``tiny`` variant end to end through ``experiments.run`` (on a GPU, by default). A
section that fails, hangs or is killed is recorded as such and the next one starts; a section
that would start with under 10 s of the budget left is skipped, by name. A killed section keeps
the results it had written.

Writes ``DIR/gpu_check.json`` (every section's status, exit code, seconds and results) and
``DIR/gpu_check.log`` (all output), and prints a summary. Exit code 0 when every section ran and
passed, else 1 (a skipped section is a check not made).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

from experiments.gpu_check import summary

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Caps in seconds (tiny sizes on a CPU cost about as much: imports and interpret-mode compiles);
# the budget caps them all.
# dispatch: 150 s for ours, 50 s more for tokamax's rows where it is installed.
CAPS = {"env": 45, "selftest": 90, "scan": 200, "dispatch": 200, "pytest_gpu": 120, "models": 150}
RUN_CAP = 90
MARGIN_S = 10  # a section is not started with less of the budget left


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible, without initialising JAX in this process (a JAX GPU
    client here would hold the device memory the sections need)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def gpu_test_files() -> list[str]:
    """The test files that mark a test ``gpu`` (collecting only them keeps the section short)."""
    files = sorted(ROOT.glob("tests/**/test_*.py"))
    return [str(p.relative_to(ROOT)) for p in files if "pytest.mark.gpu" in p.read_text()]


# Tiny runs first of the configs whose models call the kernels or have a GPU variant: the budget
# may not reach the rest.
RUNS_FIRST = ("energy_moe", "attd_lra", "forecasting", "selective_copy", "energy_moe_digits")


def config_names() -> list[str]:
    """Every config, those of RUNS_FIRST first."""
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
    first = [n for n in RUNS_FIRST if n in names]
    return first + [n for n in names if n not in first]


def plan(args, work: pathlib.Path) -> list[tuple[str, list[str], float]]:
    """(name, command, cap seconds) of each section to run, in order."""
    py = sys.executable
    out = []
    for name in args.sections:
        if name == "pytest_gpu":
            command = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
            command += ["--junitxml", str(work / "pytest_gpu.xml"), *gpu_test_files()]
        else:
            command = [py, "-m", "experiments.gpu_check.sections", name, "--size", args.size]
            command += ["--json", str(work / f"{name}.json")]
        out.append((name, command, CAPS[name]))
    for config in args.runs:
        workdir = work / "runs" / config
        command = [py, "-m", "experiments.run", f"--config=configs/{config}.py:tiny"]
        out.append((f"run:{config}", [*command, f"--workdir={workdir}"], RUN_CAP))
    return [(n, c, args.timeouts.get(n, cap)) for n, c, cap in out]


def run_section(command: list[str], timeout: float, log) -> tuple[int | None, bool, float]:
    """(exit code, timed out, seconds) of ``command`` in its own process group, its output
    copied line by line to ``log`` and stdout; on timeout the whole group is killed."""
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "METATTT_NO_PROGRESS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def pump():
        for line in proc.stdout:
            log.write(line)
            log.flush()
            sys.stdout.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    except KeyboardInterrupt:  # the check itself is stopped: stop the section with it
        _kill_group(proc)
        raise
    reader.join(timeout=5)
    return proc.returncode, timed_out, time.time() - start


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL what is left after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def junit_counts(path: pathlib.Path) -> dict:
    """Counts and failures of a pytest JUnit XML report."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        return {"report": f"unreadable ({type(error).__name__})"}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = {}
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            for tag in ("failure", "error"):
                element = case.find(tag)
                if element is not None:
                    name = f"{case.get('classname')}::{case.get('name')}"
                    failed[name] = (element.get("message") or "")[:500]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def section_record(name, rc, timed_out, seconds, timeout, work: pathlib.Path) -> dict:
    record = {"rc": rc, "seconds": round(seconds, 1), "timeout_s": timeout}
    if name == "pytest_gpu":
        record["results"] = junit_counts(work / "pytest_gpu.xml")
    elif not name.startswith("run:"):
        try:
            written = json.loads((work / f"{name}.json").read_text())
            record["results"], record["errors"] = written["results"], written["errors"]
        except (OSError, ValueError, KeyError) as error:
            record["errors"] = {"section": f"no results written ({type(error).__name__})"}
    if timed_out:
        record["status"] = "timeout"
    elif rc == 0 and not record.get("errors"):
        record["status"] = "ok"
    else:
        record["status"] = "failed"
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("gpu_check_out"))
    parser.add_argument("--budget", type=float, default=460.0, help="seconds for all sections")
    parser.add_argument("--size", choices=("auto", "gpu", "tiny"), default="auto")
    parser.add_argument("--sections", default=",".join(CAPS))
    parser.add_argument("--runs", default="auto", help="configs run tiny: all, none or a,b")
    parser.add_argument(
        "--timeout", action="append", default=[], metavar="NAME=SECONDS", help="a section's cap"
    )
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(CAPS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(CAPS)}")
    if args.size == "auto":
        args.size = "gpu" if has_gpu() else "tiny"
    names = config_names()
    if args.runs == "auto":
        args.runs = "all" if args.size == "gpu" else "none"
    chosen = {"all": names, "none": []}
    args.runs = chosen[args.runs] if args.runs in chosen else args.runs.split(",")
    if set(args.runs) - set(names):
        parser.error(f"--runs: unknown configs {sorted(set(args.runs) - set(names))}")
    try:
        args.timeouts = {k: float(v) for k, v in (t.split("=", 1) for t in args.timeout)}
    except ValueError:
        parser.error(f"--timeout takes NAME=SECONDS, got {args.timeout}")
    if not args.budget > 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a killed check still reports
    try:
        return _check(args, sys.argv[1:] if argv is None else argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check(args, argv: list[str]) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_"))
    start = time.time()
    report = {
        "size": args.size,
        "budget_s": args.budget,
        "argv": argv,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "sections": {},
    }
    json_path = args.out / "gpu_check.json"
    with open(args.out / "gpu_check.log", "w") as log:
        for name, command, cap in plan(args, work):
            left = args.budget - (time.time() - start)
            if left < MARGIN_S:
                report["sections"][name] = {"status": "skipped (budget spent)", "timeout_s": cap}
                continue
            timeout = min(cap, left)
            banner = f"=== [{name}] start, timeout {timeout:.0f} s: {' '.join(command)}\n"
            log.write(banner)
            sys.stdout.write(banner)
            section_start = time.time()
            try:
                rc, timed_out, seconds = run_section(command, timeout, log)
            except KeyboardInterrupt:  # SIGINT or SIGTERM: keep what was measured, stop
                seconds = time.time() - section_start
                record = section_record(name, None, False, seconds, timeout, work)
                report["sections"][name] = {**record, "status": "interrupted"}
                break
            record = section_record(name, rc, timed_out, seconds, timeout, work)
            report["sections"][name] = record
            line = f"=== [{name}] {record['status']} (rc {rc}) in {seconds:.1f} s\n"
            log.write(line)
            sys.stdout.write(line)
            report["elapsed_s"] = round(time.time() - start, 1)
            json_path.write_text(json.dumps(report, indent=1, default=str))
        text = summary.render(report)
        log.write(text)
    report["elapsed_s"] = round(time.time() - start, 1)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    print(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1
