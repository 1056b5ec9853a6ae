"""When to adapt (issue 15 item 7) as methods: ``<method>@<s>`` for every method that adapts at
test time but the budgets (``ttt``, ``energy_ttt/<λ>``, ``int8_ttt``, ``int8_energy_ttt/<λ>``,
the expert-level kinds, with or without an objective; :data:`.registry.SCHEDULE_KINDS`).

The method without ``@`` adapts on every ``ttt.every``-th batch. With a schedule
(:mod:`metattt.energy.schedule`) it adapts on the batches that look hard instead, judged by a
label-free signal that the served model's forward pass returns anyway
(:func:`.runtime.compile_signals` of the trained, int8, LoRA or fast-weight model: deciding
costs no extra work):

* ``@entropy``: on every batch whose mean prediction entropy is above the threshold;
* ``@margin``: on every batch whose mean router top-2 margin is below it;
* ``@adaptive``: at a period that halves after a batch over the entropy threshold and doubles
  after one under it, from ``ttt.every`` within [1, ``schedule.max_every``].

The threshold is the ``schedule.quantile`` quantile of the served model's signal, at its
parameters at the start of the stream, over in-distribution batches (the held-out docs for the
LM, the clean test digits), per seed, so that about
1 - quantile of in-distribution batches would trigger; the stream being scored never sets it.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from experiments.energy_moe.registry import EXPERT, Method, parse_method
from metattt.energy.schedule import Schedule, adaptive_period, calibrate_threshold, on_difficulty

#: schedule -> (index of its signal in the signals inference's outputs, high means hard)
SIGNAL = {"entropy": (2, True), "margin": (3, False), "adaptive": (2, True)}


def calibrate(cfg, method: Method, signals: Any, params: Any, reference: Any, mask: Any) -> float:
    """The method's threshold: ``schedule.quantile`` of its signal over the ``reference``
    in-distribution batches ``(inputs (N, B, L), targets (N, B, ...))``."""
    index, high = SIGNAL[method.schedule]
    values = [float(signals(params, x, y, mask)[index]) for x, y in zip(*reference, strict=True)]
    return calibrate_threshold(values, cfg.schedule.quantile, higher_is_harder=high)


def make_schedule(cfg, method: Method, threshold: float) -> Schedule:
    """The :class:`~metattt.energy.schedule.Schedule` of ``method.schedule`` at ``threshold``."""
    _, high = SIGNAL[method.schedule]
    if method.schedule == "adaptive":
        return adaptive_period(
            threshold, max_every=int(cfg.schedule.max_every), start_every=int(cfg.ttt.every)
        )
    return on_difficulty(threshold, higher_is_harder=high)


def scheduled_infer(signals: Any, method: Method):
    """``infer(params, x, y, k, mask) -> (score, counts, signal)`` of
    :func:`metattt.energy.serving.serve_stream` from the signals inference (trained top-k)."""
    index, _ = SIGNAL[method.schedule]

    def infer(p, x, y, k, mask):
        out = signals(p, x, y, jnp.asarray(mask))
        return out[0], out[1], out[index]

    return infer


def validate(cfg) -> None:
    """Raise ValueError for a ``schedule`` section that would fail later (absent: nothing)."""
    if "schedule" not in cfg:
        return
    s = cfg.schedule
    if not 0 < s.quantile < 1:
        raise ValueError(f"schedule.quantile must be in (0, 1), got {s.quantile}")
    if not int(s.max_every) >= cfg.ttt.every:
        raise ValueError(f"schedule.max_every must be >= ttt.every={cfg.ttt.every}, got "
                         f"{s.max_every}")  # fmt: skip
    for name in s.methods:
        if "@" not in name:
            raise ValueError(f"schedule.methods entries end in @<schedule>, got {name!r}")
        if parse_method(name).kind in EXPERT and "expert" not in cfg:
            raise ValueError(f"schedule.methods entry {name!r} needs an expert section")


def signal_summary(signals: Any, threshold: float, method: Method) -> dict[str, Any]:
    """What a cell records of its schedule: the threshold, the share of stream batches past it
    and the signal trace."""
    s = np.asarray(signals, np.float64)
    _, high = SIGNAL[method.schedule]
    hard = s > threshold if high else s < threshold
    return {"threshold": threshold, "hard_share": float(np.mean(hard)), "signal_trace": s.tolist()}
