"""Energy accounting of a served MoE against hand-computed values and brute-force references."""

import numpy as np
import pytest

from metattt.energy import (
    SimulatedDevice,
    Work,
    dense_work,
    edp,
    fixed_power,
    forward_work,
    pareto_front,
    routed_energy,
    serving_rate,
)

DEVICE = SimulatedDevice(idle_power_w=37.0, joules_per_flop=3e-12, joules_per_byte=7e-11)


def test_dense_work_by_hand():
    """D=2, one layer, E=3, V=5, one window of L=2 tokens, float32."""
    work = dense_work(d_model=2, num_layers=1, num_experts=3, vocab_size=5, batch=1, length=2)
    # per token: projections 8·D² = 32, attention 4·L·D = 16, router 2·D·E = 12, head 2·D·V = 20
    assert work.flops == 2 * (32 + 16 + 12 + 20)
    # activations per token: 2·(6·D + E) = 30, embedding + logits 2·D + V = 9, 4 bytes each;
    # weights: QKVO 4·D² = 16, router D·E = 6, norms 4·D = 8, embedding + head 2·D·V = 20,
    # head bias V = 5, positions L·D = 4
    assert work.nbytes == 2 * (30 + 9) * 4 + (16 + 6 + 8 + 20 + 5 + 4) * 4


@pytest.mark.parametrize("seed", range(3))
def test_dense_work_sums_its_parts(seed):
    rng = np.random.default_rng(seed)
    d, layers, e, v, b, length = (int(x) for x in rng.integers(1, 40, size=6))
    work = dense_work(
        d_model=d, num_layers=layers, num_experts=e, vocab_size=v, batch=b, length=length,
        itemsize=2,
    )  # fmt: skip
    flops = nbytes = 0
    for _token in range(b * length):
        for _layer in range(layers):
            flops += 4 * (2 * d * d) + 2 * (2 * length * d) + 2 * d * e
            nbytes += 2 * (d + d + 3 * d + d + e) * 2
        flops += 2 * d * v
        nbytes += (d + d + v) * 2
    nbytes += (layers * (4 * d * d + d * e + 4 * d) + d * v + d * v + v + length * d) * 2
    assert work == Work(float(flops), float(nbytes))


def test_work_adds_and_scales():
    a, b = Work(1.5, 2.0), Work(0.25, 3.0)
    assert a + b == Work(1.75, 5.0)
    assert a.scaled(3.0) == Work(4.5, 6.0)


def test_forward_work_adds_every_expert():
    rng = np.random.default_rng(1)
    flops, nbytes = rng.uniform(0, 1e6, size=(2, 3, 5))
    dense = Work(123.0, 456.0)
    work = forward_work(dense, flops, nbytes)
    assert work.flops == pytest.approx(123.0 + sum(float(f) for f in flops.ravel()), rel=1e-6)
    assert work.nbytes == pytest.approx(456.0 + sum(float(x) for x in nbytes.ravel()), rel=1e-6)


@pytest.mark.parametrize("utilization", [0.2, 0.5, 1.0])
def test_serving_rate_keeps_the_device_busy_the_asked_share(utilization):
    """At r, one batch of mean-cost routing takes u of the time between two batches."""
    rng = np.random.default_rng(2)
    flops_e, bytes_e = rng.uniform(1e3, 1e5, size=(2, 6))
    dense = Work(float(rng.uniform(1e6, 1e8)), float(rng.uniform(1e5, 1e7)))
    tokens, top_k, layers = 96, 2, 3
    rate = serving_rate(
        DEVICE, dense, flops_e, bytes_e, tokens=tokens, top_k=top_k, num_layers=layers,
        utilization=utilization,
    )  # fmt: skip
    assignments = tokens * top_k * layers  # each at the mean cost of an expert
    flops = dense.flops + assignments * sum(flops_e) / len(flops_e)
    nbytes = dense.nbytes + assignments * sum(bytes_e) / len(bytes_e)
    busy = max(flops / DEVICE.peak_flops, nbytes / DEVICE.bandwidth_bytes_s)
    assert busy / (tokens / rate) == pytest.approx(utilization, rel=1e-12)


def test_fixed_power_is_idle_plus_dense_power():
    dense = Work(4e9, 3e8)
    joules = 4e9 * DEVICE.joules_per_flop + 3e8 * DEVICE.joules_per_byte
    batches_per_s = 1000.0 / 50  # 1000 tokens/s in batches of 50
    power = fixed_power(DEVICE, dense, tokens=50, rate=1000.0)
    assert power == pytest.approx(37.0 + batches_per_s * joules, rel=1e-12)


def test_routed_energy_is_the_sum_over_assignments():
    rng = np.random.default_rng(0)
    joules = rng.uniform(1e-9, 1e-7, size=5)
    counts = rng.integers(0, 50, size=(3, 5))
    expected = 0.0
    for layer in counts:
        for e, n in enumerate(layer):
            expected += n * joules[e]
    assert routed_energy(joules, counts, 7) == pytest.approx(1e6 * expected / 7, rel=1e-12)


def test_edp_arithmetic():
    rng = np.random.default_rng(0)
    for energy, delay, tokens in zip(rng.uniform(0.1, 5, 5), rng.uniform(1e-6, 1, 5),
                                     rng.integers(1, 1000, 5), strict=True):  # fmt: skip
        assert edp(energy, delay, int(tokens)) == pytest.approx(
            energy * delay / tokens**2, rel=1e-12
        )
    with pytest.raises(ValueError, match="tokens"):
        edp(1.0, 1.0, 0)


def brute_force_front(points):
    front = []
    for i, p in enumerate(points):
        dominated = any(
            q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1]) for q in points
        )
        if not dominated:
            front.append(i)
    return front


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_matches_brute_force_dominance(seed):
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 6, size=(40, 2)).astype(float)  # many ties and duplicates
    points[:10] = rng.normal(size=(10, 2))
    assert pareto_front(points).tolist() == brute_force_front(points.tolist())


def test_pareto_front_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape \\(N, 2\\)"):
        pareto_front(np.ones((3, 3)))
