"""The tutorials (docs/tutorials/*.py, jupytext percent scripts) run as written, and what
their text claims holds on what they computed."""

import pathlib
import runpy

import pytest

TUTORIALS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "tutorials"


def run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a tutorial writes into ./tutorial_output
    namespace = runpy.run_path(str(TUTORIALS / f"{name}.py"), run_name="__main__")
    assert (tmp_path / "tutorial_output" / f"{name}.png").stat().st_size > 5000
    return namespace


def test_every_tutorial_is_tested():
    tested = {
        "tent_own_model",
        "online_delayed_labels",
        "maml_own_tasks",
        "attd_mamba",
        "energy_moe_budget",
    }
    assert {p.stem for p in TUTORIALS.glob("*.py")} == tested


@pytest.mark.slow
def test_tent_on_your_own_model(tmp_path, monkeypatch, capsys):
    ns = run("tent_own_model", tmp_path, monkeypatch)
    # the preset takes the LayerNorm named enc_ln (32 features) and nothing else
    out = capsys.readouterr().out
    assert "selected:\n  enc_ln  bias, scale  (2 leaves, 64 parameters)\nnot selected:" in out
    assert ns["accuracy"](ns["source"], ns["x_id"], ns["y_id"]) > 0.9  # the source model learned
    assert all(float(c[-1]) < float(c[0]) for c in ns["curves"])  # TENT lowers the entropy
    assert ns["mean"](ns["before"]) < 0.9  # and the shift does hurt the source model


@pytest.mark.slow
def test_online_adaptation_with_delayed_labels(tmp_path, monkeypatch):
    ns = run("online_delayed_labels", tmp_path, monkeypatch)
    late = ns["last"]
    assert float(ns["online_error"][late].mean()) < 0.2 * float(ns["frozen_error"][late].mean())
    assert int(ns["result"].updated.sum()) == ns["T"] - ns["H"]


@pytest.mark.slow
def test_maml_on_your_own_tasks_with_fit(tmp_path, monkeypatch):
    ns = run("maml_own_tasks", tmp_path, monkeypatch)
    meta, scratch = ns["curves"]["meta-learned"], ns["curves"]["random init"]
    assert meta[1].high < scratch[1].low  # one step from the meta-learned init beats scratch
    assert meta[5].mean < meta[0].mean
    workdir = pathlib.Path(ns["workdir"])
    assert sorted(p.name for p in (workdir / "ckpt").iterdir()) == ["400", "600"]  # resumed
    assert any((workdir / "tb").iterdir())  # TensorBoard events


@pytest.mark.slow
def test_attd_on_a_mamba(tmp_path, monkeypatch):
    ns = run("attd_mamba", tmp_path, monkeypatch)
    in_dist, warped = ns["rows"]["in-dist."], ns["rows"]["warped"]
    assert in_dist[0] > warped[0] + 0.2  # the warp hurts the fixed model
    assert warped[2].mean() > in_dist[2].mean()  # and ATTD spends more steps on warped inputs


@pytest.mark.slow
def test_energy_aware_moe_under_a_power_budget(tmp_path, monkeypatch):
    ns = run("energy_moe_budget", tmp_path, monkeypatch)
    assert ns["budget_w"] < ns["unadapted"]  # the budget binds on the unadapted routing
    assert ns["late"] <= 1.02 * ns["budget_w"]  # adapted routing meets it by the end
    lams = ns["log"]["lam"]
    assert all(ns["controller"].lam_min <= lam <= ns["controller"].lam_max for lam in lams)
