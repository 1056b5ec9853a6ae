"""Config files, one per experiment (``get_config(arg)``), and the sections they share."""

import ml_collections
from ml_collections import config_dict


def distributed_section() -> ml_collections.ConfigDict:
    """The ``distributed`` section of an experiment that can run on several processes (hosts):
    see README.md, "Multi-host". ``""`` and None are left to JAX, which reads them from
    JAX_COORDINATOR_ADDRESS or a cluster it detects (SLURM, Open MPI);
    ``experiments.harness.check_config`` validates the section before JAX starts."""
    c = ml_collections.ConfigDict()
    c.enabled = False
    c.coordinator_address = ""  # HOST:PORT of process 0
    c.num_processes = config_dict.placeholder(int)
    c.process_id = config_dict.placeholder(int)
    # Seconds a process waits for all the others to join; past it, it fails instead of waiting
    # JAX's default 300 s for a process that died during start-up.
    c.initialization_timeout = 120
    return c
