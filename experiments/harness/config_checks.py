"""Checks every experiment's config gets before anything runs: one line naming the key.

Experiments validate their own keys; these are the conventions shared by all of them, checked
by name wherever a key appears in the config tree: learning rates (``lr``, ``*_lr``, ``lr_*``)
are finite and positive; counts of steps, batches and intervals are positive ints; ``clip_norm``
is 0 / None (no clipping) or finite and positive; ``seeds`` is non-empty and without repeats
(a repeated seed would shrink a confidence interval with a copy of one run). A ``distributed``
section (several processes, see README.md "Multi-host") has a positive ``initialization_timeout``
in seconds, a positive ``num_processes`` and a ``process_id`` below it where they are set, and a
``coordinator_address`` that is "" or ``HOST:PORT``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["check_config", "section_to"]

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


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_distributed(section: Mapping[str, Any]) -> None:
    where = "config.distributed"
    timeout = section.get("initialization_timeout")
    if timeout is not None and not _positive_int(timeout):
        raise ValueError(
            f"{where}.initialization_timeout must be a positive int (seconds), got {timeout!r}"
        )
    count, index = section.get("num_processes"), section.get("process_id")
    if count is not None and not _positive_int(count):
        raise ValueError(f"{where}.num_processes must be a positive int, got {count!r}")
    if index is not None and (
        isinstance(index, bool)
        or not isinstance(index, numbers.Integral)
        or index < 0
        or (count is not None and index >= count)
    ):
        within = f" below num_processes={count}" if count is not None else ""
        raise ValueError(f"{where}.process_id must be an int >= 0{within}, got {index!r}")
    address = section.get("coordinator_address") or ""
    host, _, port = address.rpartition(":")
    if address and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f'{where}.coordinator_address must be HOST:PORT (or ""), got {address!r}')


def check_config(config: Mapping[str, Any], prefix: str = "") -> None:
    """Raises a one-line ValueError for the first key that breaks the shared conventions."""
    if not prefix and config.get("distributed") is not None:
        _check_distributed(config["distributed"])
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "items") and not isinstance(value, str):
            check_config(value, prefix=f"{path}.")
        else:
            _check(path, key, value)


def check_mesh_devices(key: str, devices: int, sizes: Mapping[str, int], what: str) -> None:
    """One line unless ``devices`` (config key ``key``) is 0 or divides every size in ``sizes``
    (config key -> value): each device must get an equal share of the ``what``."""
    for size_key, size in sizes.items():
        if devices < 0 or (devices and size % devices):
            raise ValueError(
                f"{key}={devices} must be 0 or divide {size_key}={size} (each device gets an "
                f"equal share of the {what})"
            )


def section_to(cls: type, section: Mapping[str, Any], **overrides: Any) -> Any:
    """A config section as the library dataclass ``cls``: each of its fields from the key of
    the same name (a field the section lacks keeps its default), ``overrides`` last; the
    result's ``validate()`` runs when ``cls`` has one, so a bad value fails here, by name."""
    values = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section}
    out = cls(**{**values, **overrides})
    return out.validate() if hasattr(out, "validate") else out
