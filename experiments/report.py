"""Writing results into BENCHMARKS.md: one marked section per experiment, machine and date.

A section lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; writing it again
replaces only that section, so experiments and benchmarks can each refresh their own figures.
Experiments never write here while they run: ``python -m experiments.run --report --workdir W``
renders a finished workdir, and :func:`publish` keeps the results file the section was rendered
from under ``docs/results/`` so that the section can be rebuilt and checked without retraining.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
from typing import Any

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """One line naming the machine: CPU, cores and the JAX device the run used."""
    import jax

    device = jax.devices()[0]
    return (
        f"{cpu_model()}, {os.cpu_count()} cores; JAX {jax.__version__} on "
        f"{device.platform} ({device.device_kind})"
    )


def today() -> str:
    return datetime.date.today().isoformat()


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


def publish(name: str, body: str, results: Any, root: pathlib.Path | str | None = None) -> None:
    """Renders section ``name`` of BENCHMARKS.md and keeps ``docs/results/<name>.json``."""
    root = BENCHMARKS.parent if root is None else pathlib.Path(root)
    folder = root / "docs" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    update_section(name, body, root / BENCHMARKS.name)
