"""The configurable TTA protocol: an ablation of adapted layers, reset and step settings.

A small action-conditioned transformer predictor (:mod:`metattt.models.dynamics`) is trained
on the source regime of a synthetic controlled system (H-step rollout loss, Adam, with
:func:`metattt.train.fit`: checkpointed under ``workdir/source/seed_<s>``, resumed on a
rerun). It is then adapted clip by clip with :func:`metattt.tta.run_protocol` on shifted
regimes whose clips alternate between two opposite sub-populations. Every cell of the matrix
(adapted layers x reset/cumulative x setting, plus the unadapted baseline; see
:mod:`~experiments.tta_protocol.cells`) logs every clip to tensorboardX and JSON lines under
``workdir/<shift>/<cell>/seed_<s>``; ``results.json``, a summary table and a rolling-loss plot
go into ``workdir``; ``python -m experiments.run --report --workdir W`` renders them, with a
reading generated from the per-seed numbers, into BENCHMARKS.md and docs/.
"""

from experiments.tta_protocol.cells import BASELINE, cells, protocol_from_config
from experiments.tta_protocol.main import (
    TEST_SEED,
    demo_rows,
    predictor_config,
    run,
    stream_clips,
    train_source,
    validate,
)
from experiments.tta_protocol.report import (
    kept_results,
    plot_rolling,
    ratios,
    reading,
    summary,
    summary_table,
    write_report,
)

__all__ = [
    "BASELINE",
    "TEST_SEED",
    "cells",
    "demo_rows",
    "kept_results",
    "plot_rolling",
    "predictor_config",
    "protocol_from_config",
    "ratios",
    "reading",
    "run",
    "stream_clips",
    "summary",
    "summary_table",
    "train_source",
    "validate",
    "write_report",
]
