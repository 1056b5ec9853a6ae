"""The ablation matrix: one :class:`metattt.tta.TTAProtocol` per named cell, and the names.

A cell is named ``layers/reset|cumulative/setting`` in the config's loss mode and
``layers/reset/setting/<mode>`` in the other mode; the unadapted run is ``baseline``. The
report reads a cell's fields back from its name with :func:`parse_cell`.
"""

from __future__ import annotations

from typing import NamedTuple

from metattt import tta

BASELINE = "baseline"
#: The predictor's adaptation losses (:func:`metattt.models.dynamics.clip_losses`).
MODES = ("rollout", "one_step")


class Cell(NamedTuple):
    """The fields of a cell's name (``"-"`` for the baseline's layers, reset and setting)."""

    layers: str
    reset: str  # "reset" | "cumulative" | "-"
    setting: str
    mode: str


def protocol_from_config(
    cfg, adapt_layers: str, reset: bool, setting: str, mode: str | None = None
) -> tta.TTAProtocol:
    """One cell of the ablation as a :class:`metattt.tta.TTAProtocol` (validated)."""
    s = cfg.ablation.settings[setting]
    return tta.TTAProtocol(
        enabled=adapt_layers != "none",
        mode=mode or cfg.protocol.mode,
        num_adaptation_steps=int(s.steps),
        lr=float(s.lr),
        clip_norm=float(s.clip_norm) if s.clip_norm else None,
        reset_per_clip=bool(reset),
        adapt_layers=adapt_layers,
        window=int(cfg.protocol.window),
        optimizer=cfg.protocol.optimizer,
    )


def cell_name(layers: str, reset: bool, setting: str, other_mode: str | None = None) -> str:
    """The name of a cell; ``other_mode`` names a cell in the loss mode other than the run's."""
    base = f"{layers}/{'reset' if reset else 'cumulative'}/{setting}"
    return f"{base}/{other_mode}" if other_mode else base


def cells(cfg) -> dict[str, tta.TTAProtocol]:
    """``{name: protocol}``: the baseline, layers x reset x setting, then the other mode."""
    for mode in (cfg.protocol.mode, cfg.ablation.other_mode or MODES[0]):
        if mode not in MODES:
            raise ValueError(f"unknown TTA mode {mode!r}; known modes: {MODES}")
    out = {BASELINE: protocol_from_config(cfg, "none", True, next(iter(cfg.ablation.settings)))}
    for layers in cfg.ablation.adapt_layers:
        for reset in cfg.ablation.resets:
            for setting in cfg.ablation.settings:
                out[cell_name(layers, reset, setting)] = protocol_from_config(
                    cfg, layers, reset, setting
                )
    if cfg.ablation.other_mode:
        for layers in cfg.ablation.adapt_layers:
            for setting in cfg.ablation.other_mode_settings:
                other = cfg.ablation.other_mode
                out[cell_name(layers, True, setting, other)] = protocol_from_config(
                    cfg, layers, True, setting, mode=other
                )
    return out


def parse_cell(name: str, mode: str) -> Cell:
    """The fields of cell ``name``; ``mode`` is the run's main loss mode."""
    if name == BASELINE:
        return Cell(BASELINE, "-", "-", mode)
    layers, reset, setting, *other = name.split("/")
    return Cell(layers, reset, setting, other[0] if other else mode)
