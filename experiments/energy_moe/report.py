"""The BENCHMARKS.md section of a run, rendered from its results alone: provenance, the tables,
a reading computed from the numbers, and the figures (:mod:`.plots`)."""

from __future__ import annotations

from typing import Any

import jax

from experiments import report
from experiments.energy_moe import backend, digits
from experiments.energy_moe.plots import PLOTS, plot_all, shown_plots
from experiments.energy_moe.readings import reading
from experiments.energy_moe.serving import BACKWARD_FACTOR
from experiments.energy_moe.tables import (
    summary,
    window_unit,
)
from experiments.energy_moe.tasks import task_of
from metattt.models import moe


def plan_header(results: dict[str, Any], cfg) -> list[str]:
    """Provenance of the schedules and the memory-pressure method (issue 15 items 6-8)."""
    rows, lines = results["methods"], []
    if any("hard_share" in r for r in rows.values()):
        s = cfg.schedule
        lines.append(
            f"- Schedules (issue 15 item 7): threshold = the {s.quantile} quantile of the "
            "signal (prediction entropy, or router top-2 margin where low is hard) over "
            "in-distribution batches (held-out docs / clean test digits) per seed; @adaptive "
            f"starts at period {cfg.ttt.every} and moves within [1, {s.max_every}]; the signal "
            "comes from the serving forward pass (no extra work)."
        )
    if window_unit(rows) == "images" and any("window" in r for r in rows.values()):
        lines.append(
            "- Image windows (issue 15 item 7, ~w<W>): the classifier predicts once per image, "
            "so a window is W consecutive images of the stream batch; each window is scored "
            "with the parameters from before its update, then adapted on (its first "
            f"min({cfg.ttt.windows}, W) images, {cfg.ttt.steps} step(s)): the causality of the "
            "LM's token windows. Each window is charged as a forward pass of "
            f"(W, {cfg.data.length}) tokens, "
            "each step as 1 + backward passes over its adapted images; wall overhead = the "
            "windowed pass with adaptation minus the same pass without."
        )
    elif any("window" in r for r in rows.values()):
        lines.append(
            "- Token windows (issue 15 item 7, ~w<W>): every batch is read in causal chunks of "
            f"W tokens; after each, {cfg.ttt.steps} adaptation step(s) on the chunk of the first "
            f"{cfg.ttt.windows} sequences, and the next chunk is scored with the result. Each "
            "chunk is charged as a forward pass of (batch, W) tokens (attention over earlier "
            "chunks not charged), each step as 1 + backward passes over (rows, W) tokens; wall "
            "overhead = the windowed pass with adaptation minus the same pass without."
        )
    if any("memory_over" in r for r in rows.values()):
        m = cfg.memory
        lines.append(
            f"- Memory pressure (issue 15 item 6): a simulated device of {m.limit_x:g}x the "
            "full-service level's peak bytes; other tenants use "
            f"{', '.join(f'{p:.0%}' for p in m.pressure)} of it in equal segments of the stream; "
            f"the policy keeps a {m.margin:.0%} margin and steps up after {m.patience} calm "
            "readings; a chunked batch is priced per chunk (weights read once per chunk)"
            + _capacity_text(rows)
            + "."
        )
    explained = [n for n, r in rows.items() if "explain" in r]
    if explained:
        router = all(results["kinds"][n] in ("ttt", "energy_ttt") for n in explained)
        which = (
            "each router TTT method"
            if router
            else "each adapting method but the budgets, through its served model (int8, LoRA or "
            "fast-weight experts where it has them)"
        )
        lines.append(
            "- Routing explanations (issue 15 item 8): router probabilities of the stream's "
            f"last batch under the trained, mid-stream and final parameters of {which} (three "
            "diagnostic forward passes, not charged)."
        )
    return lines


def expert_header(results: dict[str, Any], cfg) -> list[str]:
    """Provenance of the expert-level methods (issue 15), when any ran."""
    if not results.get("expert"):
        return []
    x = cfg.expert
    objectives = (
        f"masked: {x.mask_rate:.0%} of the bytes hidden behind random bytes, each predicted "
        f"from the corrupted prefix; consistency: symmetric KL between two augmentations "
        f"(byte dropout {x.drop_rate}, adjacent swaps {x.swap_rate})"
        if "digits" not in task_of(cfg).section
        else f"consistency: symmetric KL between two augmentations (pixel shift ±{x.max_shift},"
        f" intensity noise ±{x.noise}); masked reconstruction is not run on digits (the token "
        "head is never trained)"
    )
    return [
        f"- Expert-level methods (issue 15): {', '.join(results['expert'])}; λ_energy "
        f"{x.lam}, {'with the router' if x.with_router else 'the group alone'}; LoRA on every "
        f"expert matrix in an R_max = {x.max_rank} buffer (rank = mask, one compilation), "
        "each expert's merge W + A·B charged per forward pass at the active rank; "
        f"{objectives}; a two-pass objective is charged both passes."
        + _fast_header(results, cfg)
        + (
            f" lora_hw: after every batch the ranks (and which experts keep an adapter: the "
            f"busiest) follow the headroom below a power budget of {x.hw_fraction} of no_ttt's "
            f"dynamic power (band {x.hw_margin} of it), {x.hw_temperature_c} °C (band "
            f"{x.hw_temperature_margin_c} °C) and {x.hw_memory_reserve_gb} GiB of free memory "
            + _memory_source(results, cfg)
            + " (metattt.energy.adapter_ranks), applied by lora_realloc before the next "
            "adaptation without recompiling."
            if any(i.get("rank_policy") for i in results["expert"].values())
            else ""
        ),
    ]


def _fast_header(results: dict[str, Any], cfg) -> str:
    """Provenance of the fast-weight methods (issue 15 item 3), when any ran."""
    fast = {n: i for n, i in results["expert"].items() if i.get("fast_rank")}
    if not fast:
        return ""
    x = cfg.expert
    if "tuning" in results:  # the settings chosen on the validation stream, not the config's
        x = results["tuning"]["settings"]
    ranks = ", ".join(f"{n}: R = {i['fast_rank']}" for n, i in fast.items())
    return (
        " fast_ttt/<ρ>: every expert's output gains (q W) θ_O, W an (R, R) fast weight per "
        "sequence and expert trained inside each forward pass on ||k W − v||² over the tokens "
        f"routed to it, in chunks of {x['fast_chunk']} positions ({x['fast_steps']} step(s) of "
        f"rate {x['fast_lr']} after reading each chunk: causal"
        + ("; chosen on a validation stream, see below" if "tuning" in results else "")
        + "), θ_O zero at the start; R chosen so that "
        f"θ_K, θ_Q, θ_V, θ_O (4·D·R) equal lora_ttt/<ρ>'s 3·ρ·(D + F) ({ranks}); the method "
        "adapts them with the router, and every forward pass is charged their projections, "
        "reads and inner steps (metattt.models.fast_weights.fast_work)."
        + (
            " int8_fast_ttt/<ρ>: the same over weight-only int8 experts (codes frozen, read and "
            "priced as int8)."
            if any(i["kind"] == "int8_fast_ttt" for i in fast.values())
            else ""
        )
    )


def _capacity_text(rows: dict[str, Any]) -> str:
    """The capacity-factor rungs of the memory ladders (nothing when dropless only)."""
    levels = [lv for r in rows.values() for lv in r.get("memory_levels", ())]
    cfs = sorted({cf for cf, _, _ in levels if cf is not None}, reverse=True)
    if not cfs:
        return ""
    return (f"; capacity factors {', '.join(f'{c:g}' for c in cfs)} after dropless: each expert "
            "processes at most ceil(c·T·K/E) of a served slice's T·K assignments, the lowest "
            "gates dropped (their experts' work is not charged); legitimate for the classifier, "
            "which predicts once per image from all its tokens")  # fmt: skip


def _memory_source(results: dict[str, Any], cfg) -> str:
    """Where lora_hw's memory readings came from (:func:`.serving.memory_reader`)."""
    if results["monitor"] != "simulated":
        return "(live device readings)"
    m = cfg.monitor
    return (f"(simulated device of {m.memory_gb:g} GiB, other tenants using "
            f"{', '.join(f'{g:g}' for g in m.memory_others_gb)} GiB per reading)")  # fmt: skip


def _monitor(results: dict[str, Any]) -> str:
    fallback = results["monitor_fallback"]
    return results["monitor"] + (f" (fallback: {fallback})" if fallback else "")


def _lm_header(results: dict[str, Any], cfg, mcfg: moe.MoEConfig, n_params: int) -> list[str]:
    """Provenance of the language-model task: energy model, model, training, stream."""
    info = results["seed_info"]
    return [
        "## Energy-aware TTT for a mixture-of-experts LM (issue 5)",
        "",
        f"- Date: {report.today()}; machine: {report.machine()}.",
        "- Command: `python -m experiments.run --config configs/energy_moe.py "
        "--workdir runs/energy_moe`.",
        f"- **Energy is simulated** (monitor: {_monitor(results)}): a modelled accelerator "
        f"(idle {results['idle_power_w']:.0f} W, 2 pJ/FLOP, 50 pJ/byte, roofline time) fed "
        "the FLOPs and bytes of the dense layers and of the experts each batch actually "
        f"used; adaptation steps are charged {1 + BACKWARD_FACTOR:g}x their forward work. "
        f"Batches arrive at r = {results['serving_rate_tokens_s']:.3g} tokens/s "
        f"(utilisation {cfg.monitor.utilization} at mean-cost routing); the fixed power "
        f"(idle + dense layers) is {results['fixed_power_w']:.1f} W. 'Dynamic energy' is "
        "the energy above idle (what routing changes); the total includes idle. The "
        "wall-clock TTT overhead is measured on this CPU.",
        f"- Model: {mcfg.num_layers} layers, D={mcfg.d_model}, {mcfg.num_heads} heads, "
        f"E={mcfg.num_experts} SwiGLU experts of widths {list(mcfg.expert_widths)} "
        f"({', '.join(f'{v:.4f}' for v in results['expert_uj_per_token'])} µJ/token each), "
        f"top-{mcfg.top_k}, dropless, {n_params} parameters; trained "
        f"{cfg.train.num_steps} Adam steps (lr {cfg.train.lr}, batch {cfg.train.batch}x"
        f"{cfg.data.length} bytes, load-balance {cfg.train.load_balance}, z "
        f"{cfg.train.z_loss}) on the pydoc_data English topics (90% of the topics; held-out "
        "topics: "
        + ", ".join(f"{i['heldout_doc_bpc']:.3f}" for i in info)
        + " bits/char per seed). Training took "
        + ", ".join(f"{i['train_seconds']:.0f}" for i in info)
        + " s per seed.",
        f"- Shifted stream: {cfg.data.stream_batches} batches of {cfg.data.batch}x"
        f"{cfg.data.length} bytes of the standard library's top-level Python modules, "
        "scored prequentially (each batch before any adaptation on it). TTT: router "
        f"({cfg.ttt.params}), next-byte loss, Adam lr {cfg.ttt.lr}, {cfg.ttt.steps} steps on "
        f"{cfg.ttt.windows} windows of every {cfg.ttt.every}th batch, cumulative. Budget "
        f"controller: multiplicative, gain {cfg.budget.gain}, λ in [{cfg.budget.lam_min}, "
        f"{cfg.budget.lam_max}], escalation after {cfg.budget.patience} readings over budget "
        "at λ_max.",
        f"- Seeds {tuple(cfg.seeds)} (init, training batches, doc split, stream); means ± "
        "95% t-interval over seeds; changes are per seed relative to no_ttt, then averaged.",
    ]


def _digits_header(results: dict[str, Any], cfg, mcfg: moe.MoEConfig, n_params: int) -> list[str]:
    """Provenance of the digits-C task: energy model, model, training, stream."""
    info, rows = results["seed_info"], results["methods"]
    pixels = digits.PIXELS
    per_image = ", ".join(
        f"{n} {pixels * rows[n]['uj_per_token']['mean']:.3f}"
        for n in rows
        if results["kinds"][n] in ("no_ttt", "ttt", "prune", "top_k", "int8")
    )
    segs = ", ".join(f"{c} s{s}" for _, _, c, s in digits.schedule(cfg))
    return [
        "## Energy-aware TTT for a mixture-of-experts classifier on digits-C (issue 5)",
        "",
        f"- Date: {report.today()}; machine: {report.machine()}.",
        "- Command: `python -m experiments.run --config configs/energy_moe_digits.py "
        "--workdir runs/energy_moe_digits`.",
        f"- **Energy is simulated** (monitor: {_monitor(results)}), with the accounting of the "
        "energy_moe section (dense layers + the experts actually used, adaptation steps "
        f"charged {1 + BACKWARD_FACTOR:g}x their forward work, idle "
        f"{results['idle_power_w']:.0f} W, fixed power {results['fixed_power_w']:.1f} W, "
        f"r = {results['serving_rate_tokens_s']:.3g} tokens/s at utilisation "
        f"{cfg.monitor.utilization}). One image is {pixels} tokens: µJ per image = "
        f"{pixels} x µJ/token (e.g. {per_image}).",
        f"- Model: {mcfg.num_layers} layers, D={mcfg.d_model}, {mcfg.num_heads} heads, "
        f"E={mcfg.num_experts} SwiGLU experts of widths {list(mcfg.expert_widths)}, "
        f"top-{mcfg.top_k}, dropless, 10-way head on the mean-pooled states, {n_params} "
        f"parameters; each image is 64 pixel tokens (intensity 0..16). Trained "
        f"{cfg.train.num_steps} Adam steps (lr {cfg.train.lr}, batch {cfg.train.batch}) on "
        "the clean train split of scikit-learn's digits; clean test error per seed: "
        + ", ".join(f"{i['clean_test_error']:.3f}" for i in info)
        + "; training took "
        + ", ".join(f"{i['train_seconds']:.0f}" for i in info)
        + " s per seed.",
        f"- Shifted stream: {cfg.data.stream_batches} batches of {cfg.data.batch} test "
        f"images ({cfg.data.test_fraction:.0%} split, drawn per batch), in equal segments: "
        f"{segs}; scored prequentially (error of each batch before any adaptation on it). "
        f"TTT: TENT (label-free prediction entropy) of {cfg.ttt.params}, Adam lr "
        f"{cfg.ttt.lr}, {cfg.ttt.steps} step(s) on {cfg.ttt.windows} images of every "
        f"{cfg.ttt.every}th batch, cumulative. Budget controller as in energy_moe "
        f"(patience {cfg.budget.patience}).",
        f"- Seeds {tuple(cfg.seeds)} (init, training batches, split, stream); means ± 95% "
        "t-interval over seeds; error changes are absolute (pp = accuracy points) per seed "
        "relative to no_ttt, then averaged.",
    ]


#: Per section: its provenance lines and its figures' captions.
HEADERS = {"energy_moe": _lm_header, "energy_moe_digits": _digits_header}
CAPTIONS = {
    "energy_moe": {
        "pareto": "Pareto",
        "heatmap": "expert activation",
        "convergence": "routing convergence",
        "budget": "power budgets",
    },
    "energy_moe_digits": {plot: plot for plot in PLOTS},
}


def write_report(results: dict[str, Any], cfg, workdir: str | None = None) -> None:
    """Put tables, plots and provenance into the task's BENCHMARKS.md section.

    Everything comes from ``results`` and the config; ``workdir`` (the run's) is not read.
    """
    del workdir
    task = task_of(cfg)
    name = task.section
    plot_all(results, str(report.BENCHMARKS.parent / "docs" / "figures"), metric=task.metric,
             prefix=name)  # fmt: skip
    mcfg = task.model_config(cfg)
    n_params = sum(
        x.size for x in jax.tree.leaves(jax.eval_shape(lambda: moe.init_moe(mcfg).params))
    )
    captions = CAPTIONS[name]
    figures = [f"![{captions[p]}](docs/figures/{name}_{p}.png)" for p in shown_plots(results)]
    body = "\n".join(
        [
            *HEADERS[name](results, cfg, mcfg, n_params),
            *backend.line(results),
            *expert_header(results, cfg),
            *plan_header(results, cfg),
            "",
            summary(results, cfg),
            "",
            "**Reading (computed from the numbers above):**",
            "",
            *reading(results, task.metric),
            "",
            *figures,
        ]
    )
    report.publish(name, body, results)
