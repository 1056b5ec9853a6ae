"""Meta-learned fast adaptation of a Perceiver population forecaster to held-out sessions.

Command (full CPU experiment, 3 seeds; 26 min on the 2-core CPU while other experiments
shared it (load 4-5); compilation is about a third of it):
    python -m experiments.run --config configs/forecasting.py --workdir runs/forecasting
Tiny smoke run (seconds; what the tests run):
    python -m experiments.run --config configs/forecasting.py:tiny --workdir runs/forecasting_tiny
Larger sizes for a GPU machine:
    python -m experiments.run --config configs/forecasting.py:gpu --workdir runs/forecasting_gpu

Multi-session chaotic-RNN recordings (metattt.data.sessions); a Perceiver-IO forecaster is
pretrained on the training sessions (all parameters, Adam), then meta-trained from that
initialisation with FOMAML and with end-to-end TTT (second order, query + mean inner loss).
On held-out sessions the new session is registered (fresh unit and session embeddings) and
adapted: AdamW fine-tuning from the pretrained model vs the inner rule from the meta-learned
inits, with adaptation curves (MSE, R², POCO score), steps to 95% of the final R² gain and
wall-clock time; then which parameters adapt, online vs offline adaptation under drift, and
the compiled memory of second-order meta-training with and without remat.

Expected result: see the forecasting section of BENCHMARKS.md (the run writes it).
"""

import ml_collections

from configs import distributed_section

# Which parameters adapt: names the experiment resolves against the model's parameter paths.
ADAPT_SETS = ("embeddings", "embeddings+latents", "embeddings+last_layer")


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "forecasting"
    c.seeds = (0, 1, 2)
    c.fast_compile = True  # XLA's cheap backend optimisation level: compile time dominates here
    # >0: shard the pretraining's windows and each meta-step's tasks over this many devices (all
    # processes'); README.md, "Multi-host"
    c.mesh_devices = 0
    c.distributed = distributed_section()

    c.data = ml_collections.ConfigDict()
    c.data.num_train_sessions = 8
    c.data.num_test_sessions = 3
    c.data.num_steps = 480  # T recorded samples per session
    c.data.min_neurons = 16
    c.data.max_neurons = 24
    c.data.num_regions = 3
    c.data.units_per_region = 32
    c.data.stride = 4  # between window starts (support/query windows)
    c.data.support_fraction = 0.5  # support: windows before the cut; query: after it

    c.model = ml_collections.ConfigDict()
    c.model.context = 16  # C
    c.model.horizon = 4  # P
    c.model.dim = 32
    c.model.num_latents = 8
    c.model.num_heads = 2
    c.model.num_layers = 1
    c.model.mlp_ratio = 2
    c.model.query_context = True  # POCO-style: each neuron's query sees its own context
    c.model.max_units = 512
    c.model.max_sessions = 32

    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.steps = 600
    c.pretrain.batch = 16  # windows per step, drawn over all training sessions
    c.pretrain.lr = 3e-3

    c.meta = ml_collections.ConfigDict()
    c.meta.methods = ("fomaml", "e2e_ttt")
    c.meta.steps = 150
    c.meta.checkpoint_every = 50
    c.meta.tasks_per_step = 4  # sessions per meta-step
    c.meta.micro_batches = 2  # gradient accumulation over task micro-batches
    c.meta.support_windows = 12
    c.meta.query_windows = 12
    c.meta.inner_steps = 5  # K, trained and used at test time
    c.meta.inner_lr = 3e-2  # Adam, the inner rule (and the fine-tuning learning rate)
    c.meta.outer_lr = 1e-3
    c.meta.clip_norm = 1.0  # global-norm clipping of the meta-gradient
    c.meta.remat = True  # jax.checkpoint every inner step (e2e_ttt)
    c.meta.dtype = ""  # "" fp32; "bfloat16" compute with fp32 parameters (emulated on CPU)

    c.adapt = "embeddings"  # one of ADAPT_SETS: what adapts in experiments 1-3 and 5
    c.ablation_adapt = ("embeddings+latents", "embeddings+last_layer")  # experiment 4
    c.ablation_methods = ("finetune", "fomaml")  # methods run on each ablation set

    c.test = ml_collections.ConfigDict()
    c.test.steps = 200  # adaptation curve length for every method
    c.test.weight_decay = 1e-4  # AdamW of the fine-tuning baseline (lr = meta.inner_lr)

    c.online = ml_collections.ConfigDict()
    c.online.method = "fomaml"  # the initialisation adapted offline / online
    c.online.drifts = (0.0, 0.1, 0.2, 0.3)  # empty: no online comparison (cell, table, plot)
    c.online.lr = 3e-3  # Adam on each arrived window
    c.online.steps_per_update = 1

    c.memory = ml_collections.ConfigDict()
    c.memory.inner_steps = (1, 5, 10)  # empty: no memory table
    c.memory.dtypes = ("", "bfloat16")

    if arg == "tiny":
        c.seeds = (0,)
        c.data.num_train_sessions = 3
        c.data.num_test_sessions = 1
        c.data.num_steps = 96
        c.data.min_neurons = 5
        c.data.max_neurons = 7
        c.data.units_per_region = 16
        c.model.context = 6
        c.model.horizon = 2
        c.model.dim = 8
        c.model.num_latents = 4
        c.model.max_units = 64
        c.model.max_sessions = 8
        c.pretrain.steps = 30
        c.pretrain.batch = 4
        c.pretrain.lr = 1e-2
        # One meta method: E2E-TTT's second-order meta-step was the tiny run's longest
        # compilation; its loss, meta-step and second-order Perceiver gradients are tested in
        # tests/metattt (test_meta, test_perceiver), and full runs compare both methods.
        c.meta.methods = ("fomaml",)
        c.meta.steps = 8
        c.meta.checkpoint_every = 4
        c.meta.tasks_per_step = 2
        c.meta.support_windows = 4
        c.meta.query_windows = 4
        c.meta.inner_steps = 2
        c.ablation_adapt = ()
        c.test.steps = 8
        c.online.drifts = (0.0, 0.3)
        # No memory table: its two second-order compilations were a third of the tiny run's
        # time; tests check memory_rows on a cheap meta-loss and remat's saving on the Perceiver.
        c.memory.inner_steps = ()
        c.memory.dtypes = ("",)
    elif arg == "gpu":
        c.data.num_train_sessions = 32
        c.data.num_test_sessions = 8
        c.data.num_steps = 2000
        c.data.min_neurons = 32
        c.data.max_neurons = 64
        c.data.units_per_region = 64
        c.model.dim = 128
        c.model.num_latents = 32
        c.model.num_heads = 4
        c.model.num_layers = 2
        c.model.max_units = 4096
        c.model.max_sessions = 64
        c.pretrain.steps = 5000
        c.pretrain.batch = 64
        c.meta.steps = 2000
        c.meta.tasks_per_step = 8
        c.meta.support_windows = 32
        c.meta.query_windows = 32
        c.meta.dtype = "bfloat16"
        c.fast_compile = False
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r} of configs/forecasting.py (known: tiny, gpu)")
    return c
