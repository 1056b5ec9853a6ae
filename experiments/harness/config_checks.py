"""Checks every experiment's config gets before anything runs: one line naming the key.

Experiments validate their own keys; these are the conventions shared by all of them, checked
by name wherever a key appears in the config tree: learning rates (``lr``, ``*_lr``, ``lr_*``)
are finite and positive; counts of steps, batches and intervals are positive ints; ``clip_norm``
is 0 / None (no clipping) or finite and positive; ``seeds`` is non-empty and without repeats
(a repeated seed would shrink a confidence interval with a copy of one run).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["check_config"]

POSITIVE_COUNTS = frozenset(
    {
        "batch",
        "batch_size",
        "checkpoint_every",
        "log_every",
        "meta_batch",
        "num_steps",
        "steps",
        "steps_per_call",
        "tasks_per_step",
        "train_steps",
    }
)
SEED_LISTS = frozenset({"seeds", "ablation_seeds"})


def _is_rate(key: str) -> bool:
    return key == "lr" or key.endswith("_lr") or key.startswith("lr_")


def _check(path: str, key: str, value: Any) -> None:
    where = f"config.{path}"
    if _is_rate(key):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where} must be a learning rate (a number), got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{where} must be a finite learning rate > 0, got {value!r}")
    elif key in POSITIVE_COUNTS:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{where} must be a positive int, got {value!r}")
    elif key == "clip_norm" and value not in (None, 0):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where} must be a number (0 or None: no clipping), got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"{where} must be finite and > 0 (0 or None: no clipping), got {value!r}"
            )
    elif key in SEED_LISTS:
        seeds = list(value)
        if key == "seeds" and not seeds:
            raise ValueError(f"{where} is empty: give at least one seed (three to report)")
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"{where} repeats seed(s) {repeated}: each seed must be distinct")


def check_config(config: Mapping[str, Any], prefix: str = "") -> None:
    """Raises a one-line ValueError for the first key that breaks the shared conventions."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "items") and not isinstance(value, str):
            check_config(value, prefix=f"{path}.")
        else:
            _check(path, key, value)
