"""The dispatch backend of a run, chosen by the measured kernel cost model (issue 15 item 4).

``model.backend = "cost_model"`` asks the run to pick the MoE dispatch backend at its start:
every candidate of this device (:func:`metattt.energy.kernel_costs.candidate_backends`) is timed
at the shapes the run's model dispatches -- T = ``data.batch`` x ``data.length`` tokens per
serving batch, the training batch's T if it differs, and two smaller neighbours of the serving
shape for the fit -- with E, D, F and K from the model config (dropless), the timings are stored
in the workdir (:data:`TIMINGS`, keyed by device kind and JAX version: a rerun or a resumed run
on the same device reads them back and measures nothing; a damaged file is measured again), a
cost model is fitted, and the backend of least time at the serving shape is chosen
(:func:`metattt.energy.kernel_costs.profile_and_choose`). The run then builds every model
function with that backend (:func:`resolve` returns the config with it), and ``results.json``
records the choice (:func:`record`), which the report prints in one line (:func:`line`).

Any other ``model.backend`` (``"auto"``, ``"ragged"``, ...) is used as it is. In a
multi-process run process 0 measures and stores; the others read its file (a shared workdir)
and so choose alike.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

from experiments.energy_moe.runtime import COST_MODEL
from experiments.energy_moe.tasks import task_of
from kernels_pallas.moe_dispatch import BACKENDS
from metattt import multihost
from metattt.energy import kernel_costs as kc

logger = logging.getLogger(__name__)

#: The timings file in the workdir.
TIMINGS = "kernel_costs.json"
#: What ``model.backend`` may name.
CHOICES = (*BACKENDS, COST_MODEL)
#: What the choice minimises: the forward dispatch's wall-clock seconds (the simulated monitor
#: prices the experts' FLOPs and bytes, the same for every backend).
OBJECTIVE = "seconds"
#: Interleaved timed calls per backend and shape (medians): the einsum's dropless one-hot grows
#: as T², about 1 s a call at the digits run's T = 2048 on the 2-core CPU.
REPEATS = 3


def validate(cfg) -> None:
    """Raise ValueError for a ``model.backend`` that names no backend (one line)."""
    if cfg.model.backend not in CHOICES:
        raise ValueError(f"model.backend must be one of {CHOICES}, got {cfg.model.backend!r}")


def dispatch_shapes(cfg) -> list[kc.DispatchShape]:
    """The serving batch's dispatch shape first, then the training batch's (if it differs) and
    the serving shape's :func:`~metattt.energy.kernel_costs.neighbour_shapes`."""
    mcfg = task_of(cfg).model_config(cfg)
    length = cfg.data.length

    def shape(batch: int) -> kc.DispatchShape:
        return kc.DispatchShape(batch * length, mcfg.d_model, mcfg.d_ff, mcfg.num_experts,
                                mcfg.top_k, mcfg.capacity_factor)  # fmt: skip

    serving, training = shape(cfg.data.batch), shape(cfg.train.batch)
    shapes = {s.key(): s for s in (serving, training, *kc.neighbour_shapes(serving))}
    return list(shapes.values())


def resolve(cfg, workdir: str) -> tuple[Any, kc.BackendChoice | None]:
    """``(config to run, choice)``: with ``model.backend = "cost_model"`` a copy of ``cfg``
    whose ``model.backend`` is the backend chosen from the timings in ``workdir`` (measured
    first where missing) and the :class:`~metattt.energy.kernel_costs.BackendChoice`; otherwise
    ``(cfg, None)``."""
    if cfg.model.backend != COST_MODEL:
        return cfg, None
    path, shapes = os.path.join(workdir, TIMINGS), dispatch_shapes(cfg)
    choose = lambda: kc.profile_and_choose(path, shapes, objective=OBJECTIVE, repeats=REPEATS)
    choice = choose() if multihost.is_primary() else None
    multihost.barrier("energy_moe.backend")  # the others read what process 0 stored
    choice = choose() if choice is None else choice
    times = ", ".join(f"{b} {1e3 * v:.3g} ms" for b, v in choice.costs.items())
    logger.info("Dispatch backend %s, chosen by the cost model at %s (%s; %d timings measured "
                "now, the others read from %s).", choice.backend, choice.shape.key(), times,
                choice.measured, path)  # fmt: skip
    out = copy.deepcopy(cfg)
    out.model.backend = choice.backend
    return out, choice


def record(choice: kc.BackendChoice) -> dict[str, Any]:
    """The choice as ``results.json`` keeps it."""
    return {
        "requested": COST_MODEL,
        "backend": choice.backend,
        "objective": choice.objective,
        "shape": choice.shape.key(),
        "measured": choice.costs,
        "predicted": choice.predicted,
        "measured_now": choice.measured,
        "device": choice.key,
        "file": TIMINGS,
    }


def line(results: dict[str, Any]) -> list[str]:
    """The report's line on the choice (none for a run that did not ask for it)."""
    c = results.get("backend_choice")
    if not c:
        return []
    unit = {"seconds": ("ms", 1e3), "joules": ("mJ", 1e3)}[c["objective"]]
    costs = ", ".join(f"{b} {unit[1] * v:.3g} {unit[0]}" for b, v in c["measured"].items())
    return [
        f"- Dispatch backend: **{c['backend']}**, chosen at run start by the measured kernel "
        f'cost model (`model.backend = "cost_model"`; objective: {c["objective"]} of the '
        f"forward dispatch at the serving shape {c['shape']}: {costs}; timings in the "
        f"workdir's {c['file']}, device {c['device']})."
    ]
