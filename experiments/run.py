"""Entry point: run one experiment from an ml-collections config, or report a finished run.

    python -m experiments.run --config configs/NAME.py[:variant] --config.key=value \
        --workdir runs/NAME
    python -m experiments.run --report --workdir runs/NAME

A run writes only into its workdir. ``--report`` is the separate, explicit step that renders a
finished workdir (its ``run_info.json`` config and ``results.json``) into the experiment's
BENCHMARKS.md section, ``docs/figures/`` and ``docs/results/NAME.json``, through the module's
``write_report(results, config, workdir)``; it trains nothing.

The config is locked, so a misspelt key or a wrong type fails before anything runs. The
experiment module is ``experiments.<config.experiment>`` and must define
``run(config, workdir) -> results`` and may define ``validate(config)``, which raises
``ValueError`` for bad values before anything runs, and ``summary(results, config) -> str``,
printed at the end. The resolved config, git commit, package
versions and devices are written to ``workdir/run_info.json``, and at the end the backends the
kernels' ``"auto"`` resolved to (and why); a run that is started again on
the same workdir resumes from its checkpoints. A workdir belongs to one experiment and one
resolved config (``workdir/owner.json``): a run with another is refused in one line.

Multi-process runs (several hosts, or several processes on one): start the same command once per
process with ``--config.distributed.enabled=True`` and, unless JAX finds them in its environment
(``JAX_COORDINATOR_ADDRESS``, SLURM, Open MPI), ``--config.distributed.coordinator_address=
HOST:PORT``, ``--config.distributed.num_processes=N`` and ``--config.distributed.process_id=I``;
the workdir must be one shared folder. Process 0 claims the workdir and writes every file but
the checkpoints, which all processes write together; ``--config.distributed.initialization_
timeout=SECONDS`` bounds the wait for every process to join; see README.md, "Multi-host". The
``distributed`` section says where a run executes, not what it computes, so it is not part of
the workdir's config digest: a run restarted with another coordinator or process count resumes.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from experiments import harness, report

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_REPORT = flags.DEFINE_bool(
    "report", False, "Render BENCHMARKS.md and docs/ from the finished --workdir (no training)."
)
flags.mark_flags_as_required(["workdir"])


def init_distributed(config) -> None:
    """Start multi-process JAX when the config's ``distributed.enabled`` asks for it.

    Called before any other JAX call. ``coordinator_address`` "" and ``num_processes`` /
    ``process_id`` None are left to JAX: its environment variables (``JAX_COORDINATOR_ADDRESS``)
    or a cluster it detects (SLURM, Open MPI) fill them in. ``initialization_timeout`` (seconds,
    checked by :func:`experiments.harness.check_config`) bounds the wait for every process to
    join. On CPUs the processes exchange data over gloo (JAX's default CPU collectives).
    """
    dist = config.get("distributed")
    if dist is None or not dist.enabled:
        return
    import jax

    given = {
        "coordinator_address": dist.coordinator_address or None,
        "num_processes": dist.num_processes,
        "process_id": dist.process_id,
        "initialization_timeout": dist.get("initialization_timeout"),
    }
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


#: The lock file a run holds in its workdir (:func:`metattt.train.workdir_lock`).
RUN_LOCK = "run.lock"


def claim_workdir(workdir: str, config) -> None:
    """:func:`experiments.harness.claim_workdir` by process 0; a refusal stops every process
    of the launch in one line (:func:`metattt.multihost.on_primary`)."""
    from metattt import multihost

    multihost.on_primary(
        lambda: harness.claim_workdir(workdir, config.experiment, config.to_dict()),
        (harness.WorkdirMismatch, OSError),
    )


def main(module) -> None:
    """Run ``module.run(config, workdir)`` after recording the run's provenance, holding the
    workdir's :data:`RUN_LOCK` throughout."""
    config = _CONFIG.value
    # force: importing orbax installs a root handler, which would make basicConfig a no-op.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax is chatty at INFO
    from metattt import train

    workdir = os.path.abspath(_WORKDIR.value)
    with train.workdir_lock(workdir, RUN_LOCK):  # a second launch is refused before any write
        results = run_recorded(module, config, workdir)
    if hasattr(module, "summary"):
        print(module.summary(results, config))


def run_recorded(module, config, workdir: str):
    """``module.run(config, workdir)`` between two writes of ``workdir/run_info.json``: the
    provenance first, and at the end (also of a failed run) the kernel backends the run's
    ``"auto"`` choices resolved to (:func:`metattt.runlog.record_kernel_backends`)."""
    from metattt import multihost, runlog

    if not multihost.is_primary():  # the other processes of a multi-process run write nothing
        return module.run(config, workdir)
    runlog.write_run_info(workdir, config.to_dict())
    try:
        return module.run(config, workdir)
    finally:
        runlog.record_kernel_backends(workdir)


def report_workdir(workdir: str) -> str:
    """Renders a finished workdir through its experiment's ``write_report``; returns its name.

    Raises:
      FileNotFoundError: the workdir lacks ``run_info.json`` or ``results.json`` (one line).
      ValueError: the experiment has no report.
    """
    import json

    import ml_collections

    paths = {name: os.path.join(workdir, name) for name in ("run_info.json", "results.json")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--report needs a finished run: {path} is missing (run the experiment first)"
            )
    with open(paths["run_info.json"]) as f:
        run_info = json.load(f)
    config = ml_collections.ConfigDict(run_info["config"])
    with open(paths["results.json"]) as f:
        results = json.load(f)
    module = importlib.import_module(f"experiments.{config.experiment}")
    if not hasattr(module, "write_report"):
        raise ValueError(f"experiment {config.experiment!r} has no report")
    with report.rendering(*report.run_provenance(run_info)):
        module.write_report(results, config, workdir)
    return config.experiment


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


def _check_config_source(path: str) -> None:
    """One line for a config file that does not compile (config_flags would print pages)."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        compile(source, path, "exec")
    except SyntaxError as error:
        raise ValueError(
            f"config file {path}: syntax error at line {error.lineno}: {error.msg}"
        ) from None


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":")[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
    return None


@contextlib.contextmanager
def _argv(argv: list[str]):
    saved, sys.argv = sys.argv, argv
    try:
        yield
    finally:
        sys.argv = saved


def cli(argv: list[str] | None = None) -> None:
    """Parse flags (a bad key, type, value or file is one line on stderr, exit 2), then run."""
    argv = list(sys.argv if argv is None else argv)
    path = _config_path(argv)
    try:
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        if path is not None:
            _check_config_source(path)
        flags.FLAGS.unparse_flags()  # a second call in one process starts from the defaults
        with _argv(argv):  # config_flags finds the --config.* overrides in sys.argv
            flags.FLAGS(argv)
        if _REPORT.value:
            name = report_workdir(os.path.abspath(_WORKDIR.value))
            print(f"rendered the {name} report from {_WORKDIR.value}")
            return
        config = _CONFIG.value
        if config is None:
            raise ValueError("--config is required (or --report to render a finished workdir)")
        if not isinstance(config, ml_collections.ConfigDict):
            raise TypeError(
                f"config file {path}: get_config() must return an ml_collections.ConfigDict, "
                f"got {type(config).__name__}"
            )
        harness.check_config(config)
        module = importlib.import_module(f"experiments.{config.experiment}")
        if hasattr(module, "validate"):
            module.validate(config)
        if not _WORKDIR.value.strip():
            raise ValueError("--workdir is empty: name a directory for the run's results")
        init_distributed(config)
        claim_workdir(_WORKDIR.value, config)
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
    except OSError as error:  # disk full, permissions: the path and the cause, not pages
        where = f" ({error.filename})" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
