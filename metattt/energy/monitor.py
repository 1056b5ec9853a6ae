"""Power and thermal monitors: one interface, an NVML implementation and a simulated one.

Both return the same records, so an experiment loop measures energy the same way on a GPU
(NVML) and on the CPU machine (simulated):

* :class:`PowerRecord` -- one reading: time, power, cumulative energy since the monitor began,
  temperature, SM clock, utilisation, whether clocks are throttled, and the source.
* :class:`WindowRecord` -- a measured window (``with monitor.measure() as w: ...``): the energy
  integrated over it, mean and peak power, peak temperature, throttling.

:class:`NvmlMonitor` reads an NVIDIA GPU through ``pynvml`` (package nvidia-ml-py). Energy comes
from the GPU's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, Volta and later)
when it has one, otherwise from the trapezoid rule over the power readings (so sample often:
``start()`` runs a background thread at ``interval_s``).

:class:`SimulatedMonitor` is a device model driven by the caller, who reports the work it did
(``record_work(flops, bytes)``): the work's energy is idle power over its duration plus a fixed
energy per FLOP and per byte; its duration is the roofline time (or a given time), stretched
while the clocks are throttled. Temperature follows a first-order thermal model

    dT/dt = (P·R_th − (T − T_ambient)) / τ,

solved exactly over each interval of constant power, T(t) = T_ss + (T0 − T_ss)·e^(−t/τ) with
T_ss = T_ambient + P·R_th. When T reaches ``throttle_c`` the clock drops to
``throttle_clock_factor`` of its base (work runs slower, at lower power) until T falls to
``throttle_c − hysteresis_c``. Time on a simulated monitor is simulated time: it advances only
through ``record_work`` and ``idle``. Optional seeded noise perturbs the reported power and
temperature (never the energy counter).

:func:`create_monitor` picks one; asking for NVML where there is none raises
:class:`NvmlUnavailableError` with the reason, and ``kind="auto"`` falls back to the simulated
monitor only when ``allow_simulated`` (the monitor's ``fallback_reason`` records why).

Monitors are side effects: use them in the experiment loop, outside jitted code.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

SOURCES = ("nvml", "simulated")


class PowerRecord(NamedTuple):
    """One reading of a monitor.

    Attributes:
        time_s: seconds since the monitor began (wall clock for NVML, simulated for simulated).
        power_w: power draw (NVML: the driver's reading; simulated: mean since the last sample).
        energy_j: energy since the monitor began.
        temperature_c: GPU temperature.
        sm_clock_mhz: SM clock.
        utilization: busy share in [0, 1].
        throttled: clocks reduced for power or thermal reasons.
        source: ``"nvml"`` or ``"simulated"``.
    """

    time_s: float
    power_w: float
    energy_j: float
    temperature_c: float
    sm_clock_mhz: float
    utilization: float
    throttled: bool
    source: str


class WindowRecord(NamedTuple):
    """Energy and power over a measured window.

    Attributes:
        start_s, end_s, duration_s: the window on the monitor's clock.
        energy_j: energy used in the window (end minus start of the cumulative energy).
        mean_power_w: energy_j / duration_s (the last power reading if the duration is 0).
        peak_power_w: largest power reading in the window.
        max_temperature_c: largest temperature reading in the window.
        throttled: whether any reading in the window was throttled.
        num_samples: readings in the window (start and end included).
        source: ``"nvml"`` or ``"simulated"``.
        energy_method: ``"counter"`` (hardware energy counter), ``"trapezoid"`` (integrated
            power readings) or ``"model"`` (the simulation's exact energy).
    """

    start_s: float
    end_s: float
    duration_s: float
    energy_j: float
    mean_power_w: float
    peak_power_w: float
    max_temperature_c: float
    throttled: bool
    num_samples: int
    source: str
    energy_method: str


class Window:
    """Handle yielded by :meth:`AbstractMonitor.measure`; ``record`` is set when it closes."""

    def __init__(self) -> None:
        self._record: WindowRecord | None = None

    @property
    def record(self) -> WindowRecord:
        if self._record is None:
            raise RuntimeError("the window is still open: read .record after the with block")
        return self._record


class NvmlUnavailableError(RuntimeError):
    """NVML was asked for but cannot run here (no library, driver or GPU)."""


class AbstractMonitor(abc.ABC):
    """A power monitor: ``sample()`` now, or sample on a background thread, or measure windows.

    Implementations provide :meth:`sample`, :attr:`source`, :attr:`energy_method` and
    :meth:`_release`; the sampling thread, the record buffer and the windows are shared here and
    are not overridden.

    Example:
        >>> with create_monitor("auto") as mon, mon.measure() as window:
        ...     run_batch()
        >>> window.record.energy_j
    """

    fallback_reason: str | None = None

    def __init__(self, interval_s: float, max_records: int) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._lock = threading.RLock()
        self._records: collections.deque[PowerRecord] = collections.deque(maxlen=max_records)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False

    @property
    @abc.abstractmethod
    def source(self) -> str:
        """``"nvml"`` or ``"simulated"``."""

    @property
    @abc.abstractmethod
    def energy_method(self) -> str:
        """How ``energy_j`` is obtained: ``"counter"``, ``"trapezoid"`` or ``"model"``."""

    @abc.abstractmethod
    def sample(self) -> PowerRecord:
        """Read the device now."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free the implementation's resources (called once by :meth:`close`)."""

    def start(self) -> None:
        """Sample every ``interval_s`` seconds (wall clock) on a daemon thread into ``records``."""
        if self._closed:
            raise RuntimeError("monitor is closed")
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="power-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            record = self.sample()
            with self._lock:
                self._records.append(record)
            self._stop.wait(self.interval_s)

    def stop(self) -> list[PowerRecord]:
        """Stop the background thread; returns every buffered record."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.records

    @property
    def records(self) -> list[PowerRecord]:
        """The background thread's readings so far (oldest first)."""
        with self._lock:
            return list(self._records)

    @contextlib.contextmanager
    def measure(self) -> Iterator[Window]:
        """Measure the energy of a ``with`` block; the yielded handle's ``record`` is a
        :class:`WindowRecord` once the block exits (also when it raises)."""
        window = Window()
        first = self.sample()
        try:
            yield window
        finally:
            last = self.sample()
            inner = [r for r in self.records if first.time_s < r.time_s < last.time_s]
            window._record = summarize(first, last, inner, self.energy_method)

    def close(self) -> None:
        """Stop sampling and release the device (idempotent)."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarize(
    first: PowerRecord, last: PowerRecord, inner: list[PowerRecord], energy_method: str
) -> WindowRecord:
    """A :class:`WindowRecord` from a window's first and last readings and those between."""
    readings = [first, *inner, last]
    duration = last.time_s - first.time_s
    energy = last.energy_j - first.energy_j
    finite = lambda values: [v for v in values if math.isfinite(v)] or [math.nan]
    return WindowRecord(
        start_s=first.time_s,
        end_s=last.time_s,
        duration_s=duration,
        energy_j=energy,
        mean_power_w=energy / duration if duration > 0 else last.power_w,
        peak_power_w=max(finite([r.power_w for r in readings])),
        max_temperature_c=max(finite([r.temperature_c for r in readings])),
        throttled=any(r.throttled for r in readings),
        num_samples=len(readings),
        source=last.source,
        energy_method=energy_method,
    )


# --- NVML -------------------------------------------------------------------------------------

# Clock-event (throttle) reasons that mean "slowed for power or heat" (nvml.h bit values, used
# when the module lacks the named constants).
_THROTTLE_REASONS = {
    "nvmlClocksEventReasonSwPowerCap": 0x4,
    "nvmlClocksEventReasonHwSlowdown": 0x8,
    "nvmlClocksEventReasonSwThermalSlowdown": 0x20,
    "nvmlClocksEventReasonHwThermalSlowdown": 0x40,
    "nvmlClocksEventReasonHwPowerBrakeSlowdown": 0x80,
}


def visible_gpu(device_index: int) -> int | str:
    """The NVML device behind CUDA's ``device_index``: an NVML index or a ``GPU-`` UUID.

    ``CUDA_VISIBLE_DEVICES`` (``"2,3"``, ``"GPU-<uuid>,..."``) renumbers the GPUs a process
    sees, so that JAX's GPU 0 is the first listed; NVML ignores it and numbers every GPU of the
    machine. Unset, the two numberings agree; set but empty, no GPU is visible.

    Raises:
        NvmlUnavailableError: ``device_index`` is not among the visible GPUs, an entry is
            neither an index nor a ``GPU-`` UUID, or it names a MIG instance (NVML reads power
            per GPU, not per MIG instance).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return device_index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if not 0 <= device_index < len(entries):
        raise NvmlUnavailableError(
            f"NVML unavailable: device_index={device_index} but CUDA_VISIBLE_DEVICES="
            f"{visible!r} makes {len(entries)} GPU(s) visible"
        )
    entry = entries[device_index]
    if entry.isdigit():
        return int(entry)
    if entry.startswith("GPU-"):
        return entry
    raise NvmlUnavailableError(
        f"NVML unavailable: CUDA_VISIBLE_DEVICES entry {entry!r} is "
        + (
            "a MIG instance; NVML reads power per GPU (give the GPU's index or UUID)"
            if entry.startswith("MIG-")
            else "neither a GPU index nor a GPU- UUID"
        )
    )


def load_nvml(device_index: int = 0) -> tuple[Any, Any]:
    """Import ``pynvml``, initialise NVML and return ``(module, device handle)`` of the GPU
    that CUDA (and so JAX) calls ``device_index`` (see :func:`visible_gpu`).

    Raises:
        NvmlUnavailableError: nvidia-ml-py is not installed, NVML cannot start (no driver or
            library: ``NVMLError_LibraryNotFound``, ``NVMLError_DriverNotLoaded``, ...), or
            there is no such GPU.
    """
    target = visible_gpu(device_index)
    try:
        import pynvml
    except ImportError as err:
        raise NvmlUnavailableError(
            "NVML unavailable: the pynvml module is missing (pip install nvidia-ml-py)"
        ) from err
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise NvmlUnavailableError(
            f"NVML unavailable: nvmlInit failed with {type(err).__name__} ({err}); this machine "
            "has no NVIDIA driver or GPU. Use the simulated monitor (kind='simulated', or "
            "kind='auto' with allow_simulated=True)."
        ) from err
    try:
        if isinstance(target, str):
            handle = pynvml.nvmlDeviceGetHandleByUUID(target)
        else:
            count = pynvml.nvmlDeviceGetCount()
            if not 0 <= target < count:
                raise NvmlUnavailableError(
                    f"NVML unavailable: GPU {target} (device_index={device_index}) but NVML "
                    f"sees {count} GPU(s)"
                )
            handle = pynvml.nvmlDeviceGetHandleByIndex(target)
    except (pynvml.NVMLError, NvmlUnavailableError) as err:
        pynvml.nvmlShutdown()
        if isinstance(err, NvmlUnavailableError):
            raise
        raise NvmlUnavailableError(f"NVML unavailable: {type(err).__name__} ({err})") from err
    return pynvml, handle


class NvmlMonitor(AbstractMonitor):
    """Power, energy, temperature, SM clock, utilisation and throttling of one NVIDIA GPU.

    ``energy_j`` comes from the hardware counter when the GPU has one (``energy_method ==
    "counter"``), otherwise it is the trapezoid integral of the power readings taken so far
    (``"trapezoid"``: accurate only when sampled often, i.e. after :meth:`start`). Fields the
    GPU does not report read as NaN (throttling as False). Note that on recent GPUs
    ``nvmlDeviceGetPowerUsage`` is an average over about one second.

    Args:
        device_index: which GPU, numbered as CUDA and JAX number them (after
            ``CUDA_VISIBLE_DEVICES``; see :func:`visible_gpu`).
        interval_s: background sampling period in seconds.
        use_energy_counter: use the energy counter when present (False forces the trapezoid).
        max_records: size of the record buffer (oldest dropped first).

    Raises:
        NvmlUnavailableError: see :func:`load_nvml`.
    """

    def __init__(
        self,
        device_index: int = 0,
        *,
        interval_s: float = 0.05,
        use_energy_counter: bool = True,
        max_records: int = 100_000,
    ) -> None:
        super().__init__(interval_s, max_records)
        self._nvml, self._handle = load_nvml(device_index)
        nvml = self._nvml
        name = nvml.nvmlDeviceGetName(self._handle)
        self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        self.device_index = device_index
        self._counter0_mj: int | None = None
        if use_energy_counter:
            try:
                self._counter0_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            except nvml.NVMLError:
                self._counter0_mj = None
        self._throttle_mask = 0
        for name_, bit in _THROTTLE_REASONS.items():
            self._throttle_mask |= int(getattr(nvml, name_, bit))
        self._t0 = time.perf_counter()
        self._last: tuple[float, float] | None = None  # (time, power) of the previous reading
        self._energy = 0.0

    @property
    def source(self) -> str:
        return "nvml"

    @property
    def energy_method(self) -> str:
        return "counter" if self._counter0_mj is not None else "trapezoid"

    def _query(self, fn_name: str, *args, default: Any = math.nan) -> Any:
        fn = getattr(self._nvml, fn_name, None)
        if fn is None:
            return default
        try:
            return fn(self._handle, *args)
        except self._nvml.NVMLError:
            return default

    def _throttled(self) -> bool:
        reasons = self._query("nvmlDeviceGetCurrentClocksEventReasons", default=None)
        if reasons is None:
            reasons = self._query("nvmlDeviceGetCurrentClocksThrottleReasons", default=0)
        return bool(int(reasons) & self._throttle_mask)

    def sample(self) -> PowerRecord:
        nvml = self._nvml
        with self._lock:
            now = time.perf_counter() - self._t0
            power_mw = self._query("nvmlDeviceGetPowerUsage")
            power = float(power_mw) / 1000.0
            if self._counter0_mj is not None:
                counter = self._query("nvmlDeviceGetTotalEnergyConsumption")
                if math.isfinite(counter):
                    self._energy = (int(counter) - self._counter0_mj) / 1000.0
            elif math.isfinite(power):
                if self._last is not None:
                    t_prev, p_prev = self._last
                    self._energy += 0.5 * (p_prev + power) * (now - t_prev)
                self._last = (now, power)
            util = self._query("nvmlDeviceGetUtilizationRates", default=None)
            return PowerRecord(
                time_s=now,
                power_w=power,
                energy_j=self._energy,
                temperature_c=float(
                    self._query(
                        "nvmlDeviceGetTemperature", getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
                    )
                ),
                sm_clock_mhz=float(
                    self._query("nvmlDeviceGetClockInfo", getattr(nvml, "NVML_CLOCK_SM", 1))
                ),
                utilization=math.nan if util is None else float(util.gpu) / 100.0,
                throttled=self._throttled(),
                source="nvml",
            )

    def _release(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


# --- simulated --------------------------------------------------------------------------------


class SimulatedDevice(NamedTuple):
    """Constants of the simulated accelerator (defaults: roughly a 300 W datacenter GPU).

    Attributes:
        idle_power_w: power with no work.
        joules_per_flop: dynamic energy per FLOP.
        joules_per_byte: dynamic energy per byte moved.
        peak_flops: FLOP/s at the base clock.
        bandwidth_bytes_s: memory bandwidth (bytes/s).
        base_clock_mhz: SM clock when not throttled.
        ambient_c: T_ambient.
        thermal_resistance_c_per_w: R_th, steady-state rise per watt.
        time_constant_s: τ of the thermal model.
        throttle_c: temperature at which the clock drops.
        hysteresis_c: the clock recovers at ``throttle_c - hysteresis_c``.
        throttle_clock_factor: clock (and compute rate) multiplier while throttled, in (0, 1].
        power_noise_w: std of Gaussian noise on reported power.
        temperature_noise_c: std of Gaussian noise on reported temperature.
    """

    idle_power_w: float = 60.0
    joules_per_flop: float = 2e-12
    joules_per_byte: float = 5e-11
    peak_flops: float = 1e14
    bandwidth_bytes_s: float = 2e12
    base_clock_mhz: float = 1500.0
    ambient_c: float = 30.0
    thermal_resistance_c_per_w: float = 0.2
    time_constant_s: float = 20.0
    throttle_c: float = 85.0
    hysteresis_c: float = 5.0
    throttle_clock_factor: float = 0.6
    power_noise_w: float = 0.0
    temperature_noise_c: float = 0.0

    def steady_temperature(self, power_w: float) -> float:
        """T_ss = T_ambient + P·R_th."""
        return self.ambient_c + power_w * self.thermal_resistance_c_per_w

    def work_energy(self, flops: float, nbytes: float) -> float:
        """Dynamic energy of some work: flops·J_flop + bytes·J_byte (no idle share)."""
        return flops * self.joules_per_flop + nbytes * self.joules_per_byte

    def roofline_seconds(self, flops: float, nbytes: float) -> float:
        """Duration at the base clock: max(flops / peak, bytes / bandwidth)."""
        return max(flops / self.peak_flops, nbytes / self.bandwidth_bytes_s)


def _validate_device(device: SimulatedDevice) -> None:
    for name in ("peak_flops", "bandwidth_bytes_s", "time_constant_s", "hysteresis_c"):
        if not getattr(device, name) > 0:
            raise ValueError(f"device.{name} must be positive, got {getattr(device, name)!r}")
    for name in ("idle_power_w", "joules_per_flop", "joules_per_byte", "power_noise_w"):
        if getattr(device, name) < 0:
            raise ValueError(f"device.{name} must be >= 0, got {getattr(device, name)!r}")
    if not 0 < device.throttle_clock_factor <= 1:
        raise ValueError(
            f"device.throttle_clock_factor must be in (0, 1], got {device.throttle_clock_factor}"
        )
    idle_ss = device.steady_temperature(device.idle_power_w)
    if not idle_ss < device.throttle_c - device.hysteresis_c:
        raise ValueError(
            f"the idle steady temperature {idle_ss:.1f} C must lie below throttle_c - "
            f"hysteresis_c = {device.throttle_c - device.hysteresis_c:.1f} C, or the device "
            "would never leave throttling"
        )


class SimulatedMonitor(AbstractMonitor):
    """A modelled accelerator whose power follows the work the caller reports.

    Args:
        device: the :class:`SimulatedDevice` constants.
        initial_temperature_c: starting temperature (default: the idle steady state).
        seed: seed of the reading noise (used only when the device has noise).
        interval_s: background sampling period (wall clock) for :meth:`start`.
        max_records: size of the record buffer.

    Raises:
        ValueError: inconsistent device constants (the message names the field).

    Example:
        >>> mon = SimulatedMonitor()
        >>> with mon.measure() as w:
        ...     mon.record_work(flops=work.flops.sum(), nbytes=work.bytes.sum())
        >>> w.record.energy_j
    """

    def __init__(
        self,
        device: SimulatedDevice | None = None,
        *,
        initial_temperature_c: float | None = None,
        seed: int = 0,
        interval_s: float = 0.05,
        max_records: int = 100_000,
    ) -> None:
        super().__init__(interval_s, max_records)
        self.device = SimulatedDevice() if device is None else device
        _validate_device(self.device)
        dev = self.device
        self._time = 0.0
        self._energy = 0.0
        self._busy = 0.0
        self._temperature = (
            dev.steady_temperature(dev.idle_power_w)
            if initial_temperature_c is None
            else float(initial_temperature_c)
        )
        self._throttled = False
        self._last_sample = (0.0, 0.0, 0.0)  # (time, energy, busy) at the previous sample
        self._last_power = dev.idle_power_w
        self._rng = np.random.default_rng(seed)

    @property
    def source(self) -> str:
        return "simulated"

    @property
    def energy_method(self) -> str:
        return "model"

    @property
    def temperature_c(self) -> float:
        """The model's exact current temperature (no noise)."""
        return self._temperature

    @property
    def throttled(self) -> bool:
        return self._throttled

    @property
    def time_s(self) -> float:
        return self._time

    @property
    def clock_factor(self) -> float:
        return self.device.throttle_clock_factor if self._throttled else 1.0

    def _crossing_time(self, power: float) -> float:
        """Time until the next throttle switch under constant ``power`` (inf if none).

        Throttling engages whenever T >= throttle_c and releases whenever
        T <= throttle_c - hysteresis_c; 0 means "switch now".
        """
        dev = self.device
        target = dev.throttle_c - dev.hysteresis_c if self._throttled else dev.throttle_c
        temp = self._temperature
        if (temp <= target) if self._throttled else (temp >= target):
            return 0.0
        t_ss = dev.steady_temperature(power)
        if (t_ss >= target) if self._throttled else (t_ss <= target):
            return math.inf  # never gets there
        return dev.time_constant_s * math.log((temp - t_ss) / (target - t_ss))

    def _advance(self, power: float, dt: float, busy: bool) -> None:
        dev = self.device
        t_ss = dev.steady_temperature(power)
        decay = math.exp(-dt / dev.time_constant_s)
        self._temperature = t_ss + (self._temperature - t_ss) * decay
        self._energy += power * dt
        self._time += dt
        if busy:
            self._busy += dt

    def _switch(self, crossed: bool) -> None:
        dev = self.device
        self._throttled = not self._throttled
        if crossed:  # pin the temperature to the threshold it just reached (no float drift)
            self._temperature = (
                dev.throttle_c if self._throttled else dev.throttle_c - dev.hysteresis_c
            )

    def record_work(self, flops: float, nbytes: float, seconds: float | None = None) -> float:
        """Run work on the simulated device; returns its (simulated) duration in seconds.

        The work needs ``seconds`` at the base clock (default: the roofline time of ``flops``
        and ``nbytes``) and takes 1/factor as long while throttled. Its dynamic energy
        ``flops·J_flop + bytes·J_byte`` is spread evenly over its progress, so the power is
        idle + (dynamic / seconds)·factor.

        Raises:
            ValueError: negative ``flops``/``nbytes``, or non-positive ``seconds``.
        """
        if flops < 0 or nbytes < 0:
            raise ValueError(f"flops and nbytes must be >= 0, got {flops!r}, {nbytes!r}")
        dev = self.device
        nominal = dev.roofline_seconds(flops, nbytes) if seconds is None else float(seconds)
        if seconds is not None and not nominal > 0:
            raise ValueError(f"seconds must be positive, got {seconds!r}")
        if nominal == 0:
            return 0.0
        rate = dev.work_energy(flops, nbytes) / nominal  # dynamic W at the base clock
        remaining, elapsed = nominal, 0.0
        with self._lock:
            while remaining > 0:
                factor = self.clock_factor
                power = dev.idle_power_w + rate * factor
                needed = remaining / factor
                switch_in = self._crossing_time(power)
                if switch_in < needed:
                    self._advance(power, switch_in, busy=True)
                    remaining -= switch_in * factor
                    elapsed += switch_in
                    self._switch(crossed=switch_in > 0)
                else:
                    self._advance(power, needed, busy=True)
                    elapsed += needed
                    remaining = 0.0
            self._last_power = dev.idle_power_w + rate * self.clock_factor
        return elapsed

    def idle(self, seconds: float) -> None:
        """Let ``seconds`` pass with no work (the device cools towards its idle steady state)."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        power = self.device.idle_power_w
        remaining = float(seconds)
        with self._lock:
            while remaining > 0:
                switch_in = self._crossing_time(power)
                if switch_in < remaining:
                    self._advance(power, switch_in, busy=False)
                    remaining -= switch_in
                    self._switch(crossed=switch_in > 0)
                else:
                    self._advance(power, remaining, busy=False)
                    remaining = 0.0
            self._last_power = power

    def sample(self) -> PowerRecord:
        dev = self.device
        with self._lock:
            t_prev, e_prev, b_prev = self._last_sample
            dt = self._time - t_prev
            if dt > 0:
                power = (self._energy - e_prev) / dt
                util = (self._busy - b_prev) / dt
            else:
                power = self._last_power
                util = 0.0
            self._last_sample = (self._time, self._energy, self._busy)
            temperature = self._temperature
            if dev.power_noise_w > 0:
                power += float(self._rng.normal(0.0, dev.power_noise_w))
            if dev.temperature_noise_c > 0:
                temperature += float(self._rng.normal(0.0, dev.temperature_noise_c))
            return PowerRecord(
                time_s=self._time,
                power_w=power,
                energy_j=self._energy,
                temperature_c=temperature,
                sm_clock_mhz=dev.base_clock_mhz * self.clock_factor,
                utilization=min(max(util, 0.0), 1.0),
                throttled=self._throttled,
                source="simulated",
            )

    def _release(self) -> None:
        pass


def create_monitor(
    kind: str = "auto",
    *,
    allow_simulated: bool = True,
    device_index: int = 0,
    interval_s: float = 0.05,
    simulated_device: SimulatedDevice | None = None,
    seed: int = 0,
) -> AbstractMonitor:
    """A monitor of the requested kind; ``monitor.source`` says which one it is.

    Args:
        kind: ``"nvml"``, ``"simulated"`` or ``"auto"`` (NVML when it can start, otherwise the
            simulated monitor if ``allow_simulated``; its ``fallback_reason`` says why).
        allow_simulated: whether ``"auto"`` may fall back to the simulation.
        device_index: the GPU for NVML.
        interval_s: background sampling period.
        simulated_device: constants of the simulated device.
        seed: noise seed of the simulated device.

    Raises:
        ValueError: unknown ``kind``.
        NvmlUnavailableError: ``kind="nvml"``, or ``"auto"`` without ``allow_simulated``, on a
            machine where NVML cannot start.
    """
    if kind not in ("nvml", "simulated", "auto"):
        raise ValueError(f"kind must be 'nvml', 'simulated' or 'auto', got {kind!r}")
    if kind == "simulated":
        return SimulatedMonitor(simulated_device, seed=seed, interval_s=interval_s)
    try:
        return NvmlMonitor(device_index, interval_s=interval_s)
    except NvmlUnavailableError as err:
        if kind == "nvml" or not allow_simulated:
            raise NvmlUnavailableError(
                f"{err}" + ("" if kind == "nvml" else " (allow_simulated=False, so no fallback)")
            ) from err
        monitor = SimulatedMonitor(simulated_device, seed=seed, interval_s=interval_s)
        monitor.fallback_reason = str(err)
        return monitor
