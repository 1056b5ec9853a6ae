"""``make demo``: a short run of each system on built-in data, one summary table at the end.

Each entry trains briefly and reports a metric before and after test-time adaptation, with its
wall time. Runs go to a temporary directory (nothing to clean up, nothing resumed).
"""

from __future__ import annotations

import logging
import tempfile
import time

from experiments import attd_lra, drift_adapters, energy_moe, forecasting, sinusoid, tta_protocol


def format_table(rows) -> str:
    head = ("system", "method", "metric", "before", "after", "wall s")
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for system, method, metric, before, after, seconds in rows:
        lines.append(
            f"| {system} | {method} | {metric} | {before:.3f} | {after:.3f} | {seconds:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="metattt_demo_") as workdir:
        rows = []
        systems = (
            sinusoid.demo_rows,
            drift_adapters.demo_rows,
            tta_protocol.demo_rows,
            attd_lra.demo_rows,
            forecasting.demo_rows,
            energy_moe.demo_rows,
        )
        for system in systems:
            rows += system(workdir)
    print()
    print(format_table(rows))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
