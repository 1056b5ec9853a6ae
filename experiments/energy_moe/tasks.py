"""The two tasks of the experiment, chosen by ``config.task`` (absent: ``"lm"``).

* ``lm``: a byte-level MoE LM, English docs -> Python source, bits/char (:mod:`.lm`);
* ``digits``: a MoE classifier, clean digits -> digits-C, error rate (:mod:`.digits`).

Everything else (methods, serving, accounting, aggregation, tables, plots) is shared; a task
names its data, its model, its metric and the BENCHMARKS.md section its runs publish.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from experiments.energy_moe import digits, lm


class Metric(NamedTuple):
    """The stream's quality metric (lower is better).

    Attributes:
        key: its name in cells and results (``"bpc"``; ``"<key>_late"``, ``"<key>_change"``).
        label: how tables and plots name it.
        scale: factor from the mean per-batch score the inference returns to the metric.
        relative: changes vs ``no_ttt`` are relative (r / b - 1) or absolute (r - b).
        loss_label: what the adaptation's task loss is, for the convergence plot.
    """

    key: str
    label: str
    scale: float
    relative: bool
    loss_label: str


BPC = Metric(
    "bpc", "bits/char", 1 / math.log(2), True, "next-byte loss of the adapted windows (bits)"
)
ERROR = Metric("error", "error", 1.0, False, "prediction entropy of the adapted images (nats)")


class Task(NamedTuple):
    """What differs between the tasks.

    Attributes:
        section: the BENCHMARKS.md section, ``docs/results`` file and figure prefix.
        metric: the stream's quality metric.
        head: the model head (``"lm"`` or ``"class"``, see :func:`.runtime.build_runtime`).
        model_config: ``cfg -> MoEConfig``.
        validate_data: ``cfg -> None``, raising ValueError for bad data values.
        prepare: ``(cfg, runtime, seed, workdir) -> (params, stream, info, reference)``:
            trains (or restores) the seed's model and builds its shifted stream and its
            in-distribution reference batches ``(inputs, targets)`` (N, B, ...).
        validation: ``(cfg, seed, batches) -> stream``: the shifted validation stream the
            tuning serves (:mod:`.tuning`), disjoint from the test stream.
    """

    section: str
    metric: Metric
    head: str
    model_config: Callable[[Any], Any]
    validate_data: Callable[[Any], None]
    prepare: Callable[..., tuple[Any, Any, dict, Any]]
    validation: Callable[..., Any]


TASKS = {
    "lm": Task(
        "energy_moe",
        BPC,
        "lm",
        lm.model_config,
        lm.validate_data,
        lm.prepare,
        lm.validation_stream,
    ),
    "digits": Task(
        "energy_moe_digits",
        ERROR,
        "class",
        digits.model_config,
        digits.validate_data,
        digits.prepare,
        digits.validation_stream,
    ),
}


def task_of(cfg) -> Task:
    """The config's task (``config.task``, ``"lm"`` when absent).

    Raises:
        ValueError: an unknown task, naming the known ones.
    """
    name = cfg.get("task", "lm")
    if name not in TASKS:
        raise ValueError(f"config.task must be one of {list(TASKS)}, got {name!r}")
    return TASKS[name]
