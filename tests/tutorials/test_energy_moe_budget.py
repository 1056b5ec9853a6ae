"""The tutorial runs as written, and what its text claims holds on its numbers."""

import pytest

from tests.tutorials.running import run


@pytest.mark.slow
def test_energy_aware_moe_under_a_power_budget(tmp_path, monkeypatch):
    ns = run("energy_moe_budget", tmp_path, monkeypatch)
    assert ns["budget_w"] < ns["unadapted"]  # the budget binds on the unadapted routing
    assert ns["late"] <= 1.02 * ns["budget_w"]  # adapted routing meets it by the end
    lams = ns["log"]["lam"]
    assert all(ns["controller"].lam_min <= lam <= ns["controller"].lam_max for lam in lams)
