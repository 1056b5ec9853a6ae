"""MAML sinusoid regression (Finn et al., 2017, section 5.1): MAML, FOMAML, Meta-SGD, pretrained.

Command (full reproduction, ~10 min on the 2-core CPU):
    python -m experiments.run --config configs/sinusoid.py --workdir runs/sinusoid
Tiny smoke run (seconds; what the tests run):
    python -m experiments.run --config configs/sinusoid.py:tiny --workdir runs/sinusoid_tiny

Expected result: after one inner step MAML's query MSE is ~3x or more below the pretrained
baseline's (the paper reads ~0.5 vs ~2.4 at K=10), see BENCHMARKS.md.
"""

import ml_collections

from configs import distributed_section


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "sinusoid"
    c.seeds = (0, 1, 2)
    c.methods = ("maml", "fomaml", "meta_sgd", "pretrained")

    c.model = ml_collections.ConfigDict()
    c.model.hidden = (40, 40)

    c.task = ml_collections.ConfigDict()
    c.task.num_support = 10  # K-shot
    c.task.num_query = 10

    c.inner = ml_collections.ConfigDict()
    c.inner.lr = 0.01
    c.inner.train_steps = 1  # inner steps during meta-training
    c.inner.meta_sgd_init_lr = 0.01

    c.train = ml_collections.ConfigDict()
    c.train.meta_batch = 25
    c.train.meta_lr = 1e-3
    c.train.num_steps = 70_000
    c.train.clip_norm = 0.0  # 0: no meta-gradient clipping
    c.train.steps_per_call = 100  # meta-steps per compiled call (a lax.scan)
    c.train.log_every = 1000
    c.train.checkpoint_every = 10_000
    c.train.mesh_devices = 0  # >0: shard the meta-batch over this many devices

    c.eval = ml_collections.ConfigDict()
    c.eval.num_tasks = 600
    c.eval.num_query = 100
    c.eval.max_steps = 10
    c.eval.report_steps = (0, 1, 10)
    # The pretrained baseline is also fine-tuned at the best of these rates (chosen on
    # validation tasks), so that it is not judged at one rate only; () turns this off.
    c.eval.tune_pretrained_lrs = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)

    c.distributed = distributed_section()  # several processes: README.md, "Multi-host"

    if arg == "tiny":
        c.seeds = (0,)
        c.methods = ("maml", "pretrained")
        c.train.num_steps = 300
        c.train.meta_batch = 10
        c.train.meta_lr = 1e-2
        c.train.steps_per_call = 50
        c.train.log_every = 100
        c.train.checkpoint_every = 150
        c.eval.num_tasks = 100
        c.eval.num_query = 50
        c.eval.tune_pretrained_lrs = ()
    elif arg == "demo":  # what `make demo` runs: every method, briefly
        c.seeds = (0,)
        c.train.num_steps = 3000
        c.train.checkpoint_every = 3000
        c.eval.num_tasks = 200
        c.eval.tune_pretrained_lrs = ()
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r} of configs/sinusoid.py (known: tiny, demo)")
    return c
