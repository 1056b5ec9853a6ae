"""ATTD on LRA and dynamics-shift tasks: fixed Mamba, TTT, ponder-or-not and ATTD compared.

For each task (ListOps, Pathfinder, Text; time warp and latent timescale of
:mod:`attd.shifts`) and seed:

1. Data: a train split, an in-distribution test split and a *shifted* test split
   (ListOps: deeper nesting and longer expressions; Pathfinder: longer main paths and more
   distractors; Text: held-out files cut into longer passages; the dynamics tasks: factors
   drawn from held-out shift bands). The dynamics tasks also have an outer-training split on
   their own (milder) bands, so that ψ₀ and the controller learn on shifts that the test's
   are not.
2. Base: one Mamba pretrained on the train split with the task loss plus the next-token loss
   (so that the ponder signal s = L_int means something), cached as ``base.npz``; every method
   of this task and seed starts from it.
3. Methods, all through :func:`attd.method.make_attd` (only the controller differs): fixed
   (K = 0), full TTT (K = K_max), ponder-or-not (K ∈ {0, K_max}, one threshold) and ATTD
   (K_max ordered thresholds). Each trains its outer parameters (θ, ψ₀, thresholds) for the
   same few steps on the same batches (``finetune.freeze_theta`` keeps θ as pretrained);
   thresholds start at quantiles of s on the outer-training split and, with
   ``attd.recalibrate``, are set again at those quantiles after outer training.
4. Scores on both test splits: accuracy, K per input (mean, histogram), inner steps, L_int
   before and after adaptation, max ρ(Ā) of the adapted dynamics, and the wall time per
   example of the masked (K_max) and grouped (compute follows K) evaluation paths.

A method name is a controller, optionally with variants joined by ``+`` (see
:mod:`~experiments.attd_lra.methods`): ``attd+so`` is ATTD trained second order through the
inner loop, ``ttt+sgd`` full TTT with an SGD inner rule, ``ttt+r8`` full TTT with ψ of rank 8,
``ttt+so+j`` second-order full TTT whose outer loss also keeps the self-supervised loss. So the
first- vs second-order comparison (``configs/attd_lra.py:second_order``) is the same code path
with one switch, and ``config.ablation_methods`` run on ``config.ablation_seeds`` only.

Every (task, seed, method) cell is cached as JSON under ``workdir/<task>/seed_<s>/``, so a
rerun skips finished cells. With ``mesh_devices`` the pretraining and every outer training are
data-parallel over a mesh of all processes' devices (``config.distributed``), and every process
scores the cells alike (:mod:`.training`). ``results.json``, ``summary.md`` and the plots go
into ``workdir`` (process 0 alone writes them); ``python -m experiments.run --report --workdir
W`` renders them into BENCHMARKS.md and docs/.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from attd import lra, shifts
from attd.mamba import init_mamba
from experiments import harness
from experiments.attd_lra import training
from experiments.attd_lra.aggregate import aggregate
from experiments.attd_lra.checks import model_config, validate
from experiments.attd_lra.methods import SHIFT_TASKS, parse_method, seed_methods
from experiments.attd_lra.report import plot_accuracy_vs_k, plot_k_vs_difficulty, summary_table
from metattt import atomic, multihost, runlog, sharding

logger = logging.getLogger(__name__)


def _split_args(c) -> dict[str, Any]:
    """A data section's split as keyword arguments of :mod:`attd.lra.tasks` (``seed_offset``
    is the split's ``offset``)."""
    args = c.to_dict()
    args["offset"] = args.pop("seed_offset")
    return args


def load_task(cfg, task: str, seed: int) -> tuple[lra.LRATask, lra.Split]:
    """The train, in-distribution test and shifted test splits of ``task`` for ``seed``, and
    the split the outer loop trains on (the train split, except for the dynamics tasks)."""
    d = cfg.data[task]
    if task in SHIFT_TASKS:
        kw = d.to_dict()
        bands = {k: tuple(map(tuple, kw.pop(k))) for k in ("shift_bands", "outer_bands")}
        t = shifts.shift_task(task, seed, **bands, **kw)
        splits = (s.split for s in (t.train, t.test_id, t.test_shift))
        return lra.LRATask(*splits, t.vocab_size, t.num_classes), t.outer.split
    if task == "text":
        splits, _ = lra.stdlib_text_task(
            seq_len=d.seq_len,
            test_length=d.test_length,
            corpus=d.corpus,
            seed=seed,
            max_per_class=d.max_per_class,
        )
        task = lra.text_task(splits, d.num_test, seed)
        return task, task.train
    load = {"listops": lra.listops_task, "pathfinder": lra.pathfinder_task}[task]
    task = load(seed, *(_split_args(d[s]) for s in ("train", "test_id", "test_shift")))
    return task, task.train


def run(cfg, workdir: str) -> dict[str, Any]:
    """Every (task, seed, method) cell (cached), then the aggregate results, table and plots."""
    validate(cfg)
    root = pathlib.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    base_info: dict[str, dict[int, Any]] = {}
    inner_lrs: dict[str, dict[str, Any]] = {}
    todo = len(cfg.tasks) * sum(len(seed_methods(cfg, s)) for s in cfg.seeds)
    mesh = sharding.data_mesh(cfg.mesh_devices)
    bar = runlog.progress(total=todo, desc="attd_lra cells")
    for task_name in cfg.tasks:
        cells[task_name], base_info[task_name] = {}, {}
        compiled: dict[str, training.Compiled] = {}
        pretrain_step = None
        for seed in cfg.seeds:
            cell_dir = root / task_name / f"seed_{seed}"
            cell_dir.mkdir(parents=True, exist_ok=True)
            paths = {m: cell_dir / f"{m}.json" for m in seed_methods(cfg, seed)}
            cells[task_name][seed] = {
                m: json.loads(p.read_text()) for m, p in paths.items() if p.exists()
            }
            base_path = cell_dir / "base" / "info.json"
            done = len(cells[task_name][seed]) == len(paths) and base_path.exists()
            if not multihost.any_process(not done):  # all skip, or all compute (collectives)
                base_info[task_name][seed] = json.loads(base_path.read_text())
                bar.update(len(paths))
                continue
            task, outer = load_task(cfg, task_name, seed)
            mcfg = model_config(cfg, task.vocab_size, task.num_classes)
            apply, theta = init_mamba(mcfg, seed=seed)
            if pretrain_step is None:
                pretrain_step = training.make_pretrain_step(
                    apply, cfg.pretrain.lr, cfg.pretrain.lm_weight, mesh
                )
            if mesh is not None:  # saved and restored replicated over the mesh
                theta = jax.device_put(theta, NamedSharding(mesh, PartitionSpec()))
            theta, base_info[task_name][seed] = harness.params_cell(
                cell_dir / "base",
                theta,
                lambda run_dir, t=theta, tr=task.train, s=seed: training.pretrain(
                    cfg, t, tr, s, pretrain_step, run_dir
                ),
            )
            if mesh is not None:
                theta = sharding.local_copy(theta)
            if cfg.attd.inner_lr_grid and task_name not in inner_lrs:  # on the first seed
                inner_lrs[task_name] = harness.json_cell(
                    root / task_name / "inner_lr.json",
                    lambda: training.select_inner_lrs(cfg, apply, mcfg, theta, outer, seed),
                )
            for name in paths:
                if name in cells[task_name][seed]:
                    bar.update(1)
                    continue
                if name not in compiled:
                    family = parse_method(name).adapter or "low_rank"
                    lr = inner_lrs[task_name][family]["chosen"] if task_name in inner_lrs else None
                    compiled[name] = training.compile_method(name, apply, mcfg, cfg, lr, mesh)
                psi0 = training.initial_psi(name, mcfg, cfg, seed)
                run_dir = str(cell_dir / f"{name}_run")
                cell = harness.json_cell(
                    paths[name],
                    lambda n=name, p=psi0, r=run_dir: training.run_cell(
                        cfg, compiled[n], n, theta, task, seed, p, r, outer
                    ),
                )
                cells[task_name][seed][name] = cell
                logger.info(
                    "%s seed %d %s: acc id %.3f shift %.3f, mean K %.2f",
                    task_name, seed, name, cell["acc_id"], cell["acc_shift"],
                    cell["mean_k_shift"],
                )  # fmt: skip
                bar.update(1)
    bar.close()
    results = aggregate(cfg, cells, base_info)
    results["inner_lr"] = inner_lrs
    if multihost.is_primary():  # every process of a multi-process run holds the same results
        atomic.write_json(root / "results.json", results, indent=1)
        (root / "summary.md").write_text(summary_table(results) + "\n")
        plot_accuracy_vs_k(results, str(root / f"{cfg.figure_prefix}_accuracy_vs_k.png"))
        plot_k_vs_difficulty(results, str(root / f"{cfg.figure_prefix}_k_vs_difficulty.png"))
    return results


def demo_rows(workdir: str) -> list[tuple[str, str, str, float, float, float]]:
    """``make demo``: the fixed Mamba vs ATTD on a tiny time-warp run (issue 17's task).

    Returns one row ``(system, method, metric, before, after, seconds)``: accuracy on the test
    mixture (``eval.id_share`` in-distribution inputs, the rest time-warped) of the fixed model
    (K = 0) and of ATTD (adaptive K), whose mean K on the mixture the method names.
    """
    from configs import attd_dynamics as dynamics_config  # configs are read by experiments only

    cfg = dynamics_config.get_config("demo")
    start = time.perf_counter()
    results = run(cfg, os.path.join(workdir, "attd_dynamics"))
    seconds = time.perf_counter() - start
    table = results["tasks"]["timewarp"]
    share = round(100 * cfg.eval.id_share)
    return [
        (
            "ATTD on Mamba (time warp)",
            f"ATTD, mean K {table['attd']['mean_k_mix']['mean']:.2f} of {cfg.attd.k_max}",
            f"accuracy, {share}% in-dist. + {100 - share}% warped, K=0 -> adaptive K",
            table["fixed"]["acc_mix"]["mean"],
            table["attd"]["acc_mix"]["mean"],
            seconds,
        )
    ]
