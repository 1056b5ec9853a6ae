"""Entry point: run one experiment from an ml-collections config.

    python -m experiments.run --config configs/NAME.py[:variant] --config.key=value \
        --workdir runs/NAME

The config is locked, so a misspelt key or a wrong type fails before anything runs. The
experiment module is ``experiments.<config.experiment>`` and must define
``run(config, workdir) -> results``. The resolved config, git commit, package versions and
devices are written to ``workdir/run_info.json``; a run that is started again on the same
workdir resumes from its checkpoints.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed(config) -> None:
    """Start multi-host JAX when the config asks for it (before any other JAX call)."""
    dist = config.get("distributed")
    if dist is None or not dist.enabled:
        return
    import jax

    jax.distributed.initialize(
        coordinator_address=dist.coordinator_address or None,
        num_processes=dist.num_processes,
        process_id=dist.process_id,
    )


def main(argv):
    del argv
    config = _CONFIG.value
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax is chatty at INFO
    init_distributed(config)
    from metattt import runlog

    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    runlog.write_run_info(workdir, config.to_dict())
    try:
        module = importlib.import_module(f"experiments.{config.experiment}")
    except ModuleNotFoundError:
        sys.exit(f"error: config.experiment={config.experiment!r} names no module in experiments/")
    results = module.run(config, workdir)
    if hasattr(module, "table"):
        print(module.table(results, config.eval.report_steps))


if __name__ == "__main__":
    app.run(main)
