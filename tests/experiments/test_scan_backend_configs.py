"""``model.scan_backend`` of every Mamba config reaches ``MambaConfig`` and is checked up front.

No training: each config is turned into its ``MambaConfig`` the way the experiment does it.
"""

import importlib
import pathlib

import pytest

from experiments import attd_lra, selective_copy

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
MAMBA_EXPERIMENTS = {"attd_lra", "selective_copy"}  # the experiments that build a Mamba


def mamba_config(cfg):
    if cfg.experiment == "attd_lra":
        return attd_lra.model_config(cfg, 16, 2)
    return selective_copy.model_config("selective", cfg)


def validate(cfg):
    (attd_lra if cfg.experiment == "attd_lra" else selective_copy).validate(cfg)


def mamba_configs():
    """(config name, its default config) of every config file whose experiment builds a Mamba."""
    found = []
    for path in sorted(CONFIGS.glob("*.py")):
        if path.stem == "__init__":
            continue
        cfg = importlib.import_module(f"configs.{path.stem}").get_config()
        if cfg.experiment in MAMBA_EXPERIMENTS:
            found.append((path.stem, cfg))
    return found


def test_every_mamba_config_passes_its_scan_backend():
    found = mamba_configs()
    assert {name for name, _ in found} >= {"attd_lra", "attd_dynamics", "selective_copy"}
    for name, cfg in found:
        assert cfg.model.scan_backend == "reference", name  # the default: unchanged behaviour
        assert mamba_config(cfg).scan_backend == "reference", name
        cfg.model.scan_backend = "pallas"
        assert mamba_config(cfg).scan_backend == "pallas", name


def test_lra_full_asks_for_auto():
    """LRA's lengths (2K-4K) should not run lax.scan once the kernel is proven; "auto" stays on
    it until then (kernels_pallas.selftest)."""
    from configs.attd_lra import get_config

    assert attd_lra.model_config(get_config("lra_full"), 16, 2).scan_backend == "auto"


@pytest.mark.parametrize("name", ["attd_lra", "selective_copy"])
def test_a_bad_scan_backend_is_refused_up_front(name):
    cfg = importlib.import_module(f"configs.{name}").get_config("tiny")
    cfg.model.scan_backend = "cuda"
    with pytest.raises(ValueError, match="model.scan_backend must be one of"):
        validate(cfg)
