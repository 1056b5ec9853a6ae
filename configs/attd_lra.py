"""ATTD vs fixed Mamba, full TTT and ponder-or-not on ListOps, Pathfinder and Text (LRA).

Command (3 tasks x 3 seeds x 4 methods, ~20 min on the shared 2-core CPU):
    python -m experiments.run --config configs/attd_lra.py --workdir runs/attd_lra
LRA's full sizes (ListOps 2K tokens, Pathfinder 32x32, Text 1K/4K bytes; for a GPU):
    python -m experiments.run --config configs/attd_lra.py:lra_full --workdir runs/attd_lra_full
Second- vs first-order meta-training on Text and ListOps (short inputs; 3 seeds, ~35 min on the
shared 2-core CPU):
    python -m experiments.run --config configs/attd_lra.py:second_order --workdir runs/attd_lra_so
Joint training: the outer loss also keeps the self-supervised loss (``+j`` methods), first and
second order, Text and ListOps at second_order's sizes (3 seeds):
    python -m experiments.run --config configs/attd_lra.py:joint --workdir runs/attd_lra_joint
The same with L_int = masked-token reconstruction instead of next-token prediction:
    python -m experiments.run --config configs/attd_lra.py:joint_masked \
        --workdir runs/attd_lra_joint_masked
Issue 17's protocol on ListOps and Text (θ frozen, SGD inner rule at a rate chosen on the
training split, thresholds recalibrated after outer training; 3 seeds):
    python -m experiments.run --config configs/attd_lra.py:protocol --workdir runs/attd_lra_protocol
Tiny smoke run (seconds; what the tests run):
    python -m experiments.run --config configs/attd_lra.py:tiny --workdir runs/attd_lra_tiny

Per task and seed a base Mamba is pretrained once (task loss + next-token loss, so that the
ponder signal L_int means something) and cached; each method (fixed K=0, full TTT K=K_max,
ponder-or-not gate, ATTD thresholds, and ATTD with λ = 0 as an ablation) then trains its
outer parameters (θ, ψ₀, thresholds) briefly from it and is scored on an in-distribution and
a shifted test split.

A method name is a controller with optional variants (``attd+so``: second order through the
inner loop; ``ttt+sgd``: SGD inner rule at ``attd.sgd_lr``; ``ttt+r8``: ψ of rank 8).

Expected result: see the attd_lra (and attd_lra_second_order) sections of BENCHMARKS.md (the
runs write them).
"""

import ml_collections

from configs import distributed_section

TASKS = ("listops", "pathfinder", "text")


def _listops(num, seed_offset, min_depth, max_depth, max_length, seq_len):
    return ml_collections.ConfigDict(
        {
            "num": num,
            "seed_offset": seed_offset,
            "min_depth": min_depth,
            "max_depth": max_depth,
            "min_length": 10,
            "max_length": max_length,
            "seq_len": seq_len,
        }
    )


def _pathfinder(num, seed_offset, size, path_length, num_distractors):
    return ml_collections.ConfigDict(
        {
            "num": num,
            "seed_offset": seed_offset,
            "size": size,
            "path_length": path_length,
            "num_distractors": num_distractors,
            "distractor_length": 4,
        }
    )


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "attd_lra"
    c.seeds = (0, 1, 2)
    c.tasks = TASKS
    # The four methods of the comparison, plus ATTD without the step cost (λ = 0) as an ablation.
    c.methods = ("fixed", "ttt", "gate", "attd", "attd_nocost")
    c.ablation_methods = ()  # extra methods run on ablation_seeds only
    c.ablation_seeds = (0,)
    c.section = "attd_lra"  # BENCHMARKS.md section
    c.figure_prefix = "attd"  # docs/figures/<prefix>_*.png
    c.command = "python -m experiments.run --config configs/attd_lra.py --workdir runs/attd_lra"
    # >0: shard the pretraining's and the outer training's batches over this many devices (all
    # processes'); README.md, "Multi-host"
    c.mesh_devices = 0
    c.distributed = distributed_section()

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.d_state = 8
    c.model.expand = 2
    c.model.scan_chunk_size = 32
    c.model.lean_backward = True  # chunk-recomputing scan backward (False: smaller programs)
    # The selective scan's backend (kernels_pallas.selective_scan): "reference" (lax.scan),
    # "associative", "pallas" (the kernel) or "auto" (the kernel only where it is proven and
    # passes its self-test, else "reference").
    c.model.scan_backend = "reference"
    c.model.psi_rank = 2  # r of ψ = (U, V)
    c.model.psi_scale = 0.1  # std of V in ψ₀ (U₀ = 0: ψ₀ is the base model exactly)

    # Each task: a train split, an in-distribution test split (same recipe, other seed or
    # held-out files) and a shifted test split.
    c.data = ml_collections.ConfigDict()
    c.data.listops = ml_collections.ConfigDict()
    c.data.listops.train = _listops(1024, 0, 1, 3, 128, 128)
    c.data.listops.test_id = _listops(96, 1000, 1, 3, 128, 128)
    c.data.listops.test_shift = _listops(96, 2000, 4, 5, 256, 256)  # deeper and longer
    c.data.pathfinder = ml_collections.ConfigDict()
    c.data.pathfinder.train = _pathfinder(1024, 0, (16, 16), (8, 10), (0, 1))
    c.data.pathfinder.test_id = _pathfinder(96, 1000, (16, 16), (8, 10), (0, 1))
    c.data.pathfinder.test_shift = _pathfinder(96, 2000, (16, 16), (11, 13), (1, 2))
    c.data.text = ml_collections.ConfigDict()
    c.data.text.corpus = "doc_vs_code"
    c.data.text.seq_len = 128  # train and in-distribution test (held-out files)
    c.data.text.test_length = 256  # shifted test: held-out files, longer passages
    c.data.text.max_per_class = 512
    c.data.text.num_test = 96  # examples kept per test split
    # Dynamics-shift tasks (attd.shifts; configs/attd_dynamics.py runs them): train and
    # in-distribution test at factor 1, outer training on shift_bands' milder neighbours
    # outer_bands (with factor 1), shifted test on shift_bands (held out from outer training).
    for kind in ("timewarp", "oscillator"):
        c.data[kind] = ml_collections.ConfigDict()
        c.data[kind].num_train = 2048
        c.data[kind].num_test = 480
        c.data[kind].num_outer = 1024
        c.data[kind].outer_bands = ((1.0, 1.0), (1 / 2, 1 / 1.4), (1.4, 2.0))
        c.data[kind].shift_bands = ((1 / 3, 1 / 2.5), (1 / 2.5, 1 / 2), (2.0, 2.5), (2.5, 3.0))
        c.data[kind].seq_len = 128
        c.data[kind].num_classes = 4
    c.data.timewarp.period = 24.0
    # Real recordings under a sampling-rate shift (UCR GunPoint; needs `pip install metattt[ucr]`
    # or data_dir = a folder with GunPoint/GunPoint_{TRAIN,TEST}.ts).
    c.data.recorded = ml_collections.ConfigDict()
    c.data.recorded.dataset = "GunPoint"
    c.data.recorded.data_dir = ""  # empty: the copy the aeon package ships
    c.data.recorded.held_out = 0.4  # share of the recordings kept for the test splits
    c.data.recorded.num_train = 2048
    c.data.recorded.num_test = 480
    c.data.recorded.num_outer = 1024
    c.data.recorded.outer_bands = c.data.timewarp.outer_bands
    c.data.recorded.shift_bands = c.data.timewarp.shift_bands
    c.data.recorded.seq_len = 64

    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.steps = 120
    c.pretrain.batch = 32
    c.pretrain.lr = 3e-3
    c.pretrain.lm_weight = 1.0  # weight of the next-token loss beside the task loss
    c.pretrain.checkpoint_every = 1000  # steps between checkpoints (a killed run resumes)

    c.attd = ml_collections.ConfigDict()
    c.attd.k_max = 4
    c.attd.objective = "next_token"
    c.attd.inner_opt = "adam"  # "adam" | "sgd" on ψ
    c.attd.inner_lr = 0.5
    c.attd.inner_lr_grid = ()  # if given: each adapter family's rate, chosen on the outer split
    c.attd.adam_eps_root = 0.0  # > 0 keeps Adam's sqrt differentiable at 0 (second order)
    c.attd.sgd_lr = 50.0  # lr of the SGD inner rule of ``+sgd`` methods
    c.attd.clip_norm = 0.0  # 0: no clipping
    c.attd.lam = 0.01  # λ of E[Cost(K)]
    c.attd.cost = "linear"
    c.attd.beta = 0.0  # β of E[Σ ‖Δψ_k‖²]
    c.attd.joint_weight = 1.0  # μ of E[L_int(ψ₀)] in the outer loss of ``+j`` methods
    c.attd.temperature = 0.05  # τ of the relaxed controller, in units of s
    c.attd.first_order = True
    c.attd.remat = False  # checkpoint each inner step (memory of second order)
    c.attd.recalibrate = False  # thresholds set again at their quantiles after outer training

    c.finetune = ml_collections.ConfigDict()
    c.finetune.steps = 24
    c.finetune.checkpoint_every = 500
    c.finetune.batch = 32
    c.finetune.lr_theta = 1e-3
    c.finetune.freeze_theta = False  # True: only ψ₀ and the thresholds train
    c.finetune.lr_psi = 1e-2
    c.finetune.lr_thresholds = 2e-2

    c.eval = ml_collections.ConfigDict()
    c.eval.batch = 48
    c.eval.timing_repeats = 3
    c.eval.bootstrap = 1000
    c.eval.id_share = 0.7  # the test mixture's share of in-distribution inputs (shift tasks)

    if arg == "lra_full":  # LRA's sizes; a GPU run, hours on the CPU
        c.model.d_model = 64
        c.model.n_layers = 4
        c.model.d_state = 16
        c.model.scan_chunk_size = 64
        c.model.scan_backend = "auto"  # the kernel once proven on the GPU; lax.scan until then
        c.data.listops.train = _listops(96000, 0, 1, 9, 2000, 2000)
        c.data.listops.test_id = _listops(2000, 1000, 1, 9, 2000, 2000)
        c.data.listops.test_shift = _listops(2000, 2000, 8, 9, 2000, 2000)
        c.data.pathfinder.train = _pathfinder(20000, 0, (32, 32), (14, 20), (2, 4))
        c.data.pathfinder.test_id = _pathfinder(2000, 1000, (32, 32), (14, 20), (2, 4))
        c.data.pathfinder.test_shift = _pathfinder(2000, 2000, (32, 32), (24, 30), (4, 6))
        c.data.text.seq_len = 1000
        c.data.text.test_length = 4000
        c.data.text.max_per_class = 12500
        c.data.text.num_test = 2000
        c.pretrain.steps = 20000
        c.pretrain.batch = 32
        c.pretrain.lr = 1e-3
        c.finetune.steps = 2000
        c.eval.batch = 128
    elif arg == "second_order":  # Text, first vs second order, everything else equal
        c.section = "attd_lra_second_order"
        c.figure_prefix = "attd_so"
        c.command = (
            "python -m experiments.run --config configs/attd_lra.py:second_order "
            "--workdir runs/attd_lra_so"
        )
        c.tasks = ("text", "listops")
        # fixed has no inner loop, so its first and second order are the same computation.
        c.methods = ("fixed", "ttt", "gate", "attd", "attd_nocost")
        c.methods += tuple(f"{m}+so" for m in c.methods[1:])
        c.ablation_methods = ("ttt+sgd", "ttt+so+sgd", "ttt+r8", "ttt+so+r8")
        c.ablation_seeds = (0,)
        # Second order costs ~30x first order per outer step at these sizes: short passages
        # (the issue tests second order on L <= 32), batch 8, more outer steps (150 vs 24).
        c.data.text.seq_len = 32
        c.data.text.test_length = 64
        c.data.text.max_per_class = 1024
        c.data.text.num_test = 128
        c.data.listops.train = _listops(1024, 0, 1, 2, 32, 32)
        c.data.listops.test_id = _listops(128, 1000, 1, 2, 32, 32)
        c.data.listops.test_shift = _listops(128, 2000, 3, 3, 64, 64)  # deeper, longer
        c.attd.adam_eps_root = 1e-16  # ∂√v at v = 0 (V's first gradient is exactly 0) is inf
        c.model.lean_backward = False  # L = 32: one chunk; the plain scan is the smaller program
        c.finetune.steps = 150
        c.finetune.batch = 8
        c.eval.batch = 64
        c.eval.timing_repeats = 1
    elif arg in ("joint", "joint_masked"):  # does TTT help once L_int stays in the outer loss?
        c = get_config("second_order")  # its sizes
        c.section = f"attd_lra_{arg}"
        c.figure_prefix = f"attd_{arg}"
        c.command = (
            f"python -m experiments.run --config configs/attd_lra.py:{arg} "
            f"--workdir runs/attd_lra_{arg}"
        )
        if arg == "joint_masked":  # the other L_int: masked-token reconstruction
            c.attd.objective = "masked"
        # fixed+j is the control: the same joint outer loss without any inner step.
        c.methods = ("fixed", "fixed+j", "ttt", "ttt+j", "ttt+so", "ttt+so+j", "attd+so+j")
        c.ablation_methods = ()
    elif arg == "protocol":  # issue 17's fixed protocol, on LRA
        c.section = "attd_lra_protocol"
        c.figure_prefix = "attd_proto"
        c.command = (
            "python -m experiments.run --config configs/attd_lra.py:protocol "
            "--workdir runs/attd_lra_protocol"
        )
        # Pathfinder is left out: at these sizes no method leaves chance (0.5) on it.
        c.tasks = ("listops", "text")
        c.methods = ("fixed", "ttt+k1", "ttt", "gate", "attd", "attd_nocost")
        c.finetune.freeze_theta = True  # θ as pretrained; ψ₀ and the thresholds train
        c.attd.recalibrate = True  # thresholds set again at their quantiles after training
        c.attd.inner_opt = "sgd"  # keeps the gradient's size; its rate chosen on training data
        c.attd.inner_lr = 1.0  # unused: inner_lr_grid picks the rate
        c.attd.inner_lr_grid = (0.3, 1.0, 3.0, 10.0, 30.0)
    elif arg in ("tiny", "demo"):  # seconds
        c.seeds = (0,)
        c.tasks = ("listops",)  # compiling is what costs here; load_task covers all tasks
        c.methods = ("fixed", "attd")
        c.model.d_model = 8
        c.model.d_state = 4
        c.model.expand = 1
        c.model.scan_chunk_size = 8
        c.model.lean_backward = False  # faster compiles
        c.data.listops.train = _listops(64, 0, 1, 2, 24, 24)
        c.data.listops.test_id = _listops(16, 1000, 1, 2, 24, 24)
        c.data.listops.test_shift = _listops(16, 2000, 3, 3, 24, 24)
        c.data.pathfinder.train = _pathfinder(32, 0, (12, 12), (6, 6), (0, 0))
        c.data.pathfinder.test_id = _pathfinder(16, 1000, (12, 12), (6, 6), (0, 0))
        c.data.pathfinder.test_shift = _pathfinder(16, 2000, (12, 12), (6, 7), (0, 0))
        c.data.text.seq_len = 24
        c.data.text.test_length = 48
        c.data.text.max_per_class = 32
        c.data.text.num_test = 16
        for kind in ("timewarp", "oscillator"):
            c.data[kind].num_train, c.data[kind].num_test = 64, 16
            c.data[kind].num_outer, c.data[kind].seq_len = 32, 24
        c.data.timewarp.period = 8.0
        c.data.recorded.num_train, c.data.recorded.num_test = 64, 16
        c.data.recorded.num_outer, c.data.recorded.seq_len = 32, 16
        c.attd.k_max = 2
        c.pretrain.steps = 20
        c.pretrain.batch = 8
        c.pretrain.checkpoint_every = 10
        c.finetune.steps = 4
        c.finetune.batch = 8
        c.finetune.checkpoint_every = 2
        c.eval.batch = 8
        c.eval.timing_repeats = 1
        c.eval.bootstrap = 100
        if arg == "demo":  # a little more training
            c.pretrain.steps = 60
            c.finetune.steps = 10
    elif arg is not None:
        raise ValueError(
            f"unknown variant {arg!r} of configs/attd_lra.py "
            "(known: tiny, demo, lra_full, second_order, joint, joint_masked, protocol)"
        )
    return c
