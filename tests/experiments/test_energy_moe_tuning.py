"""The fast-weight settings chosen on a validation stream (issue 15): the selection rule, the
validation streams' disjointness from the test streams, the tuning's cells and choice (with a
stand-in for serving), its config checks and its report table on the frozen tiny run."""

import json
import os

import numpy as np
import pytest

from configs import energy_moe as energy_config
from configs import energy_moe_digits as digits_config
from experiments import energy_moe
from experiments.energy_moe import digits, lm, runtime, serving, tables, tuning
from experiments.energy_moe.tasks import BPC, Task, task_of
from metattt.data import digits_c

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "energy_moe", "lm", "results.json")


# --- the selection rule ------------------------------------------------------------------------


def test_select_takes_the_cheapest_point_within_the_bound():
    # point:      0     1     2      3     4
    changes = [0.01, 0.06, 0.049, -0.02, 0.05]  # 1 and 4 are not within < 0.05
    energies = [0.90, 0.10, 0.70, 0.80, 0.20]
    assert tuning.select(changes, energies, 0.05) == (2, False)
    # a tie in energy: the first point
    assert tuning.select([0.0, 0.0], [1.0, 1.0], 0.05) == (0, False)


def test_select_falls_back_to_the_best_change_when_no_point_is_within():
    changes = [0.12, 0.07, 0.30]
    energies = [0.1, 0.9, 0.05]
    assert tuning.select(changes, energies, 0.05) == (1, True)


# --- the validation streams ----------------------------------------------------------------------


def test_lm_validation_windows_share_no_byte_with_the_test_stream():
    cfg = energy_config.get_config("tiny")
    streams = lm.load_streams(0)
    test = lm.shifted_stream(cfg, streams, 0)
    valid = lm.validation_stream(cfg, 0, 6)
    span = cfg.data.length + 1
    assert valid.inputs.shape == (6 * cfg.data.batch, cfg.data.length)
    read = np.zeros(streams.shifted.size, bool)
    for start in test.start:  # every byte a test window reads (inputs and targets)
        read[start : start + span] = True
    for start, x, y in zip(valid.start, valid.inputs, valid.targets, strict=True):
        assert not read[start : start + span].any()
        window = streams.shifted[start : start + span].astype(np.int32) + 1  # tokens: bytes + 1
        np.testing.assert_array_equal(x, window[:-1])
        np.testing.assert_array_equal(y, window[1:])
    # not a copy of the test stream's draws: another seed's offsets
    assert not np.isin(valid.start, test.start).any()


def test_digits_validation_stream_draws_no_test_image(monkeypatch):
    """With the corruptions made the identity, every validation image is a train-split image,
    none a test-split one (the digits have no duplicate images)."""
    cfg = digits_config.get_config("tiny")
    x_tr, _, x_te, _ = digits_c.load_digits_split(0, cfg.data.test_fraction)
    monkeypatch.setattr(digits_c, "corrupt", lambda batch, *args: batch)
    valid = digits.validation_stream(cfg, 0, 4)
    assert valid.inputs.shape == (4 * cfg.data.batch, digits.PIXELS)
    train, test = (
        {r.tobytes() for r in digits.tokens(x_tr)},
        {r.tobytes() for r in digits.tokens(x_te)},
    )
    drawn = {r.tobytes() for r in valid.inputs}
    assert drawn <= train and not drawn & test


# --- the tuning's cells and choice, serving replaced by a table ---------------------------------


def _tiny_tuned():
    cfg = energy_config.get_config("tiny")
    cfg.tune.enabled = True
    cfg.seeds = (0, 1)
    return cfg


def test_tune_serves_every_point_per_seed_caches_the_cells_and_chooses_on_the_means(
    tmp_path, monkeypatch
):
    cfg = _tiny_tuned()
    cfg.tune.fast_lrs = (0.5, 1.0)
    cfg.tune.fast_chunks = (4, 8)
    rng = np.random.default_rng(3)
    bpc = {(s, p): float(rng.uniform(2.0, 2.2)) for s in (0, 1) for p in range(5)}
    uj = {(s, p): float(rng.uniform(0.5, 1.0)) for s in (0, 1) for p in range(5)}
    points = tuning.grid(cfg)
    assert points == [(0.5, 4, 1), (0.5, 8, 1), (1.0, 4, 1), (1.0, 8, 1)]
    calls = []

    def serve(cfg_, rt, params, stream, method, *, seed, variant, reference, **kwargs):
        assert stream == ("validation", seed, cfg.tune.stream_batches) and reference == "ref"
        if variant is None:
            assert method.kind == "no_ttt"
            p = 4
        else:
            m = variant.mcfg
            assert method.kind == "fast_ttt" and m.fast_rank > 0
            p = points.index((m.fast_lr, m.fast_chunk, m.fast_steps))
        calls.append((seed, p))
        cell = {key: 1.0 for key in energy_moe.SCALARS}
        cell.update(bpc=bpc[seed, p], uj_per_token=uj[seed, p], dynamic_j=1.0,
                    adapt_dynamic_j=0.0, expert_j=0.5, adapt_calls=1)  # fmt: skip
        return cell

    task = task_of(cfg)
    fake = Task(
        *task[:5], lambda *a: ("params", None, {}, "ref"), lambda c, s, n: ("validation", s, n)
    )
    rt = runtime.build_runtime(cfg, task.model_config(cfg), head=task.head)
    monkeypatch.setattr(serving, "serve", serve)
    record = tuning.tune(cfg, rt, fake, str(tmp_path), rate=1.0)
    assert sorted(calls) == [(s, p) for s in (0, 1) for p in range(5)]
    change = [np.mean([bpc[s, p] / bpc[s, 4] - 1 for s in (0, 1)]) for p in range(4)]
    energy = [np.mean([uj[s, p] for s in (0, 1)]) for p in range(4)]
    for p, row in enumerate(record["points"]):
        assert row["bpc_change"]["mean"] == pytest.approx(change[p], rel=1e-12)
        assert row["uj_per_token"]["mean"] == pytest.approx(energy[p], rel=1e-12)
    within = [p for p in range(4) if change[p] < 0.05]
    assert within  # the draws put some points within 5%
    assert record["chosen"] == min(within, key=lambda p: energy[p]) and not record["fallback"]
    assert record["settings"] == points[record["chosen"]]._asdict()
    # a rerun reads every cell back
    monkeypatch.setattr(serving, "serve", lambda *a, **k: pytest.fail("a cell was recomputed"))
    assert json.dumps(tuning.tune(cfg, rt, fake, str(tmp_path), rate=1.0)) == json.dumps(record)
    # the chosen setting names the fast-weight methods' test cells
    tuned = tuning.with_point(cfg, points[record["chosen"]])
    method = energy_moe.parse_method("fast_ttt/4")
    assert (
        tuning.cell_name(tuned, "fast_ttt/4", method)
        == f"fast_ttt/4~{points[record['chosen']].tag}"
    )
    assert tuning.cell_name(tuned, "no_ttt", energy_moe.Method("no_ttt")) == "no_ttt"


@pytest.mark.parametrize(
    "config, key, value, message",
    [
        (energy_config, "method", "lora_ttt/4", "tune.method must be one of the config's fast"),
        (energy_config, "fast_lrs", (1.5,), r"tune.fast_lrs in \(0, 1\]"),
        (energy_config, "fast_chunks", (), "need non-empty tune.fast_lrs"),
        (energy_config, "fast_step_counts", (0,), "tune.fast_step_counts >= 1"),
        (energy_config, "max_change", 0.0, "tune.max_change must be > 0"),
        (energy_config, "stream_batches", 0, "tune.stream_batches=0: "),
        (digits_config, "stream_batches", 3, "tune.stream_batches=3: data.stream_batches must"),
    ],
)
def test_bad_tune_values_are_rejected(config, key, value, message):
    cfg = config.get_config("tiny")
    cfg.tune.enabled = True
    cfg.tune[key] = value
    with pytest.raises(ValueError, match=message):
        energy_moe.validate(cfg)


# --- the report table on the frozen tiny run ---------------------------------------------------


def test_tuning_table_of_the_frozen_tiny_run():
    """The fixture's tuning record comes from the tiny run with ``tune.enabled`` (two points):
    one row per point with its numbers, the chosen one marked; no table without a record."""
    with open(FIXTURE) as f:
        results = json.load(f)
    t = results["tuning"]
    lines = tables.tuning_table(results, BPC)
    rows = [x for x in lines if x.startswith("| ") and x[2].isdigit()]
    assert len(rows) == len(t["points"]) == 2
    for i, (line, p) in enumerate(zip(rows, t["points"], strict=True)):
        cells = line.split(" | ")
        assert cells[0] == f"| {p['fast_lr']:g}" and cells[1:3] == [str(p["fast_chunk"]), "1"]
        assert cells[3] == f"{p['bpc']['mean']:.3f}"
        assert cells[4] == f"{100 * p['bpc_change']['mean']:.1f}%"
        assert cells[5] == f"{p['uj_per_token']['mean']:.4f}"
        assert line.endswith("| **yes** |") == (i == t["chosen"])
    assert "the lowest µJ/token at Δ bits/char < 5%" in lines[1]
    edge = "At the grid's edge: fast_lr 0.5 is the smallest tried."  # one chunk, one step count
    assert lines[1].endswith(edge) == (t["points"][t["chosen"]]["fast_lr"] == 0.5)
    assert tables.tuning_table({k: v for k, v in results.items() if k != "tuning"}, BPC) == []
