"""The fault table: runs of the entry point killed, interrupted, doubled and corrupted on purpose.

    python -m experiments.fault_table [--write] [--kills 5]

Every case runs ``experiments.run`` on the sinusoid MAML config (tiny model, 3000 meta-steps,
a checkpoint every 150) in a subprocess, does something bad to it, reruns it on the same
workdir, and compares the final query-MSE curve with an uninterrupted run's: "equal" means
bit-identical. Cases: SIGKILL at random times (seeded) and during a checkpoint save; SIGINT;
a second run on a busy workdir; the newest checkpoint zero-byte, truncated, garbled, without
its metadata, or an empty folder. ``--write`` puts the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from experiments import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = [
    "--config=configs/sinusoid.py:tiny",
    "--config.methods=('maml',)",
    "--config.train.num_steps=3000",
    "--config.train.checkpoint_every=150",
]
RUN = [sys.executable, "-m", "experiments.run", *ARGS]


def _start(workdir: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ, METATTT_NO_PROGRESS="1")
    return subprocess.Popen(
        [*RUN, f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(workdir: pathlib.Path) -> tuple[int, str]:
    proc = _start(workdir)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _curve(workdir: pathlib.Path) -> list[float]:
    return json.loads((workdir / "results.json").read_text())["maml"]["curve_mean"]


def _ckpt(workdir: pathlib.Path) -> pathlib.Path:
    return workdir / "maml" / "seed_0" / "ckpt"


def _steps(workdir: pathlib.Path) -> list[int]:
    folder = _ckpt(workdir)
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _resumed_from(err: str) -> str:
    for line in err.splitlines():
        if "Resumed from" in line:
            return line.split(" at step ")[1].split(" of ")[0]
    return "start"


def _refusal(err: str) -> str:
    """The reason of the first "Checkpoint ... is unusable (reason); moved ..." warning."""
    for line in err.splitlines():
        if "is unusable (" in line:
            step = line.split(" is unusable (")[0].rsplit("/", 1)[-1]
            return f"{step}: {line.split(' is unusable (', 1)[1].rsplit('); moved', 1)[0]}"
    return "-"


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size)


def _corrupt(step_dir: pathlib.Path, how: str) -> None:
    if how == "zero-byte":
        for p in _data_files(step_dir):
            p.write_bytes(b"")
    elif how == "truncated":
        for p in _data_files(step_dir):
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif how == "garbled (64 bytes)":
        p = _data_files(step_dir)[-1]
        data = bytearray(p.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = np.random.default_rng(0).bytes(64)
        p.write_bytes(bytes(data))
    elif how == "metadata missing":
        (step_dir / "default" / "_METADATA").unlink()
    elif how == "empty step folder":
        for p in sorted(step_dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="random SIGKILLs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="write into BENCHMARKS.md")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fault_table_") as tmp:
        tmp = pathlib.Path(tmp)
        start = time.perf_counter()
        code, err = _finish(tmp / "reference")
        assert code == 0, err[-2000:]
        duration = time.perf_counter() - start
        reference = _curve(tmp / "reference")

        def row(case, happened, workdir, err):
            code, rerun_err = _finish(workdir)
            equal = code == 0 and _curve(workdir) == reference
            notes = _refusal(err + rerun_err)
            rows.append((case, happened, _resumed_from(rerun_err), notes, "yes" if equal else "NO"))

        for i in range(args.kills):  # inside training: after k checkpoints, plus a random delay
            after, delay = int(rng.integers(1, 16)), float(rng.uniform(0.0, 0.4))
            workdir = tmp / f"kill{i}"
            proc = _start(workdir)
            _wait_for(lambda w=workdir, k=after: max(_steps(w), default=0) >= 150 * k, proc)
            time.sleep(delay)
            proc.kill()
            _, err = proc.communicate()
            row(f"SIGKILL {delay:.2f} s after checkpoint {150 * after}", f"exit "
                f"{proc.returncode}; newest on disk: {max(_steps(workdir), default='none')}",
                workdir, err)  # fmt: skip

        workdir = tmp / "save"
        proc = _start(workdir)
        _wait_for(lambda: len(_steps(workdir)) >= 3, proc)
        in_save = _wait_for(
            lambda: _ckpt(workdir).exists()
            and any("tmp" in p.name for p in _ckpt(workdir).iterdir()), proc
        )  # fmt: skip
        proc.kill()
        _, err = proc.communicate()
        row("SIGKILL during a save", f"exit {proc.returncode}; caught mid-save: {in_save}",
            workdir, err)  # fmt: skip

        workdir = tmp / "sigint"
        proc = _start(workdir)
        _wait_for(lambda: len(_steps(workdir)) >= 2, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        row("SIGINT", f"exit {proc.returncode}: `{lines[-1] if lines else '-'}`", workdir, err)

        workdir = tmp / "concurrent"
        first = _start(workdir)
        time.sleep(0.5)  # both start up together; the second reaches fit while the first runs
        code, err = _finish(workdir)
        _, first_err = first.communicate()
        second = [line for line in err.splitlines() if line.startswith("error:")] or ["-"]
        happened = f"second: exit {code}: `{second[-1][:90]}…`; first: exit {first.returncode}"
        row("second run on a busy workdir", happened, workdir, first_err)

        for how in ("zero-byte", "truncated", "garbled (64 bytes)", "metadata missing",
                    "empty step folder"):  # fmt: skip
            workdir = tmp / how.split()[0]
            proc = _start(workdir)
            _wait_for(lambda w=workdir: len(_steps(w)) >= 2, proc)
            proc.kill()
            proc.communicate()
            newest = _steps(workdir)[-1]
            _corrupt(_ckpt(workdir) / str(newest), how)
            row(f"newest checkpoint {how}", f"step {newest} damaged after a kill", workdir, "")
    header = [
        "## Fault table: the entry point under kills, interrupts, a second run and corruption",
        "",
        f"- Date: {report.today()}; machine: {report.machine()}.",
        "- Command: `python -m experiments.fault_table --write` (a subprocess per run of "
        f"`python -m experiments.run {' '.join(ARGS)}`; an uninterrupted run takes "
        f"{duration:.0f} s here).",
        "- 'equal' compares the rerun's final query-MSE curve with the uninterrupted run's, bit "
        "for bit. 'resumed at' is the step the rerun's INFO line reports.",
        "",
        "| fault | what happened | rerun resumed at | refused checkpoint | final result equal |",
        "|---|---|---|---|---|",
    ]
    lines = header + [f"| {' | '.join(r)} |" for r in rows]
    text = "\n".join(lines)
    if args.write:
        report.update_section("fault_table", text)
    print(text)
    return text


if __name__ == "__main__":
    main()
