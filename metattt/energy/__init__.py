"""Energy measurement for energy-aware test-time training: monitors and per-expert costs.

Modules: :mod:`~metattt.energy.monitor` (the :class:`AbstractMonitor` interface, the NVML and
simulated monitors, :func:`create_monitor`), :mod:`~metattt.energy.costs` (per-expert cost
profiles, their JSON files, and the expected energy of routing decisions),
:mod:`~metattt.energy.adapt` (energy-aware TENT), :mod:`~metattt.energy.budget` (the λ
controller, triggers, expert pruning and graceful degradation under a power budget) and
:mod:`~metattt.energy.accounting` (the work and energy of serving a MoE: dense and routed work,
serving rate, fixed power, EDP, Pareto front) and :mod:`~metattt.energy.serving` (prequential
serving of a stream under a monitor, with adaptation and an optional power-budget policy) and
:mod:`~metattt.energy.kernel_costs` (MoE dispatch backends timed per shape on the device, a
fitted cost model per backend, and the backend it predicts cheapest).
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
from metattt.energy.serving import ServedStream, serve_stream

__all__ = [
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
    "RoutingStats",
    "SimulatedDevice",
    "SimulatedMonitor",
    "Trigger",
    "TriggerState",
    "WindowRecord",
    "create_monitor",
    "degrade",
    "energy_per_token_budget",
    "energy_tent",
    "expected_energy",
    "lambda_controller",
    "load_costs",
    "measure_costs",
    "power_budget",
    "predicted_energy_per_token",
    "proxy_costs",
    "prune_experts",
    "save_costs",
    "trigger",
]
