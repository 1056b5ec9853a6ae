"""The fast-weight settings chosen on a validation stream, never on the test (issue 15).

``expert.fast_lr``, ``fast_chunk`` and ``fast_steps`` set how the fast-weight experts
(:mod:`metattt.models.fast_weights`) learn inside each forward pass. With a ``tune`` section
(``tune.enabled``), the run first serves ``tune.method`` at every point of the grid
``tune.fast_lrs × tune.fast_chunks × tune.fast_step_counts``, and the trained model
(``no_ttt``), on ``tune.stream_batches`` batches per seed of the task's validation stream
(``Task.validation``: LM code windows sharing no byte with a test window, digits-C images of
the train split), with the serving code of the test cells; each (seed, point) is a cached cell.
One point is then chosen for every seed from the seeds' means by :func:`select`: the lowest
dynamic energy per token among the points whose metric change vs the trained model is below
``tune.max_change`` (the plan's target is energy saved at < 5% accuracy loss, so the accuracy
bound is the constraint and energy the objective), else (no point within it) the best metric
change. Every fast-weight method serves the test stream at that point (:func:`with_point`);
their test cells are named by their settings (:func:`cell_name`), so a cached cell is never
one of other settings.
"""

from __future__ import annotations

import copy
import itertools
import os
from typing import Any, NamedTuple

from experiments import harness
from experiments.energy_moe import expert, serving
from experiments.energy_moe.aggregate import aggregate
from experiments.energy_moe.registry import Method, methods
from experiments.energy_moe.runtime import Runtime
from experiments.energy_moe.tasks import Task
from metattt import multihost


class Point(NamedTuple):
    """One setting of the fast-weight experts (``expert.fast_*``)."""

    fast_lr: float
    fast_chunk: int
    fast_steps: int

    @property
    def tag(self) -> str:
        """How cell names write it, e.g. ``lr0.5_c16_s1``."""
        return f"lr{self.fast_lr:g}_c{self.fast_chunk}_s{self.fast_steps}"


def enabled(cfg) -> bool:
    """Whether the config tunes the fast-weight settings (else they are ``expert.fast_*``)."""
    return "tune" in cfg and bool(cfg.tune.enabled)


def grid(cfg) -> list[Point]:
    """Every point of ``tune.fast_lrs × tune.fast_chunks × tune.fast_step_counts``, in order."""
    t = cfg.tune
    points = itertools.product(t.fast_lrs, t.fast_chunks, t.fast_step_counts)
    return [Point(float(lr), int(c), int(s)) for lr, c, s in points]


def current(cfg) -> Point:
    """The config's own setting (``expert.fast_*``)."""
    x = cfg.expert
    return Point(float(x.fast_lr), int(x.fast_chunk), int(x.fast_steps))


def with_point(cfg, point: Point):
    """A copy of ``cfg`` whose ``expert.fast_*`` are ``point``'s."""
    out = copy.deepcopy(cfg)
    out.expert.fast_lr, out.expert.fast_chunk, out.expert.fast_steps = point
    return out


def cell_name(cfg, name: str, method: Method) -> str:
    """A test cell's name: a fast-weight method's carries its setting (``~<tag>``)."""
    return f"{name}~{current(cfg).tag}" if method.kind in expert.FAST else name


def validate(cfg, task: Task) -> None:
    """Raise ValueError for a ``tune`` section that would fail later (none, or off: nothing)."""
    if not enabled(cfg):
        return
    t = cfg.tune
    fast = [n for n, m in methods(cfg).items() if m.kind in expert.FAST]
    if t.method not in fast:
        raise ValueError(f"tune.method must be one of the config's fast-weight methods {fast}, "
                         f"got {t.method!r}")  # fmt: skip
    lrs, chunks, steps = tuple(t.fast_lrs), tuple(t.fast_chunks), tuple(t.fast_step_counts)
    if not (lrs and chunks and steps) or not (
        all(0 < lr <= 1 for lr in lrs) and min(chunks) >= 1 and min(steps) >= 1
    ):
        raise ValueError(f"need non-empty tune.fast_lrs in (0, 1], tune.fast_chunks >= 1 and "
                         f"tune.fast_step_counts >= 1, got {lrs}, {chunks}, {steps}")  # fmt: skip
    if not t.max_change > 0:
        raise ValueError(f"tune.max_change must be > 0, got {t.max_change}")
    probe = copy.deepcopy(cfg)
    probe.data.stream_batches = t.stream_batches
    try:
        task.validate_data(probe)
    except ValueError as e:
        raise ValueError(f"tune.stream_batches={t.stream_batches}: {e}") from None


def select(changes: list[float], energies: list[float], max_change: float) -> tuple[int, bool]:
    """The chosen point: ``(index, fallback)``.

    The lowest ``energies`` among the points with ``changes < max_change`` (ties: the first);
    when there is none, ``fallback`` is True and the point is the one with the lowest change.
    """
    within = [i for i, c in enumerate(changes) if c < max_change]
    if within:
        return min(within, key=lambda i: energies[i]), False
    return min(range(len(changes)), key=lambda i: changes[i]), True


def _path(workdir: str, seed: int, name: str) -> str:
    return os.path.join(workdir, "cells", f"seed_{seed}", "tune", name.replace("/", "_") + ".json")


def tune(cfg, rt: Runtime, task: Task, workdir: str, *, rate: float) -> dict[str, Any]:
    """Serve ``no_ttt`` and ``tune.method`` at every grid point on each seed's validation stream
    (cached cells under ``cells/seed_<s>/tune/``), then choose one point (:func:`select`).

    Returns the record ``results.json`` keeps: per point its setting and the seeds' summaries of
    the metric, its change vs no TTT, the dynamic energy per token and the energy reduction;
    ``chosen`` (an index into ``points``), ``fallback``, ``settings`` (the chosen point) and
    ``a_priori`` (the config's ``expert.fast_*``).
    """
    t, metric = cfg.tune, task.metric
    points = grid(cfg)
    table = {"no_ttt": Method("no_ttt"), **{p.tag: methods(cfg)[t.method] for p in points}}
    variants = {
        p.tag: expert.build_variants(with_point(cfg, p), rt, task.head, (t.method,))[t.method]
        for p in points
    }  # compiled once, shared by every seed
    cells: dict[str, list[dict[str, Any]]] = {name: [] for name in table}
    for seed in cfg.seeds:
        names = {n: "no_ttt" if n == "no_ttt" else f"{t.method}~{n}" for n in table}
        pending = any(not os.path.isfile(_path(workdir, seed, names[n])) for n in table)
        if multihost.any_process(pending):  # only then load the model and the stream (every
            # process, as the training's collectives need them all)
            params, _, _, reference = task.prepare(cfg, rt, seed, workdir)
            stream = task.validation(cfg, seed, t.stream_batches)
        for name, method in table.items():
            cells[name].append(
                harness.json_cell(
                    _path(workdir, seed, names[name]),
                    lambda m=method, n=name: serving.serve(
                        cfg, rt, params, stream, m, rate=rate, seed=seed, metric=metric,
                        variant=variants.get(n), reference=reference,
                    ),
                )
            )  # fmt: skip
    rows = aggregate(cells, table, metric)["methods"]
    keys = (metric.key, f"{metric.key}_change", "uj_per_token", "energy_reduction")
    out = [{**p._asdict(), "tag": p.tag, **{k: rows[p.tag][k] for k in keys}} for p in points]
    chosen, fallback = select(
        [r[f"{metric.key}_change"]["mean"] for r in out],
        [r["uj_per_token"]["mean"] for r in out],
        t.max_change,
    )
    return {
        "method": t.method,
        "stream_batches": t.stream_batches,
        "max_change": t.max_change,
        "no_ttt": {k: rows["no_ttt"][k] for k in (metric.key, "uj_per_token")},
        "points": out,
        "chosen": chosen,
        "fallback": fallback,
        "settings": points[chosen]._asdict(),
        "a_priori": current(cfg)._asdict(),
    }
