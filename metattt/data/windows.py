"""Temporal windows and a leak-free support/query split of a sequence.

A window is ``context`` input steps followed by ``horizon`` target steps. ``stride`` below the
window length makes windows overlap. The split cuts time at ``support_fraction`` of the
sequence: support windows lie entirely before the cut and query windows entirely after it, so
no time step (input or target) is seen by both sides.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from metattt.meta import Task


class Windows(NamedTuple):
    """Windows cut from a (T, ...) series: inputs (W, C, ...), targets (W, H, ...), starts (W,)."""

    inputs: np.ndarray
    targets: np.ndarray
    starts: np.ndarray


def sliding_windows(
    series: np.ndarray, *, context: int, horizon: int, stride: int = 1, offset: int = 0
) -> Windows:
    """All windows of ``series[offset:]`` that fit, starting every ``stride`` steps."""
    series = np.asarray(series)
    if context < 1 or horizon < 1 or stride < 1:
        raise ValueError(
            f"context, horizon and stride must be >= 1, got {context}, {horizon}, {stride}"
        )
    span = context + horizon
    starts = np.arange(offset, series.shape[0] - span + 1, stride)
    if starts.size == 0:
        raise ValueError(
            f"a series of length {series.shape[0] - offset} holds no window of length {span}"
        )
    idx = starts[:, None] + np.arange(span)[None, :]
    windows = series[idx]
    return Windows(windows[:, :context], windows[:, context:], starts)


def support_query_split(
    series: np.ndarray,
    *,
    context: int,
    horizon: int,
    support_fraction: float = 0.5,
    stride: int | None = None,
) -> Task:
    """Split a (T, ...) series into support and query windows with no shared time step.

    Args:
        series: (T, ...) array.
        context, horizon: window lengths.
        support_fraction: where time is cut, as a fraction of T.
        stride: step between window starts (default: context + horizon, no overlap).

    Returns:
        ``Task(support=(inputs, targets), query=(inputs, targets))``.
    """
    series = np.asarray(series)
    if not 0.0 < support_fraction < 1.0:
        raise ValueError(f"support_fraction must be in (0, 1), got {support_fraction}")
    stride = stride or context + horizon
    cut = int(series.shape[0] * support_fraction)
    support = sliding_windows(series[:cut], context=context, horizon=horizon, stride=stride)
    query = sliding_windows(series, context=context, horizon=horizon, stride=stride, offset=cut)
    return Task((support.inputs, support.targets), (query.inputs, query.targets))
