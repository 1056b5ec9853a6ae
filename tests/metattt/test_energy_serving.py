"""Prequential serving under a simulated monitor, with stub models whose every output is known:
the parameters are a counter that each adaptation raises by one, so a batch's score says which
parameters scored it; the energies are recomputed by a plain loop over the batches."""

from typing import NamedTuple

import numpy as np
import pytest

from metattt.energy import (
    BudgetDecision,
    SimulatedDevice,
    SimulatedMonitor,
    Work,
    serve_stream,
)

LAYERS, E, B, L = 2, 4, 6, 5
DEVICE = SimulatedDevice(idle_power_w=50.0, joules_per_flop=1e-9, joules_per_byte=1e-10)
DENSE = Work(1e5, 2e4)


class Stats(NamedTuple):
    joules_per_token: np.ndarray
    task_loss: np.ndarray
    expert_counts: np.ndarray


def _counts(top_k, mask, shift):
    """(layers, E) assignments that depend on the routing and on the batch."""
    base = (np.arange(LAYERS * E).reshape(LAYERS, E) + shift) % 7 + top_k
    return base * np.asarray(mask, np.int64)


def infer(params, inputs, targets, top_k, mask):
    return np.float32(params), _counts(top_k, mask, int(inputs[0, 0]))


def adapt(params, tokens, lam, mask):
    steps = np.stack([_counts(1, mask, len(tokens) + s) for s in range(3)])
    return params + 1, Stats(np.full(3, lam + 0.5), np.arange(3.0) + params, steps)


def work(counts, rows):
    return DENSE.scaled(rows / B) + Work(1e3 * float(np.sum(counts)), 10.0 * float(np.sum(counts)))


def _stream(rng, steps):
    inputs = rng.integers(0, 50, size=(steps, B, L))
    return inputs, rng.integers(0, 50, size=(steps, B, L))


def _serve(inputs, targets, **kwargs):
    monitor = SimulatedMonitor(DEVICE)
    args = dict(work=work, dense=DENSE, device=DEVICE, monitor=monitor, period_s=1e-3, top_k=2)
    args.update(kwargs)
    served = serve_stream(infer, adapt, np.float32(0.0), inputs, targets, **args)
    monitor.close()
    return served


def test_scores_come_before_the_adaptation_on_their_batch():
    inputs, targets = _stream(np.random.default_rng(0), 7)
    mask = np.ones(E, bool)
    served = _serve(inputs, targets, mask=mask, adapting=True, adapt_every=3, adapt_windows=4)
    # adapted after batches 0, 3, 6: batch t is scored with ceil(t / 3) adaptations done
    assert served.scores == [0, 1, 1, 1, 2, 2, 2]
    assert served.adapt_calls == 3 and served.curve_energy == [0.5] * 9
    assert served.curve_loss == [0, 1, 2, 1, 2, 3, 2, 3, 4]
    counts = [_counts(2, mask, int(x[0, 0])) for x in inputs]
    assert np.array_equal(served.counts, np.sum(counts, axis=0))
    assert np.array_equal(served.counts_late, counts[-1]) and served.late_batches == 1


@pytest.mark.parametrize("adapting", [False, True])
def test_energies_are_the_sum_over_batches_and_adaptation_steps(adapting):
    inputs, targets = _stream(np.random.default_rng(1), 8)
    mask = np.array([True, False, True, True])
    served = _serve(inputs, targets, mask=mask, lam=0.3, adapting=adapting, adapt_every=2,
                    adapt_windows=4, backward_factor=2.0)  # fmt: skip
    inference = adaptation = experts = busy = 0.0
    for t, x in enumerate(inputs):
        w = work(_counts(2, mask, int(x[0, 0])), B)
        inference += DEVICE.work_energy(*w)
        experts += DEVICE.work_energy(*w) - DEVICE.work_energy(*DENSE)
        busy += DEVICE.roofline_seconds(*w)
        if adapting and t % 2 == 0:
            for s in range(3):
                step = work(_counts(1, mask, 4 + s), 4)
                adaptation += 3 * DEVICE.work_energy(*step)
                busy += DEVICE.roofline_seconds(*step.scaled(3))
    assert served.dynamic_j == pytest.approx(inference + adaptation, rel=1e-9)
    assert served.adapt_dynamic_j == pytest.approx(adaptation, rel=1e-9)
    assert served.expert_j == pytest.approx(experts, rel=1e-9)
    assert served.busy_s == pytest.approx(busy, rel=1e-9)
    # the device keeps up with the 1 ms period here: the windows add idle power to the work
    assert busy < 8e-3
    expected = DEVICE.idle_power_w * 8e-3 + inference + adaptation
    assert served.energy_j == pytest.approx(expected, rel=1e-6)
    # each window lasts one period, so its mean power times the period is its energy
    assert sum(p * 1e-3 for p in served.power_w) == pytest.approx(served.energy_j, rel=1e-6)
    assert served.lambdas == [pytest.approx(0.3)] * 8 and served.top_ks == [2] * 8


class StepPolicy:
    """Level t after batch t: λ doubles, top-k drops to 1 and adaptation turns on at level 2."""

    def init(self):
        return 0

    def update(self, state, power_w, temperature_c):
        level = state + 1
        decision = BudgetDecision(
            lambda_energy=0.1 * 2**level, adapt=level >= 2, top_k=1 if level >= 2 else 2,
            expert_mask=np.array([True, True, level < 3, True]), level=level,
            predicted_power_w=power_w, budget_met=level < 3,
        )  # fmt: skip
        return level, decision


def test_a_policy_sets_the_routing_and_adaptation_of_the_next_batch():
    inputs, targets = _stream(np.random.default_rng(2), 5)
    served = _serve(inputs, targets, mask=np.ones(E, bool), lam=0.1, policy=StepPolicy(),
                    adapt_every=1, adapt_windows=2)  # fmt: skip
    assert served.levels == [1, 2, 3, 4, 5]
    assert served.lambdas == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])
    assert served.top_ks == [2, 2, 1, 1, 1]
    assert served.adapt_calls == 3  # batches 2, 3, 4: adaptation turned on after batch 1
    assert served.scores == [0, 0, 0, 1, 2]
    assert served.top_k == 1 and served.mask.tolist() == [True, True, False, True]
    assert served.decision.level == 5 and not served.decision.budget_met
    masks = [np.ones(E, bool)] * 3 + [np.array([True, True, False, True])] * 2  # level 3 on
    ks = [2, 2, 1, 1, 1]
    counts = [_counts(k, m, int(x[0, 0])) for k, m, x in zip(ks, masks, inputs, strict=True)]
    assert np.array_equal(served.counts, np.sum(counts, axis=0))


def test_a_difficulty_schedule_adapts_only_on_hard_batches_and_prices_only_those():
    """infer returns a signal (here the batch's first token / 10); the schedule adapts on batches
    whose signal is over 2.5 only, and the adaptation energy is that of exactly those calls."""
    from metattt.energy import schedule

    def infer_with_signal(params, inputs, targets, top_k, mask):
        score, counts = infer(params, inputs, targets, top_k, mask)
        return score, counts, float(inputs[0, 0]) / 10

    inputs, targets = _stream(np.random.default_rng(5), 12)
    mask = np.ones(E, bool)
    monitor = SimulatedMonitor(DEVICE)
    args = dict(work=work, dense=DENSE, device=DEVICE, monitor=monitor, period_s=1e-3, top_k=2)
    served = serve_stream(
        infer_with_signal, adapt, np.float32(0.0), inputs, targets, mask=mask, adapting=True,
        adapt_windows=4, schedule=schedule.on_difficulty(2.5), **args,
    )  # fmt: skip
    monitor.close()
    hard = inputs[:, 0, 0] / 10 > 2.5
    assert served.signals == tuple(inputs[:, 0, 0] / 10)
    assert served.adapt_calls == hard.sum() > 0 and not hard.all()
    # batch t is scored after the adaptations on the hard batches before it
    assert served.scores == [float(hard[:t].sum()) for t in range(12)]
    steps = [_counts(1, mask, 4 + s) for s in range(3)]
    per_call = sum(DEVICE.work_energy(*work(c, 4).scaled(3.0)) for c in steps)
    np.testing.assert_allclose(served.adapt_dynamic_j, hard.sum() * per_call, rtol=1e-9)
    with pytest.raises(ValueError, match=r"infer must return \(score, counts, signal\)"):
        _serve(inputs, targets, mask=mask, adapting=True, schedule=schedule.periodic(2))


def test_each_forward_pass_of_an_adaptation_step_is_charged():
    """An adaptation whose steps run two forward passes (a consistency loss: counts
    (K, 2, layers, E)) is charged 1 + backward_factor forwards for each pass."""
    inputs, targets = _stream(np.random.default_rng(3), 4)
    mask = np.ones(E, bool)

    def two_pass_adapt(params, tokens, lam, mask):
        steps = np.stack([[_counts(1, mask, s), _counts(2, mask, s + 5)] for s in range(3)])
        return params + 1, Stats(np.full(3, 0.5), np.zeros(3), steps)

    monitor = SimulatedMonitor(DEVICE)
    served = serve_stream(infer, two_pass_adapt, np.float32(0.0), inputs, targets, work=work,
                          dense=DENSE, device=DEVICE, monitor=monitor, period_s=1e-3, top_k=2,
                          mask=mask, adapting=True, adapt_every=2, adapt_windows=4,
                          backward_factor=2.0)  # fmt: skip
    monitor.close()
    per_call = sum(
        3 * DEVICE.work_energy(*work(_counts(k, mask, s + shift), 4))
        for s in range(3)
        for k, shift in ((1, 0), (2, 5))
    )
    assert served.adapt_calls == 2
    assert served.adapt_dynamic_j == pytest.approx(2 * per_call, rel=1e-9)


def test_on_window_sees_every_window_and_its_counts():
    inputs, targets = _stream(np.random.default_rng(4), 5)
    mask = np.ones(E, bool)
    seen = []
    served = _serve(inputs, targets, mask=mask, on_window=lambda rec, c: seen.append((rec, c)))
    assert [rec.mean_power_w for rec, _ in seen] == served.power_w
    for (_, counts), x in zip(seen, inputs, strict=True):
        assert np.array_equal(counts, _counts(2, mask, int(x[0, 0])))
