"""The drift-adapter experiment end to end (tiny config), its config checks and demo rows."""

import json
import os

import numpy as np
import pytest

from configs import drift_adapters as config
from experiments import drift_adapters


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("drift_adapters")
    cfg = config.get_config("tiny")
    return cfg, drift_adapters.run(cfg, str(workdir)), workdir


@pytest.mark.slow
def test_tiny_run_dynamic_adapter_beats_no_adaptation_after_drift(tiny):
    cfg, results, workdir = tiny
    summary = results["summary"][cfg.objectives[0]]
    dynamic, none = summary["dynamic"], summary["none"]
    static = summary[f"static:{cfg.adapter.max_rank}"]
    assert dynamic["acc_post_drift"]["mean"] > none["acc_post_drift"]["mean"]
    # The adapter exists only while drifted: fewer active parameters than the static one.
    assert 0 < dynamic["mean_active_params"]["mean"] < static["mean_active_params"]["mean"]
    # One compiled step served every method and every alloc / realloc / free.
    assert results["step_traces"] == 1
    (run,) = results["streams"][cfg.objectives[0]]["dynamic"][cfg.stream.corruptions[0]]
    ops = [e[0] for e in run["events"]]
    assert ops[0] == "alloc" and "free" in ops
    onset = cfg.stream.clean_steps
    assert onset <= run["events"][0][1] <= onset + 5 * cfg.stream.steps_per_severity
    assert set(np.unique(run["rank"])) <= {0, 2, 4, 8}
    # The TENT comparison and the written artefacts.
    assert set(results["tent_summary"]["clean"]) == {"source", "norm", "tent"}
    assert os.path.getsize(workdir / "drift_adapters_stream.png") > 1000
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["step_traces"] == 1


@pytest.mark.slow
def test_demo_rows_have_the_demo_table_format(tiny, monkeypatch, tmp_path):
    _, results, _ = tiny
    monkeypatch.setattr(drift_adapters, "run", lambda cfg, workdir: results)
    rows = drift_adapters.demo_rows(str(tmp_path))
    assert len(rows) == 4
    for system, method, metric, before, after, seconds in rows:
        assert isinstance(system, str) and isinstance(method, str) and isinstance(metric, str)
        assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0 and seconds >= 0.0


def test_segments_cover_the_stream():
    cfg = config.get_config("tiny")
    seg = drift_adapters.segments(cfg)
    assert seg["clean"] == (0, cfg.stream.clean_steps)
    assert seg["after"][1] == drift_adapters.num_stream_steps(cfg)
    assert seg["post_drift"] == (cfg.stream.clean_steps, drift_adapters.num_stream_steps(cfg))
    assert [seg[f"sev{s}"][1] - seg[f"sev{s}"][0] for s in range(1, 6)] == [
        cfg.stream.steps_per_severity
    ] * 5


@pytest.mark.parametrize(
    "method, parsed",
    [("none", ("none", 0)), ("dynamic", ("dynamic", 0)), ("static:8", ("static", 8))],
)
def test_parse_method(method, parsed):
    assert drift_adapters.parse_method(method) == parsed


@pytest.mark.parametrize(
    "override, message",
    [
        (lambda c: setattr(c, "methods", ("static:0",)), "unknown drift_adapters method"),
        (lambda c: setattr(c, "methods", ("static:16",)), "exceeds adapter.max_rank"),
        (lambda c: setattr(c, "objectives", ("kl",)), "unknown objective"),
        (lambda c: setattr(c.stream, "corruptions", ("fog",)), "unknown corruption"),
        (lambda c: setattr(c.stream, "clean_steps", 300), "must exceed detector.warmup"),
    ],
)
def test_validate_rejects_bad_configs(override, message):
    cfg = config.get_config("tiny")
    override(cfg)
    with pytest.raises(ValueError, match=message):
        drift_adapters.validate(cfg)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        config.get_config("huge")
