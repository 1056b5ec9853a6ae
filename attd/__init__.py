"""Adaptive Test-Time Dynamics (ATTD) on a Mamba SSM, built on the metattt core.

A low-rank adapter psi = (U, V) on the log state matrix (A = -exp(A_log0 + U V^T)) is trained
at test time, per input, for a number of inner steps that a monotone threshold controller
picks from a "ponder" signal (the internal self-supervised loss at psi_0).

Modules: :mod:`~attd.mamba` (the pure Mamba model), :mod:`~attd.dynamics` (the adapter and its
stability diagnostics), :mod:`~attd.controller` (threshold, gate and fixed-K controllers),
:mod:`~attd.method` (ponder signal, adaptive inner loop, joint objective, baselines),
:mod:`~attd.lra` (Long Range Arena ListOps, Pathfinder and byte-level Text: generators and
loaders for the official file layouts) and :mod:`~attd.shifts` (tasks whose test shift is in
the temporal dynamics: time-warped waveforms, latent linear systems with changed timescales).
"""

from attd import lra, shifts
from attd.controller import (
    Controller,
    fixed_controller,
    gate_controller,
    quantile_thresholds,
    threshold_controller,
)
from attd.dynamics import (
    ADAPTERS,
    Adapter,
    Psi,
    a_log_delta,
    init_psi,
    make_adapter,
    max_transition,
)
from attd.mamba import MambaConfig, init_mamba
from attd.method import ATTD, make_attd

__all__ = [
    "ADAPTERS",
    "ATTD",
    "Adapter",
    "Controller",
    "MambaConfig",
    "Psi",
    "a_log_delta",
    "fixed_controller",
    "gate_controller",
    "init_mamba",
    "init_psi",
    "lra",
    "make_adapter",
    "make_attd",
    "max_transition",
    "quantile_thresholds",
    "shifts",
    "threshold_controller",
]
