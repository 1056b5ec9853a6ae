"""Config -> every seed's cells (cached in the workdir) -> ``results.json``, summary and plots.

With ``mesh_devices`` the pretraining and the meta-training are data-parallel over a mesh of
all processes' devices (``config.distributed``; :mod:`.programs`); the trained parameters are
then copied to each process, which computes every other cell alike, and process 0 alone writes
the files other than the checkpoints.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from experiments import harness
from experiments.forecasting import cells
from experiments.forecasting.aggregate import summarize_seeds
from experiments.forecasting.configure import FINETUNE, recordings, validate
from experiments.forecasting.programs import Programs
from experiments.forecasting.report import plot_curves, plot_online, summary
from metattt import atomic, multihost

logger = logging.getLogger(__name__)


def method_names(cfg) -> list[tuple[str, str]]:
    """Every (method, adapt set) tested: the main set for all methods, then the ablation."""
    main = [(FINETUNE, cfg.adapt)] + [(m, cfg.adapt) for m in cfg.meta.methods]
    ablation = [(m, s) for s in cfg.ablation_adapt for m in cfg.ablation_methods]
    return main + ablation


def method_label(method: str, adapt_set: str, cfg) -> str:
    """A method's name in results and tables: ``method``, or ``method @ set`` off the main set."""
    return method if adapt_set == cfg.adapt else f"{method} @ {adapt_set}"


def run_seed(programs: Programs, cfg, seed: int, workdir: str) -> dict[str, Any]:
    """Every cell of one seed (cached under ``workdir/seed_<seed>``)."""
    folder = os.path.join(workdir, f"seed_{seed}")
    os.makedirs(folder, exist_ok=True)
    sessions = recordings(cfg, seed, test=False)
    test = recordings(cfg, seed, test=True)
    template = programs.template(seed)
    pretrained, pre_info = harness.params_cell(
        os.path.join(folder, "pretrain"),
        template,
        lambda run_dir: cells.pretrain(programs, sessions, seed, run_dir),
    )
    pretrained = programs.local(pretrained)
    inits = {}
    meta_info = {}
    for method, adapt_set in method_names(cfg):
        if method == FINETUNE or (method, adapt_set) in inits:
            continue
        label = method_label(method, adapt_set, cfg)
        trained, meta_info[label] = harness.params_cell(
            os.path.join(folder, f"meta_{method}_{adapt_set}"),
            template,
            lambda run_dir, m=method, a=adapt_set: cells.meta_train(
                programs, m, a, pretrained, sessions, seed, run_dir
            ),
        )
        inits[method, adapt_set] = programs.local(trained)
    curves = {}
    for method, adapt_set in method_names(cfg):
        init = pretrained if method == FINETUNE else inits[method, adapt_set]
        curves[method_label(method, adapt_set, cfg)] = harness.json_cell(
            os.path.join(folder, f"test_{method}_{adapt_set}.json"),
            lambda i=init, a=adapt_set, m=method: cells.adaptation_curves(
                programs, i, test, a, m, seed
            ),
        )
    online_results = harness.json_cell(
        os.path.join(folder, "online.json"),
        lambda: cells.online_cell(programs, inits[cfg.online.method, cfg.adapt], cfg, seed),
    )
    return {
        "pretrain": pre_info,
        "meta": meta_info,
        "curves": curves,
        "online": online_results,
        "train": sessions,
    }


def run(cfg, workdir: str) -> dict[str, Any]:
    """All seeds and cells, then the memory table; writes results.json, summary and plots."""
    validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    programs = Programs(cfg)
    seeds = []
    start = time.perf_counter()
    for seed in cfg.seeds:
        seeds.append(run_seed(programs, cfg, seed, workdir))
        logger.info("seed %d done after %.0f s", seed, time.perf_counter() - start)
    memory = harness.json_cell(
        os.path.join(workdir, "memory.json"),
        lambda: cells.memory_rows(programs, programs.init_params(0), seeds[0]["train"], cfg),
    )
    results = {
        "seeds": list(cfg.seeds),
        **summarize_seeds(seeds, cfg.meta.inner_steps),
        "memory": memory,
        "seconds": time.perf_counter() - start,
        "cell_seconds": harness.cell_seconds(workdir),
    }
    if multihost.is_primary():  # every process of a multi-process run holds the same results
        atomic.write_json(os.path.join(workdir, "results.json"), results, indent=1)
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(summary(results, cfg) + "\n")
        plot_curves(results, cfg, os.path.join(workdir, "forecasting_curves.png"))
        plot_online(results, os.path.join(workdir, "forecasting_online.png"))
    return results


def demo_rows(workdir: str) -> list[tuple[str, str, str, float, float, float]]:
    """``make demo``: held-out R² before and after k steps, fine-tuning vs FOMAML (tiny)."""
    from configs import forecasting as forecasting_config  # configs are read by experiments only

    cfg = forecasting_config.get_config("tiny")
    cfg.meta.methods = ("fomaml",)
    cfg.ablation_adapt = ()
    cfg.online.drifts = ()  # the demo's rows are the meta methods': no online comparison
    cfg.memory.inner_steps = ()
    start = time.perf_counter()
    results = run(cfg, os.path.join(workdir, "forecasting"))
    seconds = time.perf_counter() - start
    k = cfg.meta.inner_steps
    return [
        (
            "forecasting (POCO-style)",
            name,
            f"held-out R², 0 -> {k} steps",
            r["r2_0"]["mean"],
            r["r2_k"]["mean"],
            seconds,
        )
        for name, r in results["methods"].items()
    ]
