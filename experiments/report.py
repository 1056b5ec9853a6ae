"""Writing results into BENCHMARKS.md: one marked section per experiment, machine and date.

A section lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; writing it again
replaces only that section, so experiments and benchmarks can each refresh their own figures.
Experiments never write here while they run: ``python -m experiments.run --report --workdir W``
renders a finished workdir, and :func:`publish` keeps the results file the section was rendered
from under ``docs/results/`` so that the section can be rebuilt and checked without retraining.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import re
from typing import Any

from metattt import runlog

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
_RUN: dict[str, str] = {}  # the reported run's date and machine, set by rendering()


def machine() -> str:
    """One line naming the machine of the run being reported: CPU, cores and JAX device.

    Inside :func:`rendering` it is the run's machine (from its ``run_info.json``); otherwise this
    process's, for a benchmark that reports what it just measured."""
    if _RUN:
        return _RUN["machine"]
    import jax

    device = jax.devices()[0]
    return (
        f"{runlog.cpu_model()}, {os.cpu_count()} cores; JAX {jax.__version__} on "
        f"{device.platform} ({device.device_kind})"
    )


def today() -> str:
    """The date of the run being reported (inside :func:`rendering`), else today's."""
    return _RUN["date"] if _RUN else datetime.date.today().isoformat()


def run_provenance(run_info: dict[str, Any]) -> tuple[str, str]:
    """``(date, machine)`` of a run from its ``run_info.json`` record (see
    :func:`metattt.runlog.write_run_info`); a field the record lacks (an older or hand-written
    record) is named as not recorded rather than guessed."""
    devices = run_info.get("devices") or {}
    jax_version = (run_info.get("packages") or {}).get("jax")
    cpu = run_info.get("cpu") or "CPU not recorded"
    cores = run_info.get("cores")
    return (
        (run_info.get("timestamp_utc") or "")[:10] or "date not recorded",
        f"{cpu}, {cores if cores is not None else '?'} cores; JAX {jax_version} on "
        f"{devices.get('platform')} ({devices.get('device_kind')})",
    )


@contextlib.contextmanager
def rendering(date: str, machine_line: str):
    """Within the block, reports name the run's date and machine, not the renderer's: a report
    rendered later, or elsewhere, from a finished workdir keeps its figures' provenance."""
    _RUN.update(date=date, machine=machine_line)
    try:
        yield
    finally:
        _RUN.clear()


def update_section(name: str, body: str, path: pathlib.Path | str = BENCHMARKS) -> None:
    """Replace (or append) the section ``name`` of ``path`` with ``body``."""
    path = pathlib.Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


_NUMBER_LIST = re.compile(r"\[\s*((?:[-+0-9.eENaInfity]+,\s*)*[-+0-9.eENaInfity]+)\s*\]")


def dumps(results: Any) -> str:
    """``results`` as indented JSON with each list of numbers on one line (a curve of a
    thousand points is one line, not a thousand)."""
    text = json.dumps(results, indent=1)
    return _NUMBER_LIST.sub(
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text
    )


def publish(name: str, body: str, results: Any, root: pathlib.Path | str | None = None) -> None:
    """Renders section ``name`` of BENCHMARKS.md and keeps ``docs/results/<name>.json``."""
    root = BENCHMARKS.parent if root is None else pathlib.Path(root)
    folder = root / "docs" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(dumps(results) + "\n")
    update_section(name, body, root / BENCHMARKS.name)
