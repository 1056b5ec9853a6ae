"""Sinusoid regression (MAML, Finn et al. 2017): train each method, then adapt on new tasks.

Methods share one code path: a meta-loss from :mod:`metattt.meta` and the resumable
:func:`metattt.train.fit`. ``pretrained`` is the same meta-loss with zero inner steps (plain
multi-task regression); at test time every method takes SGD steps at the inner rate
(Meta-SGD with its learned per-parameter rates) on K support points, and the query MSE is
recorded after 0..max_steps steps on held-out tasks (:func:`metattt.inner.adaptation_curve`).
"""

from experiments.sinusoid.main import (
    EVAL_SEED,
    METHODS,
    VALIDATION_SEED,
    adaptation_curve,
    demo_rows,
    run,
    summarize_curves,
    train,
    tune_lr,
    validate,
)
from experiments.sinusoid.report import plot_curves, section, summary, table, write_report

__all__ = [
    "EVAL_SEED",
    "METHODS",
    "VALIDATION_SEED",
    "adaptation_curve",
    "demo_rows",
    "plot_curves",
    "run",
    "section",
    "summarize_curves",
    "summary",
    "table",
    "train",
    "tune_lr",
    "validate",
    "write_report",
]
