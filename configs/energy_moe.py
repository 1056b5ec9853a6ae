"""Energy-aware test-time training of a MoE character-level language model (issue 5).

Command (full run, 3 seeds; about 26 min on the shared 2-core CPU under load from other jobs,
training about 6 min per seed, plus about 14 min for the fast-weight tuning (12 grid points,
one compilation each, on a validation stream; measured beside the digits run), plus about 3 min
for the two window methods (measured alone on the shared CPU), plus about 13 s timing the MoE
dispatch backends (``model.backend``); a rerun on the same workdir reuses checkpoints, cells
and timings):
    python -m experiments.run --config configs/energy_moe.py --workdir runs/energy_moe
Tiny smoke run (seconds; what the tests run):
    python -m experiments.run --config configs/energy_moe.py:tiny --workdir runs/energy_moe_tiny

A top-2 MoE transformer with experts of different widths (so some experts cost more energy per
token than others) is trained on the English documentation that ships with Python
(``pydoc_data``) and then serves a stream of Python standard-library source. On that shifted
stream it runs: no TTT; TTT of the router without the energy term (λ_energy = 0);
energy-aware TTT over a sweep of λ_energy; the power-budget controller at several budgets
(λ adjusted online from the simulated monitor's readings, escalating to pruning and a smaller
top-k when a budget cannot be met); static pruning of the costliest experts; top-1 routing;
weight-only int8 experts, static and with (energy-aware) router TTT on top; and the
expert-level methods of issue 15 (``expert.methods``): rank-r LoRA on every expert
(``lora_ttt/<r>``), the norms (``norm_ttt``), the biases (``bias_ttt``), fast-weight experts
with the trainable parameters of rank-r LoRA (``fast_ttt/<r>``, issue 15 item 3; on int8
experts ``int8_fast_ttt/<r>``), each with the router and λ_energy = ``expert.lam``, and router
TTT with the masked-byte and two-augmentation consistency objectives; energy-aware router TTT,
int8 router TTT and expert-level methods adapting only on hard batches (``schedule.methods``:
the served model's prediction entropy or router margin past an in-distribution quantile, or an
adaptive period), router TTT adapting after every 16-byte window of every batch
(``window.methods``) and serving under simulated memory pressure (``memory``), with routing
explanations of every adapting method but the budgets and windows (issue 15 items 6-8).
Energy is the SIMULATED monitor's (a modelled accelerator driven by the FLOPs and bytes of the
experts actually used); the adaptation's own forward and backward passes are charged to it.

Expected result: see the energy_moe section of BENCHMARKS.md (the run writes it).
"""

import ml_collections

from configs import distributed_section


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "energy_moe"
    c.seeds = (0, 1, 2)

    c.monitor = ml_collections.ConfigDict()
    c.monitor.kind = "simulated"  # "simulated" | "auto" (NVML when a GPU is present) | "nvml"
    c.monitor.allow_simulated = True  # "auto" may fall back to the simulation
    # The serving rate r (tokens/s) is set so that the unadapted model keeps the simulated
    # device busy this share of the time; a power budget B becomes E_token <= (B - P_idle) / r.
    c.monitor.utilization = 0.5
    # Memory readings under the simulated monitor (lora_hw's memory headroom) come from a
    # simulated device of this many GiB (metattt.energy.SimulatedMemory), the other tenants
    # using memory_others_gb per reading (the last value held), so runs are reproducible on
    # any machine; under NVML they are the live device's.
    c.monitor.memory_gb = 16.0
    c.monitor.memory_others_gb = (0.0,)

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.num_layers = 2
    c.model.num_experts = 8
    c.model.d_ff = 256
    c.model.expert_widths = (16, 32, 48, 64, 96, 128, 192, 256)  # per-expert hidden widths
    c.model.top_k = 2
    # The MoE dispatch backend the measured kernel cost model picks at run start
    # (experiments/energy_moe/backend.py: every candidate timed at the run's shapes, stored in
    # the workdir's kernel_costs.json, reused on a rerun; about 13 s). On the 2-core CPU it
    # picks ragged, what "auto" resolves to there (the same programs), about 4x faster than the
    # capacity einsum at the serving batch's 1024 tokens.
    c.model.backend = "cost_model"

    c.data = ml_collections.ConfigDict()
    c.data.length = 64  # L bytes per window (the model's max_len)
    c.data.batch = 16  # B windows per stream batch
    c.data.stream_batches = 128  # batches of the shifted (code) stream per seed
    c.data.heldout_windows = 256  # in-domain (doc) windows to measure the shift's size

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch = 16
    c.train.lr = 3e-3
    c.train.steps_per_call = 100
    c.train.checkpoint_every = 500  # a multiple of steps_per_call
    c.train.load_balance = 0.01  # Switch load-balancing loss weight
    c.train.z_loss = 1e-3  # router z-loss weight
    c.train.mesh_devices = 0  # >0: shard the batches over this many devices (all processes')

    c.ttt = ml_collections.ConfigDict()
    c.ttt.params = "router"  # a metattt.params selector
    c.ttt.lr = 2e-2  # Adam
    c.ttt.steps = 2  # adaptation steps per adapted batch
    c.ttt.every = 16  # adapt on one batch in this many (prequential: after scoring it)
    c.ttt.windows = 2  # windows of that batch the adaptation uses
    c.ttt.lambdas = (0.01, 0.03, 0.1, 0.3, 1.0)  # λ_energy sweep (λ = 0 is the "ttt" method)

    c.budget = ml_collections.ConfigDict()
    # Budgets as shares of the unadapted model's dynamic power above the fixed (idle + dense)
    # power; the smallest cannot be met and shows the graceful degradation.
    c.budget.fractions = (0.9, 0.75, 0.6, 0.2)
    c.budget.lam_init = 0.1
    c.budget.lam_min = 1e-3
    c.budget.lam_max = 3.0
    c.budget.gain = 2.0
    c.budget.patience = 40  # readings (batches): > 2 adaptation rounds at λ_max before pruning

    c.baselines = ml_collections.ConfigDict()
    c.baselines.prune = (1, 2, 4)  # static pruning: mask this many of the costliest experts
    c.baselines.top_k = (1,)  # smaller top-k, same parameters

    c.expert = expert_section(
        (
            "lora_ttt/4",
            "lora_ttt/16",
            "lora_hw/16",
            "norm_ttt",
            "bias_ttt",
            "energy_ttt/0.3:masked",
            "energy_ttt/0.3:consistency",
            "lora_ttt/4:masked",
            "fast_ttt/4",  # fast-weight experts with lora_ttt/4's trainable parameters
            "int8_fast_ttt/4",  # the same on weight-only int8 experts
        ),
        lam=0.3,  # one of ttt.lambdas: compare with energy_ttt at the same λ
    )
    c.schedule = schedule_section(lam="0.3", int8_lam="1", expert=("lora_ttt/4", "fast_ttt/4"))
    c.memory = memory_section()
    # Adaptation per token window (issue 15 item 7, experiments/energy_moe/windows.py):
    # "<router TTT method>~w<W>" adapts after every W-token chunk of every batch.
    c.window = ml_collections.ConfigDict()
    c.window.methods = ("ttt~w16", "energy_ttt/0.3~w16")
    c.tune = tune_section("fast_ttt/4", stream_batches=32)
    # Weight-only int8 experts (per-output-channel symmetric scales): served static ("int8"),
    # with router TTT ("int8_ttt") and with energy-aware TTT at each λ ("int8_energy_ttt/<λ>").
    c.int8 = ml_collections.ConfigDict()
    c.int8.enabled = True
    c.int8.lambdas = (0.1, 1.0)

    c.distributed = distributed_section()  # several processes: README.md, "Multi-host"

    if arg in ("tiny", "demo"):  # seconds
        c.seeds = (0,)
        c.model.d_model = 16
        c.model.num_heads = 2
        c.model.num_layers = 1
        c.model.num_experts = 4
        c.model.d_ff = 32
        c.model.expert_widths = (4, 8, 16, 32)
        # Not "cost_model": measuring costs ~13 s of compilation (10% of `make demo`, more than
        # the tiny run's tests can spare), and at these sizes the two backends once timed 4%
        # apart under load, so the choice, and the demo's figures, could follow the noise.
        c.model.backend = "auto"
        c.data.length = 16
        c.data.batch = 4
        c.data.stream_batches = 12
        c.data.heldout_windows = 16
        c.train.num_steps = 40
        c.train.batch = 8
        c.train.lr = 1e-2
        c.train.steps_per_call = 20
        c.train.checkpoint_every = 20
        c.ttt.every = 2
        c.ttt.windows = 2
        c.ttt.lambdas = (0.3, 3.0)
        c.budget.fractions = (0.7, 0.05)
        c.budget.patience = 1
        c.baselines.prune = (1,)
        c.expert.methods = ("lora_hw/4:masked", "fast_ttt/4")  # more compilations: seconds
        c.expert.fast_chunk = 4  # 4 chunks of the 16 bytes
        c.expert.max_rank = 4
        c.int8.lambdas = (3.0,)
        # one more compilation each (the signals of the trained and the fast-weight model)
        c.schedule.methods = ("energy_ttt/3@adaptive", "fast_ttt/4@margin")
        c.schedule.max_every = 4
        c.memory.patience = 1
        c.window.methods = ()  # the suite's time: tests/experiments cover ~w<W> on stubs
        c.tune.enabled = False  # ~20 s of compilation per point: the report test has a tuning
        c.tune.fast_lrs = (0.5, 1.0)  # record of a tiny run with it on (these values)
        c.tune.fast_chunks = (4,)
        c.tune.fast_step_counts = (1,)
        c.tune.stream_batches = 4
    if arg == "demo":  # the full runs' best energy-aware point: int8 experts, λ 1 on hard batches
        c.data.batch = 8  # adapting 1 of 8 windows: the full run's share (2 of 16)
        c.data.stream_batches = 64  # long enough for the saving to repay an adaptation
        c.ttt.every = 4
        c.ttt.windows = 1
        c.ttt.lr = 5e-2
        c.ttt.lambdas = (0.3,)
        c.expert.methods = ()
        c.schedule.methods = ("int8_energy_ttt/1@margin",)
        c.memory.enabled = False
    elif arg is not None and arg != "tiny":
        raise ValueError(f"unknown variant {arg!r} of configs/energy_moe.py (known: tiny, demo)")
    return c


def expert_section(methods: tuple[str, ...], *, lam: float) -> ml_collections.ConfigDict:
    """The ``expert`` section (shared with configs/energy_moe_digits.py).

    Expert-level adaptation and other objectives (issue 15; experiments/energy_moe/expert.py):
    lora_ttt/<r> (rank-r LoRA on every expert matrix), lora_hw/<R>, norm_ttt, bias_ttt,
    fast_ttt/<r> (fast-weight experts with lora_ttt/<r>'s trainable parameters), each with the
    router and λ_energy = ``lam``; "<method>:<objective>" picks the objective
    (entropy, next_token, masked, consistency).
    """
    x = ml_collections.ConfigDict()
    x.methods = methods
    x.lam = lam
    x.max_rank = 16  # R_max of the LoRA buffers (ranks are masks: one compilation)
    x.with_router = True  # the group adapts with ttt.params (False: the group alone)
    x.mask_rate = 0.15  # masked: share of bytes hidden behind random bytes
    x.drop_rate = 0.1  # consistency on text: byte dropout and adjacent-swap rates
    x.swap_rate = 0.1
    x.max_shift = 1  # consistency on digits: pixel shift and intensity noise
    x.noise = 1
    # lora_hw/<R>: ranks from the monitor (metattt.energy.adapter_ranks) after every batch.
    x.hw_fraction = 0.9  # power budget: this share of no_ttt's dynamic power (as budget)
    x.hw_margin = 0.5  # ranks shrink over this share of the budget's dynamic headroom
    x.hw_temperature_c = 80.0  # no adapter at or above; full rank 10 °C below
    x.hw_temperature_margin_c = 10.0
    x.hw_memory_reserve_gb = 1.0  # free memory (device, else host) kept in reserve
    # fast_ttt/<ρ>: fast-weight experts (metattt.models.fast_weights) with the trainable
    # parameters of lora_ttt/<ρ>; per sequence, chunks of fast_chunk positions, fast_steps
    # key/value gradient steps of rate fast_lr (<= 1: unit keys) on each after reading it.
    x.fast_chunk = 16
    x.fast_lr = 0.5
    x.fast_steps = 1
    return x


def schedule_section(
    *, lam: str, int8_lam: str, expert: tuple[str, ...]
) -> ml_collections.ConfigDict:
    """The ``schedule`` section: energy_ttt/<lam> at every schedule, and int8_energy_ttt/<int8_lam>
    and the ``expert`` methods on hard batches by router margin (shared with
    configs/energy_moe_digits.py).

    When to adapt (issue 15 item 7, experiments/energy_moe/schedules.py): "<method>@<schedule>"
    (any method that adapts at test time but the budgets) adapts on the batches whose prediction
    entropy (@entropy) or router top-2 margin (@margin), from the served model's forward pass, is
    past a threshold, or at a period that halves after a hard batch and doubles after an easy one
    (@adaptive, entropy; from ttt.every up to max_every). The threshold is the ``quantile`` of
    the served model's signal on in-distribution data, never the stream.
    """
    s = ml_collections.ConfigDict()
    s.methods = (
        *(f"energy_ttt/{lam}@{when}" for when in ("entropy", "margin", "adaptive")),
        f"int8_energy_ttt/{int8_lam}@margin",
        *(f"{name}@margin" for name in expert),
    )
    s.quantile = 0.9
    s.max_every = 64
    return s


def memory_section() -> ml_collections.ConfigDict:
    """The ``memory`` section (shared with configs/energy_moe_digits.py).

    Memory pressure (issue 15 item 6, experiments/energy_moe/pressure.py): "memory" serves the
    trained model on a simulated device of ``limit_x`` full-service footprints (XLA's peak bytes
    of the compiled forward) whose other tenants use the shares ``pressure`` of it (equal
    segments of the stream); metattt.energy.memory_policy steps down through batch ``chunks``,
    then ``capacity_factors`` (None: dropless; the classifier only -- for the LM capacity
    dropping is not causal), then top-k down to ``min_top_k``, keeping a ``margin``, and steps
    up after ``patience`` calm readings.
    """
    m = ml_collections.ConfigDict()
    m.enabled = True
    m.chunks = (1, 2)
    m.capacity_factors = (None,)  # from the most generous; (None,): dropless only
    m.min_top_k = 1
    m.limit_x = 2.0
    m.pressure = (0.3, 0.55, 0.68, 0.3)
    m.margin = 0.1
    m.patience = 4
    return m


def tune_section(method: str, *, stream_batches: int) -> ml_collections.ConfigDict:
    """The ``tune`` section (shared with configs/energy_moe_digits.py): the fast-weight settings
    ``expert.fast_lr``, ``fast_chunk`` and ``fast_steps`` chosen on a validation stream.

    experiments/energy_moe/tuning.py serves ``method`` at every point of the grid
    fast_lrs × fast_chunks × fast_step_counts, and the trained model, on ``stream_batches``
    batches per seed of a validation stream the test stream never reads (LM: code windows that
    share no byte with a test window; digits: corrupted train-split images), then picks one
    point for every seed from the seeds' means: the lowest dynamic energy per token among the
    points whose metric change vs the trained model is below ``max_change`` (the plan's
    accuracy bound), else the best metric. Every fast-weight method then serves the test
    stream at that point.
    """
    t = ml_collections.ConfigDict()
    t.enabled = True
    t.method = method
    t.fast_lrs = (0.25, 1.0)  # 12 points: one compilation each
    t.fast_chunks = (8, 16, 32)  # a chunk of data.length positions would never read W != 0
    t.fast_step_counts = (1, 2)
    t.stream_batches = stream_batches
    t.max_change = 0.05
    return t
