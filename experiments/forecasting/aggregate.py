"""Per-seed cell records -> the seed means (± 95% CI) that results.json keeps."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from experiments.forecasting.configure import FINETUNE
from metattt import stats
from metattt.data.session_metrics import steps_to_fraction, steps_to_level


def seed_record(values: Iterable[float]) -> dict[str, Any]:
    """``{"mean", "ci", "per_seed"}`` of one value per seed (ci: the 95% half-width, 0 for one
    seed)."""
    values = [float(v) for v in values]
    ci = stats.mean_ci(values).half_width if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "ci": float(ci), "per_seed": values}


def summarize_method(per_seed: list[dict[str, Any]], inner_steps: int) -> dict[str, Any]:
    """Seed means (± 95% CI) of a method's curve statistics; curves averaged over sessions."""
    keys = ("r2", "mse", "poco")
    seed_curves = {
        k: [np.mean([s[k] for s in c["sessions"]], axis=0) for c in per_seed] for k in keys
    }
    out: dict[str, Any] = {"r2_curve_per_seed": [c.tolist() for c in seed_curves["r2"]]}
    for k in keys:
        out[f"{k}_curve"] = np.mean(seed_curves[k], axis=0).tolist()
        out[f"{k}_0"] = seed_record(c[0] for c in seed_curves[k])
        out[f"{k}_k"] = seed_record(c[inner_steps] for c in seed_curves[k])
        out[f"{k}_final"] = seed_record(c[-1] for c in seed_curves[k])
    steps95 = [np.mean([steps_to_fraction(s["r2"]) for s in c["sessions"]]) for c in per_seed]
    out["steps95"] = seed_record(steps95)
    num_steps = len(seed_curves["r2"][0]) - 1
    per_step = [np.mean([s["seconds"] for s in c["sessions"]]) / num_steps for c in per_seed]
    out["seconds_per_step"] = seed_record(per_step)
    out["seconds95"] = seed_record(np.multiply(per_step, steps95))
    return out


def summarize_seeds(seeds: list[dict[str, Any]], inner_steps: int) -> dict[str, Any]:
    """The seed summaries of every method, the data requirement, pretraining, meta-training
    and the online comparison, from the per-seed records of :func:`~.main.run_seed`."""
    methods = {
        name: summarize_method([s["curves"][name] for s in seeds], inner_steps)
        for name in seeds[0]["curves"]
    }
    main = methods[FINETUNE]
    targets = 0.95 * np.asarray(main["r2_final"]["per_seed"])
    for r in methods.values():
        r["steps_to_ft95"] = seed_record(
            steps_to_level(c, t) for c, t in zip(r["r2_curve_per_seed"], targets, strict=True)
        )
    gap = np.subtract(main["r2_final"]["per_seed"], main["r2_0"]["per_seed"])
    return {
        "methods": methods,
        "unadapted_gap": {**seed_record(gap), "required": 0.1, "holds": bool(np.all(gap >= 0.1))},
        "pretrain": {
            key: seed_record(s["pretrain"][key] for s in seeds)
            for key in ("loss_first", "loss_last", "seconds")
        },
        "meta": {
            name: {
                key: seed_record(s["meta"][name][key] for s in seeds)
                for key in ("query_before", "query_after", "seconds")
            }
            for name in seeds[0]["meta"]
        },
        "online": {
            drift: {
                key: seed_record(s["online"][drift][key] for s in seeds)
                for key in seeds[0]["online"][drift]
            }
            for drift in seeds[0]["online"]
        },
    }
