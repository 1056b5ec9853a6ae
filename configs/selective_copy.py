"""Selective copying (Mamba paper, Gu & Dao 2023, section 4.1.1) at small scale: S6 vs an LTI SSM.

Command (~15 min on the 2-core CPU: both models, 3 seeds):
    python -m experiments.run --config configs/selective_copy.py --workdir runs/selective_copy
Tiny smoke run (seconds; what the tests run):
    python -m experiments.run --config configs/selective_copy.py:tiny --workdir runs/sc_tiny

Expected result: the selective model copies the 8 tokens far better than the time-invariant
one of the same size (the issue asks for >= 90% vs at least 30 points lower).
"""

import ml_collections

from configs import distributed_section


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "selective_copy"
    c.seeds = (0, 1, 2)
    c.variants = ("selective", "time_invariant")

    c.task = ml_collections.ConfigDict()
    c.task.length = 128  # total sequence length, the 8 answer slots included
    c.task.num_tokens = 8  # tokens to copy
    c.task.vocab = 16  # data tokens 1..vocab-1; 0 is noise; vocab is the answer marker

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 32
    c.model.n_layers = 2
    c.model.d_state = 16
    # The selective scan's backend: "reference" (lax.scan), "associative", "pallas" or "auto"
    # (the kernel only where it is proven and passes its self-test).
    c.model.scan_backend = "reference"

    c.train = ml_collections.ConfigDict()
    c.train.steps = 4000
    c.train.batch = 32
    c.train.lr = 3e-3
    c.train.steps_per_call = 50
    c.train.log_every = 200
    c.train.checkpoint_every = 1000
    c.train.mesh_devices = 0  # >0: shard the batches over this many devices (all processes')

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 1024

    c.distributed = distributed_section()  # several processes: README.md, "Multi-host"

    if arg == "tiny":
        c.seeds = (0,)
        c.task.length = 24
        c.task.num_tokens = 4
        c.model.d_model = 16
        c.model.d_state = 4
        c.train.steps = 100
        c.train.batch = 16
        c.train.steps_per_call = 50
        c.train.log_every = 50
        c.train.checkpoint_every = 50  # a checkpoint mid-run: the resume test kills after it
        c.eval.num_examples = 128
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r} of configs/selective_copy.py (known: tiny)")
    return c
