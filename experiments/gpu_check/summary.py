"""The GPU check's report as text: one line per section, then the figures a reader acts on."""

from __future__ import annotations


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f} ms"


def _err(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def _kernel_lines(name: str, results: dict) -> list[str]:
    lines = []
    for dtype, block in results.items():
        if not isinstance(block, dict) or "rows" not in block:
            continue
        lines.append(f"{name} {dtype}: {block['header'][:160]}")
        for row in block["rows"]:
            cells = [row.get("part", ""), row["pass"], row["backend"], _ms(row["seconds"])]
            if row.get("x_floor") is not None:
                cells.append(f"{row['x_floor']:.2f}x floor")
            if row.get("of_dense") is not None:
                cells.append(f"{100 * row['of_dense']:.0f}% of dense")
            if row.get("error") is not None:
                verdict = "ok" if row.get("error_ok") else "TOO LARGE"
                cells.append(f"error {_err(row['error'])} ({verdict})")
            if "meets_target" in row:
                cells.append("meets the target" if row["meets_target"] else "misses the target")
            if row.get("status"):
                cells.append(str(row["status"]))
            lines.append("   " + " | ".join(c for c in cells if c))
        for key, cmp in (block.get("tokamax_vs_ours") or {}).items():
            ratio = "-" if cmp["ratio"] is None else f"{cmp['ratio']:.2f}x"
            lines.append(
                f"   tokamax vs {cmp['best_ours']} ({key}): {ratio} the time"
                f"{' (faster)' if cmp['faster'] else ''}; {cmp['lowering'] or ''}".rstrip("; ")
            )
    return lines


def render(report: dict) -> str:
    """The summary of a ``gpu_check.json`` report."""
    lines = ["", "===== gpu check summary =====", f"size {report['size']}"]
    lines[-1] += (
        f", elapsed {report.get('elapsed_s', '?')} s of a {report['budget_s']:.0f} s budget"
    )
    sections = report["sections"]
    for name, sec in sections.items():
        errors = ", ".join(sec.get("errors") or {})
        line = f"[{name}] {sec['status']}"
        if "seconds" in sec:
            line += f" in {sec['seconds']} s (timeout {sec['timeout_s']:.0f} s)"
        lines.append(line + (f"; errors: {errors}" if errors else ""))
    env = sections.get("env", {}).get("results", {})
    if env:
        versions = env.get("versions", {})
        devices = (env.get("devices") or {}).get("devices") or [{}]
        lines.append(
            f"jax {versions.get('jax')} on {devices[0].get('kind')} "
            f"(cc {devices[0].get('compute_capability')}); Pallas GPU lowering flag "
            f"{env.get('pallas_gpu_backend')}; auto: {env.get('auto')}"
        )
        lines.append(f"tiles: {env.get('tiles')}")
    tests = sections.get("selftest", {}).get("results", {})
    for key, verdict in tests.items():
        if isinstance(verdict, dict):
            state = "passed" if verdict.get("passed") else f"FAILED: {verdict.get('reason')}"
            lines.append(f"self-test {key}: {state}")
    if tests and all(v.get("passed") for v in tests.values() if isinstance(v, dict)):
        lines.append(
            f"all self-tests passed on {tests.get('device_kind')!r}: a candidate for "
            "kernels_pallas.selftest.PROVEN once the figures below are recorded"
        )
    pytest = sections.get("pytest_gpu", {}).get("results", {})
    if "tests" in pytest:
        lines.append(
            f"pytest -m gpu: {pytest['passed']} passed, {pytest['failures']} failed, "
            f"{pytest['errors']} errors, {pytest['skipped']} skipped"
        )
        lines += [f"   FAILED {t}: {m[:200]}" for t, m in pytest["failed"].items()]
    for name in ("scan", "dispatch"):
        lines += _kernel_lines(name, sections.get(name, {}).get("results", {}))
    for key, step in sections.get("models", {}).get("results", {}).items():
        if key.endswith("/agreement"):
            lines.append(
                f"{key}: kernel vs jnp step, loss {_err(step['loss'])}, grad norm "
                f"{_err(step['grad_norm'])} ({'ok' if step['ok'] else 'TOO LARGE'})"
            )
        elif isinstance(step, dict):
            lines.append(
                f"{key}: loss {step['loss']:.4g}, finite {step['finite']}, step "
                f"{_ms(step['median_s'])} (compile + first {step['compile_and_first_s']:.1f} s)"
            )
    return "\n".join(lines) + "\n"
