"""Energy-aware TTT of a mixture-of-experts model on a real domain shift (issue 5).

Two tasks share everything but their data (``config.task``, :mod:`.tasks`):

* ``lm`` (absent ``task``): a byte-level MoE LM trained on the English help topics of
  ``pydoc_data`` (next-byte prediction plus the Switch load-balancing and router z-losses)
  serves windows of the standard library's Python source, scored in bits per character;
* ``digits``: a MoE classifier reading each 8x8 digit as 64 pixel tokens, trained on clean
  digits, serves digits-C (corruptions at several severities), scored by error rate; TTT is
  label-free TENT. Its runs publish the ``energy_moe_digits`` section.

Per seed, a top-k MoE transformer whose experts have different widths (so different energies
per token) is trained and then serves its task's shifted stream. Every method serves the same
stream *prequentially*: each batch is scored with the current parameters before the method may
adapt on it, so no method sees a label before predicting it. Methods (:mod:`.registry`):

* ``no_ttt``: the trained model, top-k routing, all experts.
* ``ttt``: TTT of the configured parameters with λ_energy = 0.
* ``energy_ttt/<λ>``: the same plus λ_energy · E, E the expected routing energy under the
  per-expert cost profile (:func:`metattt.energy.energy_tent`'s loss).
* ``budget/<f>``: the power-budget policy (:func:`metattt.energy.power_budget`): λ follows the
  simulated monitor's power readings; a budget still missed at λ_max escalates to pruning and
  then a smaller top-k (graceful degradation). The budget is f of the unadapted model's
  dynamic power above the fixed (idle + dense layers) power.
* ``prune/<n>``: static pruning of the n costliest experts; ``top_k/<k>``: a smaller top-k.
  Both keep the trained parameters.
* expert-level adaptation (issue 15, :mod:`.expert`), named in ``expert.methods``:
  ``lora_ttt/<r>`` (rank-r LoRA on every expert matrix), ``lora_hw/<R>`` (ranks up to R chosen
  after every batch from the monitor's power and temperature and the free memory), ``norm_ttt``
  and ``bias_ttt``, ``fast_ttt/<r>`` (fast-weight experts with rank-r LoRA's trainable
  parameters; ``int8_fast_ttt/<r>`` on int8 experts), each with the router at λ_energy =
  ``expert.lam``; any ``ttt``,
  ``energy_ttt`` or expert-level method may end in ``:<objective>`` (``entropy``,
  ``next_token``, ``masked``, ``consistency``).
* ``int8``, ``int8_ttt``, ``int8_energy_ttt/<λ>``: the trained experts quantized to weight-only
  int8 (per-output-channel symmetric scales, :mod:`metattt.models.quantize`), served static,
  with TTT and with energy-aware TTT of the same parameters on top (the experts stay int8).
  Their expert weight reads are priced at 1 byte per weight plus the scales.
* when to adapt (issue 15 item 7, :mod:`.schedules`), named in ``schedule.methods``:
  ``<method>@<s>`` for every method that adapts but the budgets (``ttt``, ``energy_ttt/<λ>``,
  their int8 versions, the expert-level methods) adapts on the batches whose prediction entropy
  (``@entropy``) or router margin (``@margin``), from the served model's forward pass, is past
  an in-distribution quantile, or at an adaptive period (``@adaptive``), instead of every
  ``ttt.every``-th batch.
* per window (issue 15 item 7, :mod:`.windows`), named in ``window.methods``:
  ``<method>~w<W>`` (the router TTT kinds) adapts after every W-token chunk (LM) or every
  window of W images (classifier) of every batch, each chunk scored with the parameters
  adapted on the chunks before it.
* ``memory`` (issue 15 item 6, :mod:`.pressure`): the trained model served while simulated
  tenants take memory, stepping down through batch chunks, capacity factors (classifier only)
  and top-k.
* the fast-weight settings (``expert.fast_lr``, ``fast_chunk``, ``fast_steps``) are chosen on
  a validation stream the test stream never reads (``tune``, :mod:`.tuning`): a grid served
  per seed, one point chosen on the seeds' means for every fast-weight method.
* Every adapting method but the budgets and windows also records routing explanations (issue
  15 item 8, :mod:`.explanations`): avoided assignments and their energy, activation shares
  before and after, router stability.

Energy (:mod:`.serving`, :mod:`metattt.energy.accounting`). The monitor is the simulated one
unless the config asks for NVML (the results record which one ran). Each batch is one measured
window in which the device does the batch's forward pass -- FLOPs and bytes of the dense layers
plus :func:`metattt.models.moe.expert_work` of the experts actually used -- and, when the method
adapts, ``1 + BACKWARD_FACTOR`` times the forward work of each adaptation step (priced with that
step's own routing), then idles until the next batch arrives at the serving rate r tokens/s.
Reported per token: the dynamic energy (above idle, what routing changes), the total energy,
the simulated compute delay, their product (EDP), and the wall-clock TTT overhead (adaptation
time / inference time).

Dispatch backend (issue 15 item 4, :mod:`.backend`): ``model.backend = "cost_model"`` (the
full configs) times every candidate MoE dispatch backend at the run's shapes, stores the timings
in the workdir (reused on a rerun) and builds every model function with the backend the fitted
cost model picks; ``results.json`` records the choice and the report prints it.

Modules: :mod:`.main` (checks and the run), :mod:`.backend` (the dispatch backend),
:mod:`.runtime` (model, compiled functions, training), :mod:`.expert` (the expert-level
methods and objectives), :mod:`.lm` / :mod:`.digits` (the tasks' data), :mod:`.serving`,
:mod:`.schedules`, :mod:`.pressure`, :mod:`.explanations`, :mod:`.tuning` (the fast-weight
settings), :mod:`.aggregate` (results from cells), :mod:`.tables`, :mod:`.plots` and
:mod:`.readings` and :mod:`.report` (rendered from ``results.json`` alone).
"""

from experiments.energy_moe.aggregate import SCALARS, aggregate, figure_data, matched, scalars
from experiments.energy_moe.main import demo_rows, run, validate
from experiments.energy_moe.readings import reading
from experiments.energy_moe.registry import Method, methods, parse_method
from experiments.energy_moe.report import write_report
from experiments.energy_moe.runtime import Runtime, build_runtime
from experiments.energy_moe.serving import BACKWARD_FACTOR, serve, static_mask
from experiments.energy_moe.tables import summary
from experiments.energy_moe.tasks import BPC, ERROR, TASKS, Metric, Task, task_of

__all__ = [
    "BACKWARD_FACTOR",
    "BPC",
    "ERROR",
    "SCALARS",
    "TASKS",
    "Method",
    "Metric",
    "Runtime",
    "Task",
    "aggregate",
    "build_runtime",
    "demo_rows",
    "figure_data",
    "matched",
    "methods",
    "parse_method",
    "reading",
    "run",
    "scalars",
    "serve",
    "static_mask",
    "summary",
    "task_of",
    "validate",
    "write_report",
]
