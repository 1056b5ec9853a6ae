"""Entry point: run one experiment from an ml-collections config.

    python -m experiments.run --config configs/NAME.py[:variant] --config.key=value \
        --workdir runs/NAME

The config is locked, so a misspelt key or a wrong type fails before anything runs. The
experiment module is ``experiments.<config.experiment>`` and must define
``run(config, workdir) -> results`` and may define ``validate(config)``, which raises
``ValueError`` for bad values before anything runs, and ``summary(results, config) -> str``,
printed at the end. The resolved config, git commit, package
versions and devices are written to ``workdir/run_info.json``; a run that is started again on
the same workdir resumes from its checkpoints. A workdir belongs to one experiment and one
resolved config (``workdir/owner.json``): a run with another is refused in one line.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from experiments import harness

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


def main(module) -> None:
    """Run ``module.run(config, workdir)`` after recording the run's provenance."""
    config = _CONFIG.value
    # force: importing orbax installs a root handler, which would make basicConfig a no-op.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax is chatty at INFO
    init_distributed(config)
    from metattt import runlog

    workdir = os.path.abspath(_WORKDIR.value)
    runlog.write_run_info(workdir, config.to_dict())
    results = module.run(config, workdir)
    if hasattr(module, "summary"):
        print(module.summary(results, config))


def _one_line(error: BaseException) -> str:
    """The last meaningful line of an error message (config_flags nests whole tracebacks)."""
    text = str(error.args[0]) if len(error.args) == 1 else str(error)
    if isinstance(error, AttributeError):  # ConfigDict's message is a repr with escapes
        text = text.replace("\\n", " ").replace("\\'", "'")
        text = "unknown config key " + (text[1:-1] if text[:1] == text[-1:] == "'" else text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback" in text:
        return lines[-1]
    return " ".join(lines)


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":")[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
    return None


def cli(argv: list[str] | None = None) -> None:
    """Parse flags (a bad key, type, value or file is one line on stderr, exit 2), then run."""
    argv = list(sys.argv if argv is None else argv)
    path = _config_path(argv)
    try:
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        flags.FLAGS(argv)
        config = _CONFIG.value
        module = importlib.import_module(f"experiments.{config.experiment}")
        if hasattr(module, "validate"):
            module.validate(config)
        if not _WORKDIR.value.strip():
            raise ValueError("--workdir is empty: name a directory for the run's results")
        harness.claim_workdir(_WORKDIR.value, config.experiment, config.to_dict())
    except ModuleNotFoundError as error:
        print(
            f"error: config.experiment names no module in experiments/ ({error})", file=sys.stderr
        )
        sys.exit(2)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
    from metattt import train

    try:
        main(module)
    except (train.Interrupted, train.WorkdirInUse) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(130 if isinstance(error, train.Interrupted) else 2)


if __name__ == "__main__":
    cli()
