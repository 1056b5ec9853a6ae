"""Drift-triggered dynamic-rank adapters on digits-C, and TENT vs norm statistics (issue 6, A).

Backbone. :func:`metattt.models.digits_net.digits_net` (64 -> 128 -> 10, batch norm with
explicit statistics), trained with cross-entropy on the clean train split.

Drift stream. Test-split digits through :func:`metattt.data.digits_c.make_stream`: clean for
``stream.clean_steps`` steps (longer than the detector's warm-up), then a corruption that
switches on at severity 1, intensifies to 5 and switches off (:func:`~digits_c.ramp`), then
clean again for ``stream.after_steps`` steps. One stream per corruption in
``stream.corruptions`` and per seed.

Unsupervised signal. The *source* model's mean prediction entropy per batch. The source model
is frozen, so this signal measures the input distribution and not the adapter's own
confidence: entropy minimisation lowers the adapted model's entropy while the drift is still
there, and a monitor on that signal would free the adapter too early. Because the source model
never changes, the signal of the whole stream is computed in one batched call and the causal
monitor (:func:`metattt.drift.stream_monitor` of Page-Hinkley and the recovery rule) is
scanned over it with :func:`metattt.drift.run_stream`; step t's flags depend on steps <= t only.

Methods, all on a LoRA adapter of the classifier head (128 -> 10) in a max-rank buffer:

* ``none`` -- no adaptation (the adapter stays at rank 0, so its term is exactly zero);
* ``static:R`` -- rank R allocated at t = 0 and adapted on every batch (the issue's static
  adapter is ``static:8``; ``static:2`` is a static adapter of about the dynamic one's mean
  size);
* ``dynamic`` -- at an alarm :func:`~metattt.adapters.alloc` rank ``adapter.init_rank``; while
  the adapted model's smoothed prediction entropy stays above the clean baseline mean plus
  ``adapter.grow_k`` baseline standard deviations for ``adapter.grow_patience`` steps,
  :func:`~metattt.adapters.realloc` to twice the rank (2 -> 4 -> 8); at recovery,
  :func:`~metattt.adapters.free`.

Every method predicts a batch, then takes one Adam step on the adapter with that batch; the
reported accuracy is that of the predictions made before the step (online evaluation). The
unsupervised loss is one of ``OBJECTIVES``: ``entropy`` (TENT, Wang et al. 2021) or ``im``,
entropy minus the entropy of the batch's mean prediction (information maximisation, SHOT,
Liang et al. 2020), which keeps entropy minimisation from collapsing onto a few classes. One
jitted step serves every method, objective, seed and rank: ranks are masks and the objective's
weight is an argument; the number of traces is recorded (``step_traces``) and checked by the
tests.

TENT comparison. For each corruption and severity the whole test split, corrupted, is fed in
batches to: the source model (running statistics), normalisation-statistics adaptation (each
test batch normalised with its own statistics) and TENT (batch statistics plus one Adam step
of entropy minimisation on the normalisation layer's scale and bias per batch, reset for each
corruption and severity). Error rates over 3 seeds (backbone, split and corruption draws).
"""

from experiments.drift_adapters.main import demo_rows, run, train_backbone, validate
from experiments.drift_adapters.report import summary, write_report
from experiments.drift_adapters.stream import (
    OBJECTIVES,
    StreamRunner,
    num_stream_steps,
    parse_method,
    schedule,
    segments,
    summarize,
    summarize_stream,
)
from experiments.drift_adapters.tent import TENT_METHODS, summarize_tent, tent_comparison

__all__ = [
    "OBJECTIVES",
    "TENT_METHODS",
    "StreamRunner",
    "demo_rows",
    "num_stream_steps",
    "parse_method",
    "run",
    "schedule",
    "segments",
    "summarize",
    "summarize_stream",
    "summarize_tent",
    "summary",
    "tent_comparison",
    "train_backbone",
    "validate",
    "write_report",
]
