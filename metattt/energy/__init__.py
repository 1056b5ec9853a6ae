"""Energy measurement for energy-aware test-time training: monitors and per-expert costs.

Modules: :mod:`~metattt.energy.monitor` (the :class:`AbstractMonitor` interface, the NVML and
simulated monitors, :func:`create_monitor`), :mod:`~metattt.energy.costs` (per-expert cost
profiles, their JSON files, and the expected energy of routing decisions),
:mod:`~metattt.energy.adapt` (energy-aware TENT), :mod:`~metattt.energy.budget` (the λ
controller, triggers, expert pruning and graceful degradation under a power budget) and
:mod:`~metattt.energy.accounting` (the work and energy of serving a MoE: dense and routed work,
serving rate, fixed power, EDP, Pareto front), :mod:`~metattt.energy.serving` (prequential
serving of a stream under a monitor, with adaptation and an optional power-budget policy),
:mod:`~metattt.energy.rank_policy` (adapter ranks from power, temperature and memory headroom),
:mod:`~metattt.energy.memory` (memory readings, serving levels priced by XLA, and the policy
that steps down under memory pressure), :mod:`~metattt.energy.explain` (which experts a
routing avoided and what that saved, activation shares, top-k agreement),
:mod:`~metattt.energy.schedule` (when to adapt: periodic, on a difficulty signal, or at an
adaptive frequency), :mod:`~metattt.energy.windows` (adaptation after every window of tokens,
or of sequences, of a served batch) and :mod:`~metattt.energy.kernel_costs` (MoE dispatch
backends timed per shape on the device, a fitted cost model per backend, and the backend it
predicts cheapest).
"""

from metattt.energy import kernel_costs
from metattt.energy.accounting import (
    Work,
    dense_work,
    edp,
    fixed_power,
    forward_work,
    pareto_front,
    routed_energy,
    serving_rate,
)
from metattt.energy.adapt import (
    EnergyAdaptResult,
    EnergyBatch,
    EnergyTTT,
    RoutingStats,
    energy_tent,
)
from metattt.energy.budget import (
    BudgetDecision,
    BudgetState,
    ControllerState,
    Degradation,
    LambdaController,
    PowerBudget,
    PruneResult,
    Trigger,
    TriggerState,
    degrade,
    energy_per_token_budget,
    lambda_controller,
    power_budget,
    predicted_energy_per_token,
    prune_experts,
    trigger,
)
from metattt.energy.costs import (
    CostProfile,
    ExpertCost,
    expected_energy,
    load_costs,
    measure_costs,
    proxy_costs,
    save_costs,
)
from metattt.energy.explain import (
    RoutingChanges,
    activation_shares,
    explain_token,
    routing_changes,
    topk_agreement,
)
from metattt.energy.memory import (
    MemoryDecision,
    MemoryPolicy,
    MemoryReading,
    ServingLevel,
    SimulatedMemory,
    memory_policy,
    peak_bytes,
    read_memory,
    serving_ladder,
)
from metattt.energy.monitor import (
    AbstractMonitor,
    NvmlMonitor,
    NvmlUnavailableError,
    PowerRecord,
    SimulatedDevice,
    SimulatedMonitor,
    WindowRecord,
    create_monitor,
)
from metattt.energy.rank_policy import (
    RankLimits,
    adapter_ranks,
    fill_ranks,
    rank_units,
)
from metattt.energy.schedule import (
    Schedule,
    ScheduleState,
    adaptive_period,
    calibrate_threshold,
    on_difficulty,
    periodic,
    prediction_entropy,
    router_margin,
)
from metattt.energy.serving import ServedStream, serve_stream
from metattt.energy.windows import WindowServed, serve_windows

__all__ = [
    "Schedule",
    "ScheduleState",
    "adaptive_period",
    "calibrate_threshold",
    "on_difficulty",
    "periodic",
    "prediction_entropy",
    "router_margin",
    "RoutingChanges",
    "activation_shares",
    "explain_token",
    "routing_changes",
    "topk_agreement",
    "MemoryDecision",
    "MemoryPolicy",
    "MemoryReading",
    "ServingLevel",
    "SimulatedMemory",
    "memory_policy",
    "peak_bytes",
    "read_memory",
    "serving_ladder",
    "serve_windows",
    "WindowServed",
    "ServedStream",
    "kernel_costs",
    "serve_stream",
    "Work",
    "dense_work",
    "edp",
    "fixed_power",
    "forward_work",
    "pareto_front",
    "routed_energy",
    "serving_rate",
    "AbstractMonitor",
    "BudgetDecision",
    "BudgetState",
    "ControllerState",
    "CostProfile",
    "Degradation",
    "EnergyAdaptResult",
    "EnergyBatch",
    "EnergyTTT",
    "ExpertCost",
    "LambdaController",
    "NvmlMonitor",
    "NvmlUnavailableError",
    "PowerBudget",
    "PowerRecord",
    "PruneResult",
    "RankLimits",
    "RoutingStats",
    "SimulatedDevice",
    "SimulatedMonitor",
    "Trigger",
    "TriggerState",
    "WindowRecord",
    "adapter_ranks",
    "create_monitor",
    "degrade",
    "energy_per_token_budget",
    "energy_tent",
    "expected_energy",
    "fill_ranks",
    "lambda_controller",
    "load_costs",
    "measure_costs",
    "power_budget",
    "predicted_energy_per_token",
    "proxy_costs",
    "rank_units",
    "prune_experts",
    "save_costs",
    "trigger",
]
