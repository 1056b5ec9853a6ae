"""Selective copying: does the model's input-dependent (selective) scan matter?

The input holds ``num_tokens`` data tokens at random positions among noise tokens, then
``num_tokens`` answer markers (:func:`metattt.data.selective_copy.sample`); at the j-th marker
the model must output the j-th data token (next-token head, causal). A time-invariant SSM of
the same size can only apply one fixed convolution, so it cannot filter out the noise at
data-dependent positions (Gu & Dao, 2023). Metric: per-token accuracy at the answer slots on
fresh sequences.
"""

from experiments.selective_copy.main import (
    VARIANTS,
    answer_accuracy,
    model_config,
    run,
    train_and_eval,
    validate,
)
from experiments.selective_copy.report import reading, section, summary, write_report

__all__ = [
    "VARIANTS",
    "answer_accuracy",
    "model_config",
    "reading",
    "run",
    "section",
    "summary",
    "train_and_eval",
    "validate",
    "write_report",
]
