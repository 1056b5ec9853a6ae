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
