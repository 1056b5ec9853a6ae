"""Drift-triggered dynamic-rank LoRA on a digits-C stream, and TENT on digits-C (issue 6, A).

Command (full run, 3 seeds x 4 drift streams x 4 methods x 2 objectives, plus the TENT table
over 10 corruptions x 5 severities; about 1-2 minutes on the 2-core CPU):
    python -m experiments.run --config configs/drift_adapters.py --workdir runs/drift_adapters
Tiny smoke run (what the tests run; about 20 s):
    python -m experiments.run --config configs/drift_adapters.py:tiny --workdir runs/da_tiny

Expected result (BENCHMARKS.md, section drift_adapters): with the `im` objective the dynamic
adapter's post-drift accuracy matches the static rank-8 adapter's (within the 95% CI over
seeds) with about a third of its active parameters on average, and both beat no adaptation by
about 0.15; with TENT's plain `entropy` objective the head adapters are unstable (collapse at
high severity) and the dynamic one does not match the static one. TENT ~ norm statistics >>
source on digits-C.
"""

import ml_collections

from configs import distributed_section
from metattt.data.digits_c import CORRUPTIONS


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "drift_adapters"
    c.seeds = (0, 1, 2)
    c.methods = ("none", "static:8", "static:2", "dynamic")  # static:R = rank R from t = 0
    c.objectives = ("entropy", "im")  # TENT's entropy; entropy - H(mean prediction) (SHOT)

    c.data = ml_collections.ConfigDict()
    c.data.test_fraction = 0.25

    c.backbone = ml_collections.ConfigDict()
    c.backbone.hidden = 128
    c.backbone.norm_momentum = 0.9
    c.backbone.train_steps = 2000
    c.backbone.batch_size = 64
    c.backbone.lr = 1e-3
    c.backbone.weight_decay = 1e-4
    c.backbone.mesh_devices = 0  # >0: shard the batches over this many devices (all processes')

    c.stream = ml_collections.ConfigDict()
    c.stream.corruptions = ("gaussian_noise", "gaussian_blur", "contrast", "impulse_noise")
    c.stream.clean_steps = 400  # > detector.warmup
    c.stream.steps_per_severity = 80
    c.stream.after_steps = 200
    c.stream.batch_size = 32

    c.detector = ml_collections.ConfigDict()  # Page-Hinkley on the source model's entropy
    c.detector.warmup = 300
    c.detector.delta = 0.5
    c.detector.threshold = 11.0

    c.recovery = ml_collections.ConfigDict()
    c.recovery.k = 2.0
    c.recovery.patience = 20
    c.recovery.smoothing = 0.1

    c.adapter = ml_collections.ConfigDict()
    c.adapter.max_rank = 8
    c.adapter.init_rank = 2
    c.adapter.alpha = 8.0  # LoRA scale = alpha / max_rank
    c.adapter.lr = 3e-3
    c.adapter.grow_k = 3.0  # grow while smoothed entropy > clean mean + grow_k * clean sd
    c.adapter.grow_patience = 20
    c.adapter.loss_smoothing = 0.1

    c.tent = ml_collections.ConfigDict()
    c.tent.enabled = True
    c.tent.corruptions = CORRUPTIONS
    c.tent.severities = (1, 2, 3, 4, 5)
    c.tent.batch_size = 50
    c.tent.lr = 1e-3
    c.tent.steps_per_batch = 1

    c.plot = ml_collections.ConfigDict()
    c.plot.smooth = 20

    c.distributed = distributed_section()  # several processes: README.md, "Multi-host"

    if arg in ("tiny", "demo"):
        c.seeds = (0,)
        c.methods = ("none", "static:8", "dynamic")
        c.objectives = ("im",)
        c.backbone.train_steps = 300
        c.stream.corruptions = ("gaussian_blur",)
        c.stream.clean_steps = 320
        c.stream.steps_per_severity = 50
        c.stream.after_steps = 80
        c.tent.corruptions = ("gaussian_noise", "contrast")
        c.tent.severities = (3, 5)
    if arg not in (None, "tiny", "demo"):
        raise ValueError(
            f"unknown variant {arg!r} of configs/drift_adapters.py (known: tiny, demo)"
        )
    return c
