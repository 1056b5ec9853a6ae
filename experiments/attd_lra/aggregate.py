"""Seed aggregation: means with t-intervals, summed K histograms, Spearman correlations."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.attd_lra.methods import CONTROLLED, parse_method
from metattt import stats

SCALARS = (
    "acc_id",
    "acc_shift",
    "mean_k_id",
    "mean_k_shift",
    "inner_steps_shift",
    "lint_before_shift",
    "lint_after_shift",
    "max_rho_shift",
    "masked_ms_per_example",
    "grouped_ms_per_example",
    "finetune_seconds",
)


def _ci(values) -> dict[str, float]:
    m = stats.mean_ci(values)
    return {"mean": m.mean, "ci": m.half_width if np.isfinite(m.half_width) else 0.0}


def aggregate(cfg, cells, base_info) -> dict[str, Any]:
    """Means over seeds (± 95% t-interval) per task and method, K histograms summed over
    seeds, and per task the Spearman correlation (bootstrap CI) of ATTD's K with difficulty
    over both test splits pooled over seeds; the per-example data stays for the plots."""
    out: dict[str, Any] = {
        "seeds": list(cfg.seeds),
        "k_max": cfg.attd.k_max,
        "tasks": {},
        "base": {t: {str(s): v for s, v in b.items()} for t, b in base_info.items()},
    }
    for task_name, by_seed in cells.items():
        table: dict[str, Any] = {}
        for name in dict.fromkeys(tuple(cfg.methods) + tuple(cfg.ablation_methods)):
            rows = [by_seed[s][name] for s in cfg.seeds if name in by_seed[s]]
            entry = {k: _ci([r[k] for r in rows]) for k in SCALARS}
            entry["acc_shift_seeds"] = [r["acc_shift"] for r in rows]
            entry["seeds"] = [s for s in cfg.seeds if name in by_seed[s]]
            entry["k_hist_shift"] = np.sum([r["k_hist_shift"] for r in rows], axis=0).tolist()
            entry["k_hist_id"] = np.sum([r["k_hist_id"] for r in rows], axis=0).tolist()
            entry["max_rho"] = max(max(r["max_rho_id"], r["max_rho_shift"]) for r in rows)
            entry["max_abs_path_diff"] = max(r["timing_max_abs_diff"] for r in rows)
            ex = {
                key: np.concatenate(
                    [r[f"examples_{t}"][key] for r in rows for t in ("id", "shift")]
                )
                for key in ("k", "difficulty", "correct", "lint_drop")
            }
            entry["examples"] = {k: v.tolist() for k, v in ex.items()}
            adapted = ex["k"] > 0
            entry["lint_lowered_share"] = (
                float(np.mean(ex["lint_drop"][adapted] > 0)) if adapted.any() else float("nan")
            )
            ci = (
                stats.spearman_ci(ex["k"], ex["difficulty"], num_resamples=cfg.eval.bootstrap)
                if parse_method(name).base in CONTROLLED
                else None
            )
            entry["spearman_k_difficulty"] = None if ci is None else ci._asdict()
            entry["thresholds"] = [r["thresholds"] for r in rows]
            # Does a larger L_int drop go with a right answer? (methods that adapt every input)
            drop_ci = (
                stats.spearman_ci(ex["lint_drop"], ex["correct"], num_resamples=cfg.eval.bootstrap)
                if adapted.all() and ex["k"].size >= 3 and np.isfinite(ex["lint_drop"]).all()
                else None
            )
            entry["spearman_drop_correct"] = None if drop_ci is None else drop_ci._asdict()
            table[name] = entry
        out["tasks"][task_name] = table
    return out


# --------------------------------------------------------------------------------- tables
