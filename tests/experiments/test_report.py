"""BENCHMARKS.md sections are replaced in place and appended when new."""

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
    (workdir / "run_info.json").write_text(json.dumps({"config": config}))
    results = {
        "selective": {"accuracy": 0.987, "train_seconds": 12.0},
        "time_invariant": {"accuracy": 0.431, "train_seconds": 11.0},
    }
    (workdir / "results.json").write_text(json.dumps(results))
    assert run.report_workdir(str(workdir)) == "selective_copy"
    text = (tmp_path / "repo" / "BENCHMARKS.md").read_text()
    assert "<!-- selective_copy:start -->" in text and "| selective | 0.987 |" in text
    kept = json.loads((tmp_path / "repo" / "docs" / "results" / "selective_copy.json").read_text())
    assert kept == results
