"""Config checks of the ATTD-on-LRA experiment: every value that would fail later, up front."""

from __future__ import annotations

from attd.mamba import MambaConfig
from attd.method import OBJECTIVES
from experiments import harness
from experiments.attd_lra.methods import INNER_RULES, METHODS, SHIFT_TASKS, TASKS, parse_method
from kernels_pallas.selective_scan import BACKENDS as SCAN_BACKENDS
from metattt.data import ucr


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    if not cfg.seeds:
        raise ValueError("config.seeds is empty")
    if cfg.model.scan_backend not in SCAN_BACKENDS:
        raise ValueError(
            f"model.scan_backend must be one of {SCAN_BACKENDS}, got {cfg.model.scan_backend!r}"
        )
    if not cfg.tasks or any(t not in TASKS for t in cfg.tasks):
        raise ValueError(f"config.tasks must be a non-empty subset of {TASKS}, got {cfg.tasks}")
    if not cfg.methods:
        raise ValueError(f"config.methods must name methods built on {METHODS}, got none")
    names = tuple(cfg.methods) + tuple(cfg.ablation_methods)
    if len(set(names)) != len(names):
        raise ValueError(f"config.methods and config.ablation_methods repeat a name: {names}")
    for name in names:
        try:
            parse_method(name)
        except ValueError as e:
            raise ValueError(f"config.methods must be built on {METHODS}: {e}") from None
    if cfg.ablation_methods and not set(cfg.ablation_seeds) <= set(cfg.seeds):
        raise ValueError(
            f"config.ablation_seeds {tuple(cfg.ablation_seeds)} must be among config.seeds"
        )
    if not (isinstance(cfg.section, str) and cfg.section.replace("_", "").isalnum()):
        raise ValueError(f"config.section must be a name like 'attd_lra', got {cfg.section!r}")
    if not (isinstance(cfg.figure_prefix, str) and cfg.figure_prefix.replace("_", "").isalnum()):
        raise ValueError(
            f"config.figure_prefix must be a name like 'attd', got {cfg.figure_prefix!r}"
        )
    a = cfg.attd
    if not isinstance(a.k_max, int) or not 1 <= a.k_max <= 16:
        raise ValueError(f"attd.k_max must be an int in [1, 16], got {a.k_max!r}")
    if a.objective not in OBJECTIVES:
        raise ValueError(f"attd.objective must be one of {OBJECTIVES}, got {a.objective!r}")
    if a.inner_opt not in INNER_RULES:
        raise ValueError(f"attd.inner_opt must be 'adam' or 'sgd', got {a.inner_opt!r}")
    for name in ("inner_lr", "sgd_lr", "temperature"):
        if not a[name] > 0:
            raise ValueError(f"attd.{name} must be positive, got {a[name]}")
    names = ("steps", "batch", "checkpoint_every")
    for name in (f"{section}.{key}" for section in ("pretrain", "finetune") for key in names):
        section, key = name.split(".")
        if not cfg[section][key] >= 1:
            raise ValueError(f"{name} must be >= 1, got {cfg[section][key]}")
    sizes = {f"{s}.batch": cfg[s].batch for s in ("pretrain", "finetune")}
    harness.check_mesh_devices("mesh_devices", cfg.mesh_devices, sizes, "examples")
    if not a.adam_eps_root >= 0:
        raise ValueError(f"attd.adam_eps_root must be >= 0, got {a.adam_eps_root}")
    if not a.joint_weight >= 0:
        raise ValueError(f"attd.joint_weight must be >= 0, got {a.joint_weight}")
    for name in tuple(cfg.methods) + tuple(cfg.ablation_methods):
        spec = parse_method(name)
        second = spec.second_order or not a.first_order
        if second and (spec.inner_opt or a.inner_opt) == "adam" and a.adam_eps_root == 0:
            raise ValueError(
                f"method {name!r} is second order through Adam: set attd.adam_eps_root > 0 "
                "(∂√v is infinite at v = 0, and V's first inner gradient is exactly 0 when U₀ = 0)"
            )
    if cfg.eval.batch < 1 or cfg.eval.timing_repeats < 0 or cfg.eval.bootstrap < 10:
        raise ValueError(
            "eval.batch must be >= 1, eval.timing_repeats >= 0 (0: no timing), eval.bootstrap >= 10"
        )
    model_config(cfg, 16, 2)  # model sizes
    if any(not lr > 0 for lr in a.inner_lr_grid):
        raise ValueError(f"attd.inner_lr_grid must hold positive rates, got {a.inner_lr_grid}")
    for task in set(cfg.tasks) & set(SHIFT_TASKS):
        for key in ("shift_bands", "outer_bands"):
            bands = cfg.data[task][key]
            if not bands or any(len(b) != 2 or not 0 < b[0] <= b[1] for b in bands):
                raise ValueError(
                    f"data.{task}.{key} must be (lo, hi) factor intervals, 0 < lo <= hi; "
                    f"got {bands}"
                )
    if "recorded" in cfg.tasks:  # the recordings exist (one line saying how to get them)
        ucr.find_dataset(cfg.data.recorded.dataset, cfg.data.recorded.data_dir or None)


def model_config(cfg, vocab_size: int, num_classes: int) -> MambaConfig:
    """The Mamba of one task (its vocabulary and classes) from the model section."""
    m = cfg.model
    if not isinstance(m.psi_rank, int) or m.psi_rank < 1:
        raise ValueError(f"model.psi_rank must be a positive int, got {m.psi_rank!r}")
    return harness.section_to(MambaConfig, m, vocab_size=vocab_size, num_classes=num_classes)


# ------------------------------------------------------------------------------------ data
