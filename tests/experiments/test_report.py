"""BENCHMARKS.md sections are replaced in place and appended when new."""

import numpy as np
import pytest

from experiments import report


def test_update_section_replaces_only_its_block(tmp_path):
    path = tmp_path / "B.md"
    report.update_section("a", "first", path)
    report.update_section("b", "other", path)
    report.update_section("a", "second\nline", path)
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "first" not in text and "second\nline" in text and "other" in text
    assert text.index("<!-- a:start -->") < text.index("<!-- b:start -->")
    assert text.count("<!-- a:end -->") == 1


def test_report_step_renders_a_finished_workdir_without_training(tmp_path, monkeypatch):
    import json

    import pytest

    from configs import selective_copy as sc
    from experiments import run

    monkeypatch.setattr(report, "BENCHMARKS", tmp_path / "repo" / "BENCHMARKS.md")
    workdir = tmp_path / "w"
    workdir.mkdir()
    with pytest.raises(FileNotFoundError, match="needs a finished run: .*run_info.json"):
        run.report_workdir(str(workdir))
    config = sc.get_config("tiny").to_dict()
    run_info = {
        "config": config,
        "timestamp_utc": "2026-01-02T03:04:05+00:00",
        "cpu": "Some CPU",
        "cores": 7,
        "packages": {"jax": "0.0.1"},
        "devices": {"platform": "cpu", "device_kind": "cpu"},
    }
    (workdir / "run_info.json").write_text(json.dumps(run_info))
    one = lambda v: {"mean": v, "ci": float("nan"), "per_seed": [v]}  # noqa: E731
    results = {
        "selective": {"accuracy": one(0.987), "train_seconds": one(12.0)},
        "time_invariant": {"accuracy": one(0.431), "train_seconds": one(11.0)},
    }
    (workdir / "results.json").write_text(json.dumps(results))
    assert run.report_workdir(str(workdir)) == "selective_copy"
    text = (tmp_path / "repo" / "BENCHMARKS.md").read_text()
    assert "<!-- selective_copy:start -->" in text and "| selective | 0.987 |" in text
    # The run's own date and machine, not the rendering's.
    assert "2026-01-02" in text and "Some CPU, 7 cores; JAX 0.0.1 on cpu (cpu)" in text
    assert report.today() != "2026-01-02" and "Some CPU" not in report.machine()
    kept = json.loads((tmp_path / "repo" / "docs" / "results" / "selective_copy.json").read_text())
    assert json.dumps(kept) == json.dumps(results)  # NaN-safe


RESULTS = report.BENCHMARKS.parent / "docs" / "results"


def _section(text: str, name: str) -> list[str]:
    """The section's lines, less the one that names the date and machine of the rendering."""
    body = text.split(f"<!-- {name}:start -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]
    return [line for line in body.strip().splitlines() if not line.startswith("- Date: ")]


def _config_of(name: str):
    """The full config that renders section ``name``: ``configs/<name>.py``, or a variant of
    a config file whose name is a prefix (``attd_dynamics_recorded`` is
    ``configs/attd_dynamics.py:recorded``)."""
    import importlib

    parts = name.split("_")
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(f"configs.{'_'.join(parts[:i])}")
        except ModuleNotFoundError:
            continue
        config = module.get_config("_".join(parts[i:]) or None)
        assert config.get("section", name) == name, (name, config.get("section"))
        return config
    raise AssertionError(f"no config renders section {name!r}")


@pytest.mark.parametrize("name", sorted(p.stem for p in RESULTS.glob("*.json")))
def test_benchmarks_sections_are_rendered_from_their_kept_results(name, tmp_path, monkeypatch):
    """BENCHMARKS.md's section equals what the report step renders from docs/results/NAME.json
    and the experiment's full config: no figure there was written by hand or left stale."""
    import importlib
    import json

    config = _config_of(name)
    module = importlib.import_module(f"experiments.{config.experiment}")
    monkeypatch.setattr(report, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    results = json.loads((RESULTS / f"{name}.json").read_text())
    module.write_report(results, config, str(tmp_path / "w"))
    rendered = (tmp_path / "BENCHMARKS.md").read_text()
    kept = (RESULTS.parents[1] / "BENCHMARKS.md").read_text()
    assert _section(rendered, name) == _section(kept, name)


def test_run_provenance_names_missing_fields_instead_of_failing():
    """An older or hand-written run_info.json still renders; what it lacks is said, not guessed."""
    date, machine = report.run_provenance({"config": {}})
    assert date == "date not recorded" and machine.startswith("CPU not recorded, ? cores")
    date, machine = report.run_provenance(
        {"timestamp_utc": "2026-05-06T07:08:09+00:00", "cpu": "X", "cores": 3}
    )
    assert date == "2026-05-06" and machine.startswith("X, 3 cores")


def test_dumps_keeps_number_lists_on_one_line_and_round_trips():
    """A kept curve is one line; everything, NaN and nested lists included, reads back equal."""
    import json
    import math

    rng = np.random.default_rng(0)
    results = {
        "curve": rng.normal(size=50).tolist(),
        "nested": {"rows": rng.integers(-9, 9, size=(3, 4)).tolist(), "names": ["a", "b"]},
        "mixed": [1, "z", None],
        "nan": [1.5, float("nan"), -2e-7],
    }
    text = report.dumps(results)
    back = json.loads(text)
    assert back["curve"] == results["curve"] and back["nested"] == results["nested"]
    assert back["mixed"] == results["mixed"] and math.isnan(back["nan"][1])
    assert back["nan"][0] == 1.5 and back["nan"][2] == -2e-7
    curve_lines = [line for line in text.splitlines() if '"curve"' in line]
    assert len(curve_lines) == 1 and curve_lines[0].rstrip(",").count(",") == 49
