"""What every experiment shares: cached cells, workdir ownership, seed records.

* :mod:`~experiments.harness.cells`: a result computed once per (seed, cell) and read back on
  a rerun: JSON cells (written atomically) and parameter cells (through the same verified
  orbax checkpoints as :func:`metattt.train.fit`), each with its wall time.
* :mod:`~experiments.harness.config_checks`: the conventions every config meets (positive
  rates and counts, a finite clip, distinct seeds), checked before anything runs, and a
  config section read into a library dataclass (:func:`section_to`), and the mesh size that
  must divide the batches it shards (:func:`check_mesh_devices`).
* :mod:`~experiments.harness.workdir`: which experiment and which resolved config own a
  workdir; a rerun with another experiment or config is refused in one line.
"""

from experiments.harness.cells import cell_seconds, json_cell, params_cell
from experiments.harness.config_checks import check_config, check_mesh_devices, section_to
from experiments.harness.workdir import WorkdirMismatch, claim_workdir, config_digest

__all__ = [
    "WorkdirMismatch",
    "cell_seconds",
    "check_config",
    "check_mesh_devices",
    "claim_workdir",
    "config_digest",
    "json_cell",
    "params_cell",
    "section_to",
]
