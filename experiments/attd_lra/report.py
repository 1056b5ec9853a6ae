"""Tables, plots and the BENCHMARKS.md section of the ATTD-on-LRA experiment."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments import report
from experiments.attd_lra import dynamics
from experiments.attd_lra.aggregate import shift_bands
from experiments.attd_lra.methods import (
    ADAPTER_LABELS,
    DIFFICULTY,
    SHIFT_TASKS,
    method_label,
    parse_method,
)
from experiments.attd_lra.readings import fmt, hist, reading, rho


def summary(results: dict[str, Any], cfg) -> str:
    """The table :mod:`experiments.run` prints at the end."""
    del cfg
    return summary_table(results)


def summary_table(results: dict[str, Any]) -> str:
    """One markdown table per task: accuracy, K, compute, L_int, ρ(Ā), wall time, Spearman."""
    k_max = results["k_max"]
    parts = []
    for task_name, table in results["tasks"].items():
        parts += [
            f"**{task_name}** (means over seeds {results['seeds']} ± 95% CI; K histogram in % "
            f"of test inputs for K = 0..{k_max}; Spearman of K with {DIFFICULTY[task_name]} "
            "over both test splits, bootstrap 95% CI)",
            "",
            "| method | acc (in-dist.) | acc (shifted) | mean K (shifted) | K histogram "
            "(shifted) | inner steps / split | L_int before → after (shifted) | L_int lowered "
            "| max ρ(Ā) | ms/example masked | ms/example grouped | Spearman K~difficulty |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, e in table.items():
            lowered = e["lint_lowered_share"]
            parts.append(
                f"| {method_label(name)} | {fmt(e['acc_id'])} | {fmt(e['acc_shift'])} | "
                f"{fmt(e['mean_k_shift'], 2)} | {hist(e['k_hist_shift'])} | "
                f"{e['inner_steps_shift']['mean']:.0f} | "
                f"{e['lint_before_shift']['mean']:.4f} → {e['lint_after_shift']['mean']:.4f} | "
                + (f"{100 * lowered:.0f}% | " if np.isfinite(lowered) else "- | ")
                + f"{e['max_rho']:.6f} | {fmt(e['masked_ms_per_example'], 2)} | "
                f"{fmt(e['grouped_ms_per_example'], 2)} | {rho(e['spearman_k_difficulty'])} |"
            )
        parts.append("")
    return "\n".join(parts).strip()


# ---------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_k(results: dict[str, Any], path: str) -> None:
    """Shifted-split accuracy against mean K per method (error bars: 95% CI over seeds)."""
    plt = _pyplot()
    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task_name in zip(axes[0], tasks, strict=True):
        for name, e in results["tasks"][task_name].items():
            ax.errorbar(
                e["mean_k_shift"]["mean"],
                e["acc_shift"]["mean"],
                xerr=e["mean_k_shift"]["ci"],
                yerr=e["acc_shift"]["ci"],
                fmt="o",
                capsize=3,
                label=method_label(name),
            )
        ax.set_xlabel("mean K (inner steps per input)")
        ax.set_ylabel("accuracy, shifted test split")
        ax.set_title(task_name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTTED = ("attd", "attd+so")  # the methods whose K the difficulty plot shows


def plot_k_vs_difficulty(results: dict[str, Any], path: str) -> None:
    """ATTD's mean K per difficulty level (both test splits, all seeds) with the Spearman ρ;
    one panel per task and ATTD method (first order, and second order where it ran)."""
    plt = _pyplot()
    panels = [(t, n) for t, table in results["tasks"].items() for n in PLOTTED if n in table]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.6),
                             squeeze=False)  # fmt: skip
    for ax, (task_name, name) in zip(axes[0], panels, strict=False):
        e = results["tasks"][task_name][name]
        k = np.asarray(e["examples"]["k"], float)
        d = np.asarray(e["examples"]["difficulty"], float)
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, k.shape)
        ax.scatter(d, k + jitter, s=4, alpha=0.25, color="gray")
        levels = np.unique(d)
        if levels.size > 12:  # bin continuous difficulty (text length) into deciles
            edges = np.unique(np.quantile(d, np.linspace(0, 1, 11)))
            bins = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, edges.size - 2)
            centres = [d[bins == i].mean() for i in range(edges.size - 1) if np.any(bins == i)]
            means = [k[bins == i].mean() for i in range(edges.size - 1) if np.any(bins == i)]
        else:
            centres, means = levels, [k[d == v].mean() for v in levels]
        ax.plot(centres, means, "o-", color="C3", label="mean K")
        ax.set_xlabel(DIFFICULTY[task_name])
        ax.set_ylabel(f"K of {method_label(name)}")
        ax.set_title(f"{task_name}: Spearman {rho(e['spearman_k_difficulty'])}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------- report


#: What each dynamics-shift task's section is titled by (formatted with its data config).
_SHIFT_TITLES = {
    "timewarp": "time-warped periodic waveforms (the shift plays them faster or slower)",
    "oscillator": "latent damped oscillators (the shift scales their decay time)",
    "recorded": "real recordings (UCR {dataset}) under a sampling-rate shift",
}


def shift_title(cfg) -> str:
    """The section title of a dynamics-shift run: it names the run's task(s), so that each
    variant of ``configs/attd_dynamics.py`` has a title of its own."""
    names = [_SHIFT_TITLES[t].format(**cfg.data[t]) for t in cfg.tasks if t in _SHIFT_TITLES]
    return "## ATTD on Mamba where adapting the dynamics can matter: " + "; ".join(names)


def _shift_text(cfg) -> list[str]:
    d = cfg.data
    lines = []
    if "listops" in cfg.tasks:
        tr, sh = d.listops.train, d.listops.test_shift
        lines.append(
            f"- ListOps (LRA recipe, 10 classes): train {tr.num} expressions of depth "
            f"{tr.min_depth}-{tr.max_depth}, {tr.min_length}-{tr.max_length} tokens; "
            f"in-distribution test {d.listops.test_id.num} unseen expressions of the same "
            f"recipe; shifted test {sh.num} of depth {sh.min_depth}-{sh.max_depth}, "
            f"{sh.min_length}-{sh.max_length} tokens (deeper and longer than any training input)."
        )
    if "pathfinder" in cfg.tasks:
        tr, sh = d.pathfinder.train, d.pathfinder.test_shift
        lines.append(
            f"- Pathfinder ({tr.size[0]}x{tr.size[1]} pixels -> {tr.size[0] * tr.size[1]} "
            f"tokens, balanced classes): train {tr.num} images with main paths of "
            f"{tr.path_length[0]}-{tr.path_length[1]} steps and {tr.num_distractors[0]}-"
            f"{tr.num_distractors[1]} distractors; shifted test {sh.num} images with paths of "
            f"{sh.path_length[0]}-{sh.path_length[1]} steps and {sh.num_distractors[0]}-"
            f"{sh.num_distractors[1]} distractors."
        )
    for task in set(cfg.tasks) & set(SHIFT_TASKS):
        t = d[task]
        if task == "timewarp":
            what = (
                f"which of {t.num_classes} periodic templates (3 harmonics, random phase, "
                f"amplitude ×0.8-1.2, noise 0.05) a sequence of {t.seq_len} tokens shows, period "
                f"{t.period:g} ± 15%; the shift plays it w times slower (w < 1: faster)"
            )
        elif task == "oscillator":
            what = (
                f"which of {t.num_classes} latent linear systems (2 damped modes each) drove a "
                f"sequence of {t.seq_len} tokens; the shift scales the modes' decay time"
            )
        else:
            what = (
                f"which class a real recording of the UCR archive's {t.dataset} shows (TRAIN and "
                f"TEST pooled, then {t.held_out:.0%} of the recordings held out by seed for the "
                f"test splits), resampled to {t.seq_len} tokens; the shift samples it w times "
                f"as densely ({t.seq_len}·w tokens, padded)"
            )
        bands = ", ".join(f"×{np.exp(lo):.2f}-{np.exp(hi):.2f}" for lo, hi in shift_bands(t))
        outer = ", ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in t.outer_bands)
        lines.append(
            f"- {task} ({DIFFICULTY[task]} is the difficulty): {what}. Train {t.num_train} and "
            f"in-distribution test {t.num_test} inputs at factor 1; outer-training split "
            f"{t.num_outer} inputs with factors in {outer} (factor 1 and milder shifts than any "
            f"test band); shifted test {t.num_test} inputs with factors in bands {bands} either "
            "way (held out from all training and from every setting)."
        )
    if "text" in cfg.tasks:
        t = d.text
        lines.append(
            f"- Text (byte level, corpus `{t.corpus}`: pydoc topic text vs standard-library "
            f"source, split by file): train passages of {t.seq_len} bytes; in-distribution "
            f"test {t.num_test} passages of {t.seq_len} bytes from held-out (validation) files; "
            f"shifted test {t.num_test} passages of {t.test_length} bytes from other held-out "
            "(test) files."
        )
    return lines


def _inner_text(cfg) -> list[str]:
    a = cfg.attd
    line = (
        f"- Inner loop: L_int = {a.objective}, {a.inner_opt}(lr {a.inner_lr}"
        + (f", eps_root {a.adam_eps_root}" if a.adam_eps_root else "")
        + f") on ψ, K_max = {a.k_max}. "
    )
    if a.inner_lr_grid:
        line = (
            f"- Inner loop: L_int = {a.objective}, {a.inner_opt} on ψ, K_max = {a.k_max}; its "
            f"learning rate per adapter family chosen from {list(a.inner_lr_grid)} on the "
            "outer-training split (see below). "
        )
    elif a.inner_opt == "adam":
        line += (
            "SGD barely moves L_int (∂L_int/∂U is ~1e-4 at ψ₀: SGD at lr 50 lowers it by "
            "~0.3% in 4 steps, and lr 1000 diverges to NaN), hence Adam, whose step size does "
            "not depend on the gradient scale."
        )
    names = tuple(cfg.methods) + tuple(cfg.ablation_methods)
    families = sorted({parse_method(n).adapter for n in names} - {None})
    if families:
        line += (
            "Adapter families besides the low-rank ψ: "
            + "; ".join(f"`+{f}` = {ADAPTER_LABELS[f]}" for f in families)
            + " (zero at the start; see `attd.dynamics.make_adapter`)."
        )
    return [line]


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """Put the tables, plots and provenance into BENCHMARKS.md's ``config.section``."""
    root = report.BENCHMARKS.parent
    figures = root / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    acc_png, k_png = (f"{cfg.figure_prefix}_{n}.png" for n in ("accuracy_vs_k", "k_vs_difficulty"))
    plot_accuracy_vs_k(results, str(figures / acc_png))
    plot_k_vs_difficulty(results, str(figures / k_png))
    m, a, f, p = cfg.model, cfg.attd, cfg.finetune, cfg.pretrain
    pre = "; ".join(
        f"{t} " + ", ".join(f"{b['seconds']:.0f}" for b in results["base"][t].values())
        for t in results["base"]
    )
    names = tuple(cfg.methods) + tuple(cfg.ablation_methods)
    second = any(parse_method(n).second_order for n in names)
    joint = any(parse_method(n).joint for n in names)
    shifted = bool(set(cfg.tasks) & set(SHIFT_TASKS))
    config_file = cfg.command.split("--config ")[1].split()[0].split(":")[0]
    title = (
        shift_title(cfg)
        if shifted
        else "## ATTD on Mamba: joint training with the self-supervised loss (does TTT of the "
        "dynamics help once outer training keeps L_int informative?)"
        if joint
        else "## ATTD on Mamba: second- vs first-order meta-training (does TTT of the dynamics "
        "help when the outer loop differentiates through it?)"
        if second
        else "## ATTD on Mamba, Long Range Arena tasks, with issue 17's protocol (θ frozen, SGD "
        "inner rule, thresholds recalibrated after outer training)"
        if a.recalibrate and f.freeze_theta
        else "## ATTD (adaptive test-time dynamics) on Mamba, Long Range Arena tasks"
    )
    order = (
        "first order (inner gradients stopped) for plain names and second order through the "
        "inner loop (`+so`), everything else equal"
        if second
        else f"first-order={a.first_order}"
    )
    if joint:
        order += (
            f"; `+j` adds μ·E[L_int(x; θ, ψ₀)] with μ = {a.joint_weight} to the outer loss "
            "(joint training, as in Sun et al. 2020), so outer training keeps θ a model of its "
            "inputs"
        )
    ablation = (
        [
            f"- Ablation (seed(s) {list(cfg.ablation_seeds)} only): "
            + ", ".join(f"`{n}` = {method_label(n)}" for n in cfg.ablation_methods)
            + f"; `+sgd` is SGD at lr {a.sgd_lr} on ψ, `+r<N>` a ψ of rank N."
        ]
        if cfg.ablation_methods
        else []
    )
    body = "\n".join(
        [
            title,
            "",
            f"- Date: {report.today()}; machine: {report.machine()} (shared with other jobs).",
            f"- Command: `{cfg.command}` (other variants: see `{config_file}`).",
            f"- Model: Mamba, {m.n_layers} layer(s), width {m.d_model} (D = {m.expand * m.d_model}"
            f" SSM channels), state N = {m.d_state}; ψ = (U, V) of rank {m.psi_rank} on A_log "
            f"(U₀ = 0, V₀ ~ {m.psi_scale}·N(0,1)).",
            *_shift_text(cfg),
            f"- Shared per task and seed: data, and a base Mamba pretrained {p.steps} Adam steps "
            f"(lr {p.lr}, batch {p.batch}) on task CE + {p.lm_weight} x next-token CE "
            f"(seconds: {pre}). Each method then trains its outer parameters (θ, ψ₀, "
            f"thresholds) from that base for {f.steps} steps (batch {f.batch}, the same batches "
            f"for every method; Adam lr "
            + ("θ frozen" if f.freeze_theta else f"θ {f.lr_theta}")
            + f", ψ₀ {f.lr_psi}, thresholds "
            f"{f.lr_thresholds}), {order}, λ = {a.lam} ({a.cost} cost), "
            f"β = {a.beta}, τ = {a.temperature}, remat = {a.remat}. Thresholds start at "
            "quantiles of s on the outer-training inputs (ATTD: k/(K_max+1); gate: the median)"
            + (
                " and are set again at those quantiles of s under the trained parameters after "
                "outer training (`recalibrate`). "
                if a.recalibrate
                else ". "
            )
            + "`ATTD, λ=0` is an ablation: ATTD without the step cost, so only the task loss "
            "moves its thresholds.",
            *_inner_text(cfg),
            *ablation,
            "- Columns: accuracy on the in-distribution and shifted test splits; K and inner "
            "steps on the shifted split (inner steps = Σ K over its inputs, the compute of the "
            "grouped path); L_int at ψ₀ and after the input's K steps; 'L_int lowered' = share "
            "of adapted inputs (K > 0, both splits) whose L_int fell; max ρ(Ā) over all "
            "adapted inputs; wall time per example of the masked path (K_max steps for every "
            "input) and the grouped path (compute follows K), after compilation, on one batch "
            "of the shifted split. Rows without ± ran on one seed.",
            "",
            *([dynamics.table(results, cfg.eval.id_share), ""] if shifted else []),
            summary_table(results),
            "",
            f"![accuracy vs mean K](docs/figures/{acc_png})",
            "",
            f"![K vs difficulty](docs/figures/{k_png})",
            "",
            "### Reading",
            "",
            *(dynamics.verdicts(results) if shifted else []),
            *reading(results),
        ]
    )
    report.publish(cfg.section, body, kept_results(results))


def kept_results(results: dict[str, Any]) -> dict[str, Any]:
    """What the report renders from, to keep under docs/results: the per-input records only
    where a plot reads them (K and difficulty of the ATTD methods); every other figure and
    statistic is aggregated already."""
    tasks = {}
    for task_name, table in results["tasks"].items():
        tasks[task_name] = {}
        for name, e in table.items():
            e = {k: v for k, v in e.items() if k != "examples"}
            if name in PLOTTED and "examples" in table[name]:
                ex = table[name]["examples"]
                e["examples"] = {"k": ex["k"], "difficulty": ex["difficulty"]}
            tasks[task_name][name] = e
    return {**results, "tasks": tasks}
