"""metattt: test-time training, test-time adaptation and meta-learning as JAX function compositions.

Models are pure functions ``apply(params, batch)`` over parameter pytrees; every adaptation
scheme is built from ``jax.grad``, ``jax.vmap``, ``lax.scan``, ``jax.checkpoint`` and optax.

Modules: :mod:`~metattt.params` (which leaves adapt), :mod:`~metattt.inner` (the inner loop),
:mod:`~metattt.meta` (MAML, FOMAML, E2E-TTT, Meta-SGD and the meta-step),
:mod:`~metattt.online` (delayed-label streams), :mod:`~metattt.tta` (clip-wise TTA),
:mod:`~metattt.objectives`, :mod:`~metattt.augment` (token corruptions for self-supervised
objectives), :mod:`~metattt.adapters` (dynamic-rank LoRA),
:mod:`~metattt.drift` (drift detectors), :mod:`~metattt.compiled` (``make_adapt_fn``: adaptation
compiled once, for notebooks), the training contract :mod:`~metattt.train`
(``Step``, ``supervised``, ``fit``), and the run plumbing :mod:`~metattt.ckpt`,
:mod:`~metattt.runlog`, :mod:`~metattt.stats`, :mod:`~metattt.sharding` (data-parallel and
FSDP steps over a mesh) and :mod:`~metattt.multihost` (what the processes of a multi-process
run agree on).
"""

from typing import TYPE_CHECKING

from metattt import _lazy

# Submodules and the names re-exported here are imported on first use (PEP 562), so that
# ``import metattt.inner``, or a run that needs a few modules, does not pay for orbax, flax,
# scipy and the rest: about 1 s of CPU at every process's start (2026-12-07).
__getattr__, __dir__ = _lazy.exports(
    __name__,
    "adapters augment ckpt compiled data drift energy inner meta models multihost objectives "
    "online params runlog sharding stats train tta",
    {
        "compiled": "make_adapt_fn",
        "inner": "InnerConfig InnerResult adapt adapt_merged adaptation_curve",
        "meta": "Task",
        "models.functional": "functionalize",
        "params": "count explain merge select split",
        "train": "Step TrainState fit supervised",
        "tta": "TTAProtocol run_protocol",
    },
)

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on first use
    from metattt import (
        adapters,
        augment,
        ckpt,
        compiled,
        data,
        drift,
        energy,
        inner,
        meta,
        models,
        multihost,
        objectives,
        online,
        params,
        runlog,
        sharding,
        stats,
        train,
        tta,
    )
    from metattt.compiled import make_adapt_fn
    from metattt.inner import InnerConfig, InnerResult, adapt, adapt_merged, adaptation_curve
    from metattt.meta import Task
    from metattt.models.functional import functionalize
    from metattt.params import count, explain, merge, select, split
    from metattt.train import Step, TrainState, fit, supervised
    from metattt.tta import TTAProtocol, run_protocol


__version__ = "0.1.0"

__all__ = [
    "InnerConfig",
    "InnerResult",
    "Step",
    "TTAProtocol",
    "Task",
    "TrainState",
    "adapt",
    "adapt_merged",
    "adaptation_curve",
    "adapters",
    "augment",
    "ckpt",
    "compiled",
    "count",
    "data",
    "drift",
    "energy",
    "explain",
    "fit",
    "functionalize",
    "inner",
    "make_adapt_fn",
    "merge",
    "meta",
    "models",
    "multihost",
    "objectives",
    "online",
    "params",
    "run_protocol",
    "runlog",
    "select",
    "sharding",
    "split",
    "stats",
    "supervised",
    "train",
    "tta",
]
