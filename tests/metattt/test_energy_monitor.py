"""Energy monitors and cost profiles.

The NVML path runs against a fake ``pynvml`` module put in ``sys.modules`` (with and without
the energy counter, with unsupported fields, with ``NVMLError_LibraryNotFound``) and, where a
GPU is present, against the real library. The simulated thermal model is checked against the
closed-form solution of dT/dt = (P·R_th − (T − T_amb))/τ at constant power; the expected
routing energy against a brute-force loop over tokens and their selected experts.
"""

import math
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metattt.energy import (
    CostProfile,
    ExpertCost,
    NvmlMonitor,
    NvmlUnavailableError,
    SimulatedDevice,
    SimulatedMonitor,
    create_monitor,
    expected_energy,
    load_costs,
    measure_costs,
    proxy_costs,
    save_costs,
)
from metattt.energy import monitor as monitor_module


@pytest.fixture(autouse=True)
def _all_gpus_visible(monkeypatch):
    """NVML tests see every fake GPU unless they set CUDA_VISIBLE_DEVICES themselves."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# --- a fake pynvml ----------------------------------------------------------------------------


def fake_pynvml(*, energy_counter=True, library_found=True, temperature=True):
    """A module with the pynvml functions the monitor calls; ``mod.state`` drives the readings."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    mod.NVMLError = NVMLError
    mod.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    mod.NVMLError_NotSupported = NVMLError_NotSupported
    mod.NVML_TEMPERATURE_GPU = 0
    mod.NVML_CLOCK_SM = 1
    state = dict(init=0, shutdown=0, power_mw=100_000, counter_mj=7_000_000, reasons=0)
    mod.state = state

    def nvml_init():
        if not library_found:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        state["init"] += 1

    def not_supported(*_):
        raise NVMLError_NotSupported("Not Supported")

    mod.nvmlInit = nvml_init
    mod.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)
    mod.nvmlDeviceGetCount = lambda: state.get("count", 1)
    mod.nvmlDeviceGetHandleByIndex = lambda i: f"handle{i}"
    mod.nvmlDeviceGetHandleByUUID = lambda u: f"handle-{u}"
    mod.nvmlDeviceGetName = lambda h: b"Fake GPU"
    mod.nvmlDeviceGetPowerUsage = lambda h: state["power_mw"]
    mod.nvmlDeviceGetTotalEnergyConsumption = (
        (lambda h: state["counter_mj"]) if energy_counter else not_supported
    )
    mod.nvmlDeviceGetTemperature = (lambda h, s: 61) if temperature else not_supported
    mod.nvmlDeviceGetClockInfo = lambda h, kind: 1410 if kind == mod.NVML_CLOCK_SM else 0
    mod.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=80, memory=30)
    mod.nvmlDeviceGetCurrentClocksEventReasons = lambda h: state["reasons"]
    return mod


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(
        monitor_module, "time", types.SimpleNamespace(perf_counter=fake.perf_counter)
    )
    return fake


def test_nvml_with_energy_counter(monkeypatch, clock):
    nvml = fake_pynvml(energy_counter=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    mon = create_monitor("nvml")
    assert isinstance(mon, NvmlMonitor) and mon.source == "nvml" and mon.fallback_reason is None
    assert mon.energy_method == "counter" and mon.device_name == "Fake GPU"
    rec = mon.sample()
    assert rec.energy_j == 0.0 and rec.power_w == 100.0 and rec.temperature_c == 61.0
    assert rec.sm_clock_mhz == 1410.0 and rec.utilization == 0.8 and not rec.throttled
    with mon.measure() as window:
        clock.now += 2.0
        nvml.state["counter_mj"] += 2500  # 2.5 J
        nvml.state["reasons"] = 0x20  # SW thermal slowdown
    w = window.record
    assert w.energy_j == pytest.approx(2.5) and w.duration_s == pytest.approx(2.0)
    assert w.mean_power_w == pytest.approx(1.25) and w.energy_method == "counter"
    assert w.throttled and w.source == "nvml" and w.num_samples == 2
    nvml.state["reasons"] = 0x1  # GPU idle is not throttling
    assert not mon.sample().throttled
    mon.close()
    mon.close()
    assert nvml.state["init"] == 1 and nvml.state["shutdown"] == 1


def test_nvml_without_counter_integrates_power(monkeypatch, clock):
    nvml = fake_pynvml(energy_counter=False, temperature=False)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with NvmlMonitor() as mon:
        assert mon.energy_method == "trapezoid"
        first = mon.sample()  # t = 0, 100 W
        assert math.isnan(first.temperature_c)  # unsupported field reads as NaN
        with mon.measure() as window:  # opens with a reading at t = 0
            clock.now += 1.0
            nvml.state["power_mw"] = 200_000
            mon.sample()  # t = 1, 200 W: + (100 + 200)/2 · 1 = 150 J
            clock.now += 2.0  # t = 3, 200 W: + 200 · 2 = 400 J
        assert window.record.energy_j == pytest.approx(550.0)
        assert window.record.peak_power_w == 200.0
        assert window.record.energy_method == "trapezoid"
    assert nvml.state["shutdown"] == 1


def test_nvml_background_sampling(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    mon = NvmlMonitor(interval_s=0.005)
    mon.start()
    deadline = time.monotonic() + 5.0
    while len(mon.records) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    records = mon.stop()
    mon.close()
    assert len(records) >= 3
    times = [r.time_s for r in records]
    assert times == sorted(times) and all(r.source == "nvml" for r in records)


def test_no_nvml_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(library_found=False))
    with pytest.raises(NvmlUnavailableError, match="LibraryNotFound"):
        create_monitor("nvml")
    with pytest.raises(NvmlUnavailableError, match="allow_simulated=False"):
        create_monitor("auto", allow_simulated=False)
    mon = create_monitor("auto")
    assert isinstance(mon, SimulatedMonitor) and mon.source == "simulated"
    assert "LibraryNotFound" in mon.fallback_reason
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed at all
    with pytest.raises(NvmlUnavailableError, match="nvidia-ml-py"):
        create_monitor("nvml")


def test_create_monitor_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        create_monitor("rapl")


def _real_nvml_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _real_nvml_available(), reason="no NVIDIA GPU / NVML here")
def test_real_nvml():
    with NvmlMonitor(interval_s=0.01) as mon, mon.measure() as window:
        time.sleep(0.2)
    rec = window.record
    assert rec.duration_s > 0.1 and rec.energy_j > 0 and rec.mean_power_w > 0


# --- the simulated device ---------------------------------------------------------------------

DEV = SimulatedDevice(
    idle_power_w=50.0,
    joules_per_flop=1e-12,
    joules_per_byte=0.0,
    peak_flops=1e12,
    ambient_c=25.0,
    thermal_resistance_c_per_w=0.2,
    time_constant_s=10.0,
    throttle_c=80.0,
    hysteresis_c=5.0,
    throttle_clock_factor=0.5,
)


def closed_form(t0, power, t, dev=DEV):
    t_ss = dev.ambient_c + power * dev.thermal_resistance_c_per_w
    return t_ss + (t0 - t_ss) * math.exp(-t / dev.time_constant_s)


def test_thermal_model_heats_and_cools_as_the_closed_form():
    mon = SimulatedMonitor(DEV, initial_temperature_c=30.0)
    # 150 W of dynamic power (1.5e14 FLOP/s · 1 pJ) for 12 s in four pieces: T_ss = 65 C < 80
    for _ in range(4):
        assert mon.record_work(flops=4.5e14, nbytes=0.0, seconds=3.0) == pytest.approx(3.0)
    hot = closed_form(30.0, 200.0, 12.0)
    assert mon.temperature_c == pytest.approx(hot, rel=1e-12)
    assert hot > 30.0 and not mon.throttled
    rec = mon.sample()
    assert rec.energy_j == pytest.approx(200.0 * 12.0) and rec.power_w == pytest.approx(200.0)
    assert rec.utilization == pytest.approx(1.0) and rec.time_s == pytest.approx(12.0)
    mon.idle(7.0)
    assert mon.temperature_c == pytest.approx(closed_form(hot, 50.0, 7.0), rel=1e-12)
    rec = mon.sample()
    assert rec.temperature_c < hot and rec.power_w == pytest.approx(50.0)
    assert rec.utilization == 0.0 and rec.energy_j == pytest.approx(2400.0 + 350.0)


def test_thermal_model_throttles_at_its_limit_and_recovers():
    mon = SimulatedMonitor(DEV, initial_temperature_c=30.0)
    # 400 W dynamic: T_ss = 25 + 0.2·450 = 115 C > 80; throttled 50 + 200 = 250 W -> 75 C,
    # which is exactly the release band 80 - 5 = 75 C, so it stays throttled.
    rate, nominal = 400.0, 30.0
    t_star = DEV.time_constant_s * math.log((30.0 - 115.0) / (80.0 - 115.0))
    duration = mon.record_work(
        flops=rate * nominal / DEV.joules_per_flop, nbytes=0, seconds=nominal
    )
    assert duration == pytest.approx(t_star + (nominal - t_star) / 0.5, rel=1e-12)
    assert mon.throttled and mon.sample().sm_clock_mhz == DEV.base_clock_mhz * 0.5
    end_temp = closed_form(80.0, 250.0, duration - t_star)
    assert mon.temperature_c == pytest.approx(end_temp, rel=1e-12)
    assert 75.0 <= mon.temperature_c <= 80.0
    # energy: idle over the whole (stretched) duration + all the dynamic energy
    assert mon.sample().energy_j == pytest.approx(50.0 * duration + rate * nominal, rel=1e-12)
    # cooling at idle (T_ss = 35 C) releases the clock once T reaches 75 C
    release = DEV.time_constant_s * math.log((end_temp - 35.0) / (75.0 - 35.0))
    mon.idle(release * 0.99)
    assert mon.throttled
    mon.idle(release * 0.02)
    assert not mon.throttled and mon.sample().sm_clock_mhz == DEV.base_clock_mhz


def test_throttling_oscillates_inside_the_hysteresis_band():
    dev = DEV._replace(throttle_clock_factor=0.25)  # throttled: 50 + 100 W -> T_ss 55 C < 75
    mon = SimulatedMonitor(dev, initial_temperature_c=60.0)
    temps, throttled = [], []
    for _ in range(200):
        mon.record_work(flops=400.0 * 0.5 / dev.joules_per_flop, nbytes=0, seconds=0.5)
        rec = mon.sample()
        temps.append(rec.temperature_c)
        throttled.append(rec.throttled)
    assert max(temps) <= 80.0 + 1e-9
    first = throttled.index(True)
    assert min(temps[first:]) >= 75.0 - 1e-9
    assert any(
        a and not b for a, b in zip(throttled[first:-1], throttled[first + 1 :], strict=True)
    )


def test_noise_is_seeded_and_spares_the_energy():
    noisy = DEV._replace(power_noise_w=3.0, temperature_noise_c=0.5)
    runs = []
    for _ in range(2):
        mon = SimulatedMonitor(noisy, seed=7)
        recs = []
        for _ in range(5):
            mon.record_work(flops=1e12, nbytes=0)
            recs.append(mon.sample())
        runs.append(recs)
    assert runs[0] == runs[1]
    clean = SimulatedMonitor(DEV)
    for _ in range(5):
        clean.record_work(flops=1e12, nbytes=0)
    last = clean.sample()
    assert runs[0][-1].energy_j == pytest.approx(last.energy_j)
    assert runs[0][-1].power_w != pytest.approx(last.power_w)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hysteresis_c=0.0), "hysteresis_c"),
        (dict(throttle_clock_factor=0.0), "throttle_clock_factor"),
        (dict(idle_power_w=500.0), "idle steady temperature"),
    ],
)
def test_simulated_device_validation(change, message):
    with pytest.raises(ValueError, match=message):
        SimulatedMonitor(DEV._replace(**change))


# --- cost profiles ----------------------------------------------------------------------------


def test_proxy_costs():
    profile = proxy_costs(3, [1e6, 2e6, 4e6], 1e3, device=DEV)
    assert profile.num_experts == 3 and profile.energy_source == "proxy"
    np.testing.assert_allclose(profile.values("flops_per_token"), [1e6, 2e6, 4e6])
    np.testing.assert_allclose(profile.values("joules_per_token"), [1e-6, 2e-6, 4e-6])
    np.testing.assert_allclose(profile.values("seconds_per_token"), [1e-6, 2e-6, 4e-6])
    assert all(c.source == "proxy" for c in profile.experts)
    with pytest.raises(ValueError, match="flops_per_token"):
        proxy_costs(3, [1.0, 2.0], 1.0)


def test_cost_profile_json_round_trip_and_validation(tmp_path):
    profile = proxy_costs(4, [1e6, 2e6, 3e6, 4e6], [1e3, 2e3, 3e3, 4e3])
    path = tmp_path / "sub" / "costs.json"
    save_costs(profile, path)
    assert load_costs(path, num_experts=4) == profile
    with pytest.raises(ValueError, match="num_experts=8"):
        load_costs(path, num_experts=8)
    with pytest.raises(FileNotFoundError, match="measure_costs"):
        load_costs(tmp_path / "missing.json")
    text = path.read_text()
    (tmp_path / "v2.json").write_text(text.replace('"version": 1', '"version": 2'))
    with pytest.raises(ValueError, match="version"):
        load_costs(tmp_path / "v2.json")
    (tmp_path / "bad.json").write_text(text.replace('"source": "proxy"', '"source": "guess"', 1))
    with pytest.raises(ValueError, match="source"):
        load_costs(tmp_path / "bad.json")
    (tmp_path / "neg.json").write_text(
        text.replace('"flops_per_token": 1000000.0', '"flops_per_token": -1')
    )
    with pytest.raises(ValueError, match="flops_per_token"):
        load_costs(tmp_path / "neg.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="JSON"):
        load_costs(tmp_path / "junk.json")


def brute_force_energy(probs, costs, k):
    probs = np.asarray(probs, np.float64).reshape(-1, probs.shape[-1])
    total = 0.0
    for p in probs:
        for e in np.argsort(-p, kind="stable")[:k]:
            if p[e] > 0:
                total += costs[e]
    return total


@pytest.mark.parametrize("k", [1, 2])
def test_expected_energy_equals_brute_force(k):
    rng = np.random.default_rng(k)
    costs = rng.uniform(1.0, 5.0, size=4)
    logits = jnp.asarray(rng.standard_normal((2, 3, 5, 4)), jnp.float32)
    probs = jax.nn.softmax(logits, -1)
    profile = CostProfile(tuple(ExpertCost(0, 0, 0, float(c), "proxy") for c in costs), "proxy")
    for given in (profile, list(profile.experts), jnp.asarray(costs)):
        value = expected_energy(probs, given, k)
        assert float(value) == pytest.approx(brute_force_energy(probs, costs, k), rel=1e-5)
    # a pruned expert (probability 0) takes no token even when K reaches it
    pruned = jax.nn.softmax(logits.at[..., 0].set(-jnp.inf), -1)
    assert float(expected_energy(pruned, costs, 4)) == pytest.approx(
        brute_force_energy(pruned, costs, 4), rel=1e-5
    )
    # gradient: the smooth surrogate k · Σ p·c
    grad = jax.jit(jax.grad(lambda z: expected_energy(jax.nn.softmax(z, -1), costs, k)))(logits)
    want = jax.jit(jax.grad(lambda z: k * jnp.sum(jax.nn.softmax(z, -1) * jnp.asarray(costs))))(
        logits
    )
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grad).max()) > 0
    with pytest.raises(ValueError, match="one value per expert"):
        expected_energy(probs, costs[:3], k)


def test_measure_costs_with_and_without_a_monitor():
    weights = jnp.stack([jnp.eye(4) * (e + 1) for e in range(2)])
    expert_fn = lambda e, x: jnp.tanh(x @ weights[e])
    x = jnp.ones((8, 4))
    timed = measure_costs(expert_fn, 2, x, flops_per_token=40.0, bytes_per_token=32.0,
                          repeats=2, device=DEV)  # fmt: skip
    assert timed.energy_source == "proxy" and all(c.source == "measured" for c in timed.experts)
    assert all(c.seconds_per_token > 0 for c in timed.experts)
    np.testing.assert_allclose(timed.values("joules_per_token"), 40.0 * DEV.joules_per_flop)
    mon = SimulatedMonitor(DEV)
    measured = measure_costs(expert_fn, 2, x, flops_per_token=40.0, bytes_per_token=32.0,
                             monitor=mon, repeats=2, device=DEV)  # fmt: skip
    assert measured.energy_source == "monitor:simulated"
    total = sum(c.joules_per_token for c in measured.experts) * 2 * 8
    np.testing.assert_allclose(total, mon.sample().energy_j, rtol=1e-9)  # all energy accounted
    # each expert's energy includes idle power over its (measured) run time
    assert all(c.joules_per_token > 40.0 * DEV.joules_per_flop for c in measured.experts)


@pytest.mark.parametrize(
    "visible, index, handle",
    [(None, 1, "handle1"), ("2,3", 1, "handle3"), (" 3 ,0", 0, "handle3"),
     ("GPU-8f3c,1", 0, "handle-GPU-8f3c")],
)  # fmt: skip
def test_nvml_finds_the_gpu_cuda_calls_device_index(monkeypatch, visible, index, handle):
    """CUDA_VISIBLE_DEVICES renumbers the GPUs JAX sees; NVML numbers all of them."""
    nvml = fake_pynvml()
    nvml.state["count"] = 4
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert monitor_module.load_nvml(index)[1] == handle


@pytest.mark.parametrize(
    "visible, index, message",
    [("", 0, "CUDA_VISIBLE_DEVICES='' makes 0 GPU"), ("2,3", 2, "makes 2 GPU"),
     ("7", 0, "GPU 7 \\(device_index=0\\) but NVML sees 4"), ("MIG-1a2b", 0, "a MIG instance"),
     ("gpu0", 0, "neither a GPU index nor a GPU- UUID")],
)  # fmt: skip
def test_a_gpu_outside_cuda_visible_devices_is_one_line(monkeypatch, visible, index, message):
    nvml = fake_pynvml()
    nvml.state["count"] = 4
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(monitor_module.NvmlUnavailableError, match=message) as info:
        monitor_module.load_nvml(index)
    assert "\n" not in str(info.value)
