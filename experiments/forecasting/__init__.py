"""Meta-learned fast adaptation of a Perceiver population forecaster to held-out sessions.

The issue's experiments 1-5 on the multi-session chaotic-RNN recordings of
:mod:`metattt.data.sessions`, per seed (a seed draws the latent system, the sessions and the
model's initialisation):

* Pretraining: every parameter, Adam, on windows of all training sessions.
* Meta-training from the pretrained parameters, one task per training session: the session's
  unit and session embeddings are reset to fresh draws (as for a new session), the adapted set
  takes K inner Adam steps on support windows (before the session's time cut) and the query
  windows (after it) score the result. FOMAML stops the inner gradients; end-to-end TTT
  differentiates through them (second order, meta-loss = query + mean inner loss), with
  per-step remat, optional bf16 compute, gradient accumulation over task micro-batches
  (:func:`metattt.meta.make_meta_step`'s ``micro_batches``) and global-norm clipping.
* Test on held-out sessions: register the session (fresh embeddings), then adapt on its
  support windows and score the query windows at every step: AdamW fine-tuning from the
  pretrained model (experiment 1) vs the inner rule from the FOMAML (2) and E2E-TTT (3) inits;
  the same for other adapted parameter sets (4); online adaptation with labels P steps late
  vs offline adaptation under loading drift (5); the compiled memory of one second-order
  meta-gradient for several inner step counts with and without remat.

Metrics on the query windows: MSE, R² per neuron (averaged over real neurons) and POCO's score
1 - MSE / MSE_copy against copying the last context frame. "Steps to 95%" is the first step
whose R² gain over the unadapted model reaches 95% of the gain at the end of the curve.

Every per-seed cell (pretrained and meta-trained parameters, test curves, online results) and
the memory table are cached in the workdir, so a rerun skips finished cells; the training cells
checkpoint through :func:`metattt.train.fit`, so a killed run resumes inside its cell.

Modules: :mod:`~experiments.forecasting.configure` (config -> model and data configs, adapted
sets, recordings, checks), :mod:`~.programs` (the compiled programs, shared by the seeds),
:mod:`~.cells` (one seed's cells), :mod:`~.aggregate` (seed means), :mod:`~.main` (the run) and
:mod:`~.report` (tables, plots, reading, BENCHMARKS.md section). Recordings, task sampling and
the metrics are library code: :mod:`metattt.data.session_tasks` and
:mod:`metattt.data.session_metrics`.
"""

from experiments.forecasting.aggregate import seed_record, summarize_method, summarize_seeds
from experiments.forecasting.cells import (
    adaptation_curves,
    frozen_predictions,
    memory_rows,
    meta_train,
    online_cell,
    pretrain,
    register,
    stream_predictions,
)
from experiments.forecasting.configure import (
    ADAPT_SETS,
    FINETUNE,
    META_LOSSES,
    adapt_selector,
    perceiver_config,
    recordings,
    session_config,
    validate,
    window_counts,
)
from experiments.forecasting.main import demo_rows, method_label, method_names, run, run_seed
from experiments.forecasting.programs import Programs
from experiments.forecasting.report import (
    kept_results,
    plot_curves,
    plot_online,
    reading,
    summary,
    write_report,
)

__all__ = [
    "ADAPT_SETS",
    "FINETUNE",
    "META_LOSSES",
    "Programs",
    "adapt_selector",
    "adaptation_curves",
    "demo_rows",
    "frozen_predictions",
    "kept_results",
    "memory_rows",
    "meta_train",
    "method_label",
    "method_names",
    "online_cell",
    "perceiver_config",
    "plot_curves",
    "plot_online",
    "pretrain",
    "reading",
    "recordings",
    "register",
    "run",
    "run_seed",
    "seed_record",
    "session_config",
    "stream_predictions",
    "summarize_method",
    "summarize_seeds",
    "summary",
    "validate",
    "window_counts",
    "write_report",
]
