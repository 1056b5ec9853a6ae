"""The configurable TTA protocol on an action-conditioned transformer dynamics predictor.

Command (full ablation, 3 seeds, 15-22 min on the shared 2-core CPU on 2026-12-07, the first
seed compiling the 22 runners for most of it):
    python -m experiments.run --config configs/tta_protocol.py --workdir runs/tta_protocol
Tiny smoke run (seconds; what the tests run):
    python -m experiments.run --config configs/tta_protocol.py:tiny --workdir runs/tta_tiny

A predictor is trained on a source regime of a synthetic controlled system, then adapted clip
by clip on shifted regimes whose clips alternate between two sub-populations shifted in
opposite directions. The ablation matrix is adapted layers (baseline, LayerNorm,
LayerNorm+attention-projection, LayerNorm+MLP-out) x reset/cumulative x settings
(conservative: 1 step, lr 1e-4, clip 1.0; stronger: 5 steps, lr 5e-4, clip 5.0).

Expected result: see the tta_protocol section of BENCHMARKS.md, rendered from the finished run
by ``python -m experiments.run --report --workdir runs/tta_protocol``.
"""

import ml_collections

from configs import distributed_section


def _setting(steps, lr, clip_norm):
    return ml_collections.ConfigDict({"steps": steps, "lr": lr, "clip_norm": clip_norm})


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "tta_protocol"
    c.seeds = (0, 1, 2)

    c.model = ml_collections.ConfigDict()
    c.model.state_dim = 4
    c.model.action_dim = 2
    c.model.dim = 32
    c.model.num_heads = 2
    c.model.num_layers = 2
    c.model.mlp_ratio = 2
    c.model.window = 8  # W history steps
    c.model.horizon = 8  # H rollout steps

    c.data = ml_collections.ConfigDict()
    c.data.shifts = ("offset", "representational")
    c.data.magnitude = 1.0
    c.data.num_clips = 200
    c.data.num_adapt = 4  # windows of W + H steps to adapt on, per clip
    c.data.num_eval = 2  # later windows of the same clip to score

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 2000
    c.train.batch = 32
    c.train.lr = 3e-3
    c.train.steps_per_call = 100
    c.train.checkpoint_every = 1000  # a multiple of steps_per_call
    c.train.mesh_devices = 0  # >0: shard the batches over this many devices (all processes')

    # The protocol's fixed fields; the ablation below overrides the others.
    c.protocol = ml_collections.ConfigDict()
    c.protocol.mode = "rollout"  # "rollout" | "one_step"
    c.protocol.optimizer = "adam"  # "sgd" | "adam"
    c.protocol.window = 50  # clips of the rolling means

    c.ablation = ml_collections.ConfigDict()
    c.ablation.adapt_layers = ("layernorm", "layernorm+attn_proj", "layernorm+mlp_out")
    c.ablation.resets = (True, False)  # reset per clip, cumulative
    c.ablation.settings = ml_collections.ConfigDict(
        {
            "conservative": _setting(1, 1e-4, 1.0),
            "stronger": _setting(5, 5e-4, 5.0),
            "aggressive": _setting(5, 5e-3, 5.0),  # beyond the range, to see the trend
        }
    )
    # The other loss mode, for these settings with reset per clip (each preset): "" for none.
    c.ablation.other_mode = "one_step"
    c.ablation.other_mode_settings = ("stronger",)

    c.distributed = distributed_section()  # several processes: README.md, "Multi-host"

    if arg in ("tiny", "demo"):  # seconds: a smaller model, one shift, one adapted cell
        c.seeds = (0,)
        c.model.dim = 16
        c.model.num_layers = 1
        c.model.window = 4
        c.model.horizon = 4
        c.data.shifts = ("representational",)
        c.data.num_clips = 40
        c.train.num_steps = 300
        c.train.checkpoint_every = 100
        c.train.batch = 16
        c.train.lr = 1e-2
        c.ablation.adapt_layers = ("layernorm+mlp_out",)
        c.ablation.resets = (True,)
        c.ablation.settings = ml_collections.ConfigDict({"stronger": _setting(5, 5e-4, 5.0)})
        c.ablation.other_mode = ""
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r} of configs/tta_protocol.py (known: tiny, demo)")
    return c
