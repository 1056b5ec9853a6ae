"""Dynamics-shift tasks: factors, quantisation, warps and latent timescales against their
definitions (periodicity, analytic autocorrelation, Python-loop references)."""

import numpy as np
import pytest

from attd import shifts
from tests.metattt.test_ucr import write_problem


def test_factors_lie_in_their_bands_and_are_log_uniform_inside():
    rng = np.random.default_rng(0)
    bands = ((1 / 3, 1 / 2), (2.0, 3.0))
    f = shifts.sample_factors(rng, 20_000, bands)
    low, high = (f >= 1 / 3) & (f <= 1 / 2), (f >= 2) & (f <= 3)
    assert np.all(low | high)
    assert abs(low.mean() - 0.5) < 0.02  # an interval is picked uniformly
    # Log-uniform inside an interval: log f has the interval's mean and uniform variance.
    lg = np.log(f[high])
    a, b = np.log(2), np.log(3)
    assert abs(lg.mean() - (a + b) / 2) < 0.005 and abs(lg.var() - (b - a) ** 2 / 12) < 0.002
    assert np.all(shifts.sample_factors(rng, 5, ((1.5, 1.5),)) == 1.5)
    for bad in ((), ((0.0, 1.0),), ((2.0, 1.0),)):
        with pytest.raises(ValueError, match="bands"):
            shifts.sample_factors(rng, 3, bad)


def test_quantise_matches_a_python_loop():
    x = np.random.default_rng(1).normal(0, 2, 500)
    tokens = shifts.quantise(x, 7, 2.0)
    width = 4.0 / 7
    for xi, ti in zip(x, tokens, strict=True):
        expected = min(max(int(np.floor((xi + 2.0) / width)), 0), 6)
        assert ti == expected or abs((xi + 2.0) / width - round((xi + 2.0) / width)) < 1e-9


@pytest.mark.parametrize("warp", [1 / 3, 0.5, 1.0, 2.0])
def test_a_warped_sequence_repeats_after_its_warped_period(warp):
    """Noise and jitter off: the sequence has period ``24 w`` and not half of it."""
    x, labels, factor = shifts.timewarp_signals(
        64, 3, offset=5, seq_len=160, period=24.0, period_jitter=0.0, noise=0.0,
        bands=((warp, warp),),
    )  # fmt: skip
    lag = round(24 * warp)
    assert np.allclose(factor, warp) and set(labels) <= set(range(4))
    np.testing.assert_allclose(x[:, lag:], x[:, :-lag], atol=1e-9)
    half = lag // 2
    assert np.abs(x[:, half:] - x[:, :-half]).mean() > 0.1


def test_classes_are_shared_by_a_seeds_splits_and_examples_are_not():
    kw = dict(num_classes=4, harmonics=3, seq_len=64)
    a, la, _ = shifts.timewarp_signals(200, 7, offset=0, **kw)
    b, lb, _ = shifts.timewarp_signals(200, 7, offset=0, **kw)
    c, _, _ = shifts.timewarp_signals(200, 7, offset=1, **kw)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.allclose(a, c)
    t7, t8 = shifts.warp_templates(4, 3, 7), shifts.warp_templates(4, 3, 8)
    assert not np.allclose(t7[0], t8[0])
    # Unit RMS per template: the mean square of sum_h a_h sin(.) is sum_h a_h^2 / 2.
    np.testing.assert_allclose(0.5 * (t7[0] ** 2).sum(-1), 1.0)


@pytest.mark.parametrize(
    ("shift", "factor"), [("decay", 1.0), ("decay", 3.0), ("decay", 0.4), ("frequency", 1.5)]
)
def test_latent_mode_autocorrelation_is_the_analytic_one(shift, factor):
    """One mode, no observation noise: Re z is stationary with unit variance and
    autocorrelation exp(-k / τ) cos(2π f k), τ and f scaled by the shift factor."""
    x, _, fac = shifts.oscillator_signals(
        6000, 2, offset=0, num_classes=1, modes=1, seq_len=40, decay=8.0, noise=0.0,
        bands=((factor, factor),), shift=shift,
    )  # fmt: skip
    (f0,) = shifts.oscillator_modes(1, 1, 2)[0]
    tau, f = (8.0 * factor, f0) if shift == "decay" else (8.0, f0 * factor)
    assert np.allclose(fac, factor)
    assert abs(x.var() - 1.0) < 0.05
    for k in (1, 2, 4, 7):
        acf = (x[:, k:] * x[:, :-k]).mean() / x.var()
        assert abs(acf - np.exp(-k / tau) * np.cos(2 * np.pi * f * k)) < 0.03, k


def test_mode_sets_differ_between_classes():
    sets = shifts.oscillator_modes(6, 2, 0)
    assert len({tuple(s) for s in sets}) == 6
    assert np.all((sets >= 0.03) & (sets <= 0.2))
    with pytest.raises(ValueError, match="shift must be"):
        shifts.oscillator_signals(4, 0, offset=0, shift="phase")


@pytest.mark.parametrize("kind", ["timewarp", "oscillator"])
def test_task_splits_are_unshifted_then_shifted_with_difficulty_the_log_factor(kind):
    task = shifts.shift_task(
        kind, 1, num_train=300, num_test=200, shift_bands=((0.4, 0.5), (2.0, 2.5)), seq_len=64
    )
    assert (task.vocab_size, task.num_classes) == (32, 4)
    for s in (task.train, task.test_id):
        assert np.all(s.factor == 1.0) and np.all(s.split.difficulty == 0.0)
    f = task.test_shift.factor
    assert np.all(((f >= 0.4) & (f <= 0.5)) | ((f >= 2.0) & (f <= 2.5)))
    np.testing.assert_allclose(task.test_shift.split.difficulty, np.abs(np.log(f)))
    for s in task:
        if isinstance(s, shifts.ShiftSplit):
            assert s.split.tokens.shape[1] == 64 and s.split.tokens.dtype == np.int32
            assert s.split.tokens.min() >= 0 and s.split.tokens.max() < 32
            assert set(np.unique(s.split.labels)) == {0, 1, 2, 3}
    assert task.outer is None
    outer = shifts.shift_task(
        kind, 1, num_train=8, num_test=8, shift_bands=((2, 2),), num_outer=300,
        outer_bands=((1, 1), (1.5, 1.5)), seq_len=16,
    ).outer  # fmt: skip
    assert set(np.round(outer.factor, 6)) == {1.0, 1.5} and len(outer.split.labels) == 300
    assert not np.array_equal(outer.split.tokens[:8], task.train.split.tokens[:8, :16])
    with pytest.raises(ValueError, match="unknown dynamics-shift task 'warp'"):
        shifts.shift_task("warp", 0, num_train=1, num_test=1, shift_bands=((2, 2),))
    with pytest.raises(ValueError, match="shift_bands, not bands"):
        shifts.shift_task(kind, 0, num_train=1, num_test=1, shift_bands=((2, 2),), bands=())


def test_the_time_warp_defeats_a_classifier_fit_without_it():
    """The shift is real: nearest class-mean spectra, fit at w = 1, are near chance at
    w in [1/3, 1/2] or [2, 3] while well above chance in distribution."""
    task = shifts.shift_task(
        "timewarp", 0, num_train=800, num_test=400, shift_bands=((1 / 3, 1 / 2), (2, 3))
    )

    def spectra(s):
        x = s.split.tokens.astype(float)
        return np.abs(np.fft.rfft(x - x.mean(1, keepdims=True), axis=1))

    y = task.train.split.labels
    centres = np.stack([spectra(task.train)[y == c].mean(0) for c in range(4)])

    def accuracy(s):
        d = ((spectra(s)[:, None] - centres[None]) ** 2).sum(-1)
        return (d.argmin(1) == s.split.labels).mean()

    assert accuracy(task.test_id) > 0.8 and accuracy(task.test_shift) < 0.4


# --- real recordings under a sampling-rate shift -------------------------------------------------

T_REC, N_REC = 120, 10


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """A UCR problem written here: recording r is a sine of r + 1 cycles over its T samples,
    of class r % 2, so an example's recording can be read back from its sign changes."""
    root = tmp_path_factory.mktemp("ucr")
    t = np.arange(T_REC)
    cycles = np.arange(1, N_REC + 1)
    series = np.sin(2 * np.pi * cycles[:, None] * (t + 0.5) / T_REC)
    write_problem(root, "Sines", series, (cycles % 2 == 0).astype(int))  # class of r: r % 2
    return str(root)


def _recording_of(x):
    """Recording r of an example (noise off): r + 1 cycles give 2 (r + 1) - 1 sign changes."""
    return (np.count_nonzero(np.diff(np.sign(x))) + 1) // 2 - 1


@pytest.mark.parametrize("bands", [((1.0, 1.0),), ((1.0, 2.0),)])
def test_a_recorded_example_is_its_recording_sampled_at_round_l_w_times(recordings, bands):
    kw = dict(dataset="Sines", data_dir=recordings, seq_len=64, crop=0.0, noise=0.0, bands=bands)
    x, mask, labels, warp = shifts.recorded_signals(300, 2, offset=0, **kw)
    lengths = np.round(64 * warp).astype(int)
    np.testing.assert_array_equal(mask.sum(1), lengths)
    assert x.shape[1] == round(64 * bands[0][1]) and np.all(x[~mask] == 0.0)
    for i in range(40):
        xi = x[i, : lengths[i]]
        r = _recording_of(xi)
        assert labels[i] == r % 2
        # evenly spaced over the whole recording (crop 0): the analytic sine up to the
        # example's amplitude factor and linear interpolation's error
        t = np.linspace(0, T_REC - 1, lengths[i])
        expected = np.sin(2 * np.pi * (r + 1) * (t + 0.5) / T_REC)
        assert np.corrcoef(xi, expected)[0, 1] > 0.995, (i, r)
        assert 0.8 * np.sqrt(2) - 0.05 < np.abs(xi).max() < 1.2 * np.sqrt(2) + 0.05  # z-scored


def test_test_splits_draw_only_held_out_recordings(recordings):
    kw = dict(dataset="Sines", data_dir=recordings, seq_len=64, crop=0.0, noise=0.0)
    seen = {}
    for offset in (0, 1, 2, 3):
        x, mask, *_ = shifts.recorded_signals(200, 5, offset=offset, held_out=0.4, **kw)
        seen[offset] = {_recording_of(xi) for xi in x}
    held_out = seen[1] | seen[2]
    assert len(held_out) == 4 and seen[1] == seen[2]  # 40% of 10, every one drawn
    assert not held_out & (seen[0] | seen[3]) and len(seen[0] | seen[3]) == 6
    other_seed = shifts.recorded_signals(200, 6, offset=1, held_out=0.4, **kw)[0]
    assert {_recording_of(xi) for xi in other_seed} != held_out  # the split follows the seed


def test_a_recorded_task_is_padded_tokens_with_the_problems_classes(recordings):
    task = shifts.shift_task(
        "recorded", 0, num_train=50, num_test=40, shift_bands=((1 / 3, 1 / 2), (2.0, 3.0)),
        dataset="Sines", data_dir=recordings, seq_len=32,
    )  # fmt: skip
    assert task.num_classes == 2
    assert task.train.split.tokens.shape == (50, 32) and task.train.split.mask.all()
    shifted = task.test_shift.split
    assert shifted.tokens.shape == (40, 96) and np.all(shifted.tokens[~shifted.mask] == 0)
    np.testing.assert_array_equal(shifted.mask.sum(1), np.round(32 * task.test_shift.factor))
    np.testing.assert_allclose(shifted.difficulty, np.abs(np.log(task.test_shift.factor)))
