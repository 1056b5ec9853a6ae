"""Seed aggregation: means with t-intervals, summed K histograms, Spearman correlations."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.attd_lra.methods import CONTROLLED, SHIFT_TASKS, parse_method
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


def shift_bands(data) -> list[tuple[float, float]]:
    """The shifted test's bands as intervals of the difficulty |log factor| (a band and its
    mirror image, e.g. (1/3, 1/2) and (2, 3), are one interval), in increasing order."""
    edges = {
        tuple(sorted((round(abs(np.log(lo)), 6), round(abs(np.log(hi)), 6))))
        for lo, hi in data.shift_bands
    }
    return sorted(edges)


def mixture_and_bands(rows, id_share: float, data) -> dict[str, Any]:
    """Per seed, the test mixture (``id_share`` in-distribution inputs, the rest shifted) and
    the accuracy per shift band; means over seeds with 95% t-intervals."""
    mix = lambda key: [id_share * r[f"{key}_id"] + (1 - id_share) * r[f"{key}_shift"] for r in rows]
    out: dict[str, Any] = {"acc_mix": _ci(mix("acc")), "mean_k_mix": _ci(mix("mean_k"))}
    out["acc_mix_seeds"] = mix("acc")
    out["band_acc"], out["band_acc_seeds"] = {}, {}
    for lo, hi in shift_bands(data):
        per_seed = []
        for r in rows:
            d = np.asarray(r["examples_shift"]["difficulty"])
            inside = (d >= lo - 1e-6) & (d <= hi + 1e-6)
            per_seed.append(float(np.mean(np.asarray(r["examples_shift"]["correct"])[inside])))
        label = f"{np.exp(lo):.2f}-{np.exp(hi):.2f}"
        out["band_acc"][label], out["band_acc_seeds"][label] = _ci(per_seed), per_seed
    return out


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
            entry["acc_id_seeds"] = [r["acc_id"] for r in rows]
            entry["seeds"] = [s for s in cfg.seeds if name in by_seed[s]]
            entry["k_hist_shift"] = np.sum([r["k_hist_shift"] for r in rows], axis=0).tolist()
            entry["k_hist_id"] = np.sum([r["k_hist_id"] for r in rows], axis=0).tolist()
            entry["max_rho"] = max(max(r["max_rho_id"], r["max_rho_shift"]) for r in rows)
            entry["max_abs_path_diff"] = max(r["timing_max_abs_diff"] for r in rows)
            keys = ("k", "difficulty", "correct", "lint_drop", "dlogp")
            ex = {  # dlogp: not in cells cached before 2026-12-07
                key: np.concatenate(
                    [r[f"examples_{t}"][key] for r in rows for t in ("id", "shift")]
                )
                for key in keys
                if all(key in r[f"examples_{t}"] for r in rows for t in ("id", "shift"))
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
            # Outer steps not applied as non-finite, summed over seeds. A cell cached before
            # the outer step had the guard (2026-12-07) lacks the count: with a finite final
            # loss it took no non-finite step (one would have left NaN parameters), else None.
            skipped = [
                r.get("skipped_outer_steps", 0 if np.isfinite(r["final_train_loss"]) else None)
                for r in rows
            ]
            entry["skipped_outer_steps"] = None if None in skipped else int(sum(skipped))
            # Does a larger L_int drop go with a right answer? (methods that adapt every input)
            drop_ci = (
                stats.spearman_ci(ex["lint_drop"], ex["correct"], num_resamples=cfg.eval.bootstrap)
                if adapted.all() and ex["k"].size >= 3 and np.isfinite(ex["lint_drop"]).all()
                else None
            )
            entry["spearman_drop_correct"] = None if drop_ci is None else drop_ci._asdict()
            # Does a larger L_int drop go with a larger gain in log p(true class)?
            if "dlogp" in ex:
                gain_ci = (
                    stats.spearman_ci(
                        ex["lint_drop"], ex["dlogp"], num_resamples=cfg.eval.bootstrap
                    )
                    if drop_ci is not None
                    else None
                )
                entry["spearman_drop_dlogp"] = None if gain_ci is None else gain_ci._asdict()
            if task_name in SHIFT_TASKS:
                entry.update(mixture_and_bands(rows, cfg.eval.id_share, cfg.data[task_name]))
            table[name] = entry
        out["tasks"][task_name] = table
    return out


# --------------------------------------------------------------------------------- tables
