"""Energy measurement for energy-aware test-time training: monitors and per-expert costs.

Modules: :mod:`~metattt.energy.monitor` (the :class:`AbstractMonitor` interface, the NVML and
simulated monitors, :func:`create_monitor`) and :mod:`~metattt.energy.costs` (per-expert cost
profiles, their JSON files, and the expected energy of routing decisions).
"""

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

__all__ = [
    "AbstractMonitor",
    "CostProfile",
    "ExpertCost",
    "NvmlMonitor",
    "NvmlUnavailableError",
    "PowerRecord",
    "SimulatedDevice",
    "SimulatedMonitor",
    "WindowRecord",
    "create_monitor",
    "expected_energy",
    "load_costs",
    "measure_costs",
    "proxy_costs",
    "save_costs",
]
