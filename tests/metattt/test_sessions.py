"""Multi-session generator, on-disk loader, padding and windows, against explicit references.

Sizes are tiny (<= 3 sessions, <= 12 neurons, T <= 200). The references are written out here:
an Euler step, the calcium recursion, the drift rotation, and per-window slicing loops.
"""

import json

import numpy as np
import pytest
from scipy import signal

from metattt.data import sessions as S

TINY = dict(num_steps=200, min_neurons=6, max_neurons=12, burn_in=100)
# A small latent system whose observed units (8) are few enough to regress on in 100 samples.
SMALL = dict(TINY, num_regions=2, units_per_region=16, observed_fraction=0.25, fan_in=4)


def _drive_from_signal(session):
    """Invert the observation model of a noise-free session: data -> calcium -> rate -> drive."""
    tr = session.truth
    calcium = (session.data.astype(np.float64) - tr.offsets[:, None]) / tr.gains[:, None]
    a = tr.calcium_decay
    rates = (calcium[:, 1:] - a * calcium[:, :-1]) / (1.0 - a)
    return np.log(np.expm1(rates))  # softplus^-1, drive for t = 1..T-1


def test_shapes_meta_and_determinism():
    sessions = S.generate_sessions(3, 0, **TINY)
    again = S.generate_sessions(3, 0, **TINY)
    later = S.generate_sessions(2, 0, first_session_id=1, **TINY)
    for i, s in enumerate(sessions):
        n = s.meta["num_neurons"]
        assert 6 <= n <= 12
        assert s.data.shape == (n, 200) and s.data.dtype == np.float32
        assert s.meta == {
            "session_id": i,
            "num_neurons": n,
            "num_steps": 200,
            "drift": 0.0,
            "seed": 0,
        }
        assert np.all(np.isfinite(s.data))
        np.testing.assert_array_equal(s.data, again[i].data)
        assert json.loads(json.dumps(s.meta)) == s.meta
    # A session depends on (seed, session_id) only, not on how many were generated.
    for s, t in zip(sessions[1:], later, strict=True):
        np.testing.assert_array_equal(s.data, t.data)
        assert s.meta == t.meta
    other = S.generate_sessions(1, 1, **TINY)[0]
    assert not np.array_equal(other.truth.coupling, sessions[0].truth.coupling)


def test_sessions_share_dynamics_but_differ_in_observation():
    sessions = S.generate_sessions(3, 0, **TINY)
    first = sessions[0].truth
    for s in sessions[1:]:
        tr = s.truth
        np.testing.assert_array_equal(tr.coupling, first.coupling)  # one shared system
        assert not np.allclose(tr.latents[:, 0], first.latents[:, 0])  # own initial state
        # Different neurons: observed subsets and loadings differ substantially.
        used, used0 = np.any(tr.loadings != 0, 0), np.any(first.loadings != 0, 0)
        assert np.any(used != used0)
        n = min(tr.loadings.shape[0], first.loadings.shape[0])
        diff = np.linalg.norm(tr.loadings[:n] - first.loadings[:n])
        assert diff > 0.8 * np.linalg.norm(first.loadings[:n])
        assert not np.allclose(tr.gains[:n], first.gains[:n])
    # Loadings: fan_in nonzero entries per row, row norm = loading_scale * |N(0, I)| / sqrt(k).
    cfg = S.SessionConfig()
    assert np.all(np.count_nonzero(first.loadings, axis=1) == cfg.fan_in)
    jittered = S.generate_sessions(2, 0, dynamics_jitter=0.2, **TINY)
    assert not np.array_equal(jittered[0].truth.coupling, jittered[1].truth.coupling)


def test_latents_follow_the_euler_rnn_and_are_chaotic():
    cfg = S.SessionConfig(**dict(TINY, substeps=1, process_noise=0.0))
    s = S.generate_sessions(1, 2, cfg)[0]
    x = s.truth.latents.astype(np.float64)
    j = s.truth.coupling
    # Independent reference: one Euler step x + dt (-x + J tanh x) per recorded sample.
    expected = x[:, :-1] + cfg.dt * (-x[:, :-1] + j @ np.tanh(x[:, :-1]))
    np.testing.assert_allclose(x[:, 1:], expected, rtol=1e-5, atol=1e-5)
    # Within-region blocks have variance g^2 / M; the 64 x 64 block estimates it to ~3%.
    m = cfg.units_per_region
    np.testing.assert_allclose(np.var(j[:m, :m]) * m, cfg.gain**2, rtol=0.1)
    # g = 1.8: activity persists without noise (the system was accepted by the probe) ...
    chaotic = S.generate_sessions(1, 2, **dict(TINY, process_noise=0.0))[0]
    assert np.tanh(chaotic.truth.latents[:, 100:]).std(axis=1).mean() > 0.2
    # ... and two sessions of one system, started apart, stay apart (no common fixed point).
    pair = S.generate_sessions(2, 2, **dict(TINY, process_noise=0.0))
    assert np.abs(pair[0].truth.latents[:, -1] - pair[1].truth.latents[:, -1]).mean() > 0.1
    # g = 0.5 is contracting: it decays to the fixed point 0; the probe must be switched off.
    stable = S.generate_sessions(1, 2, **dict(TINY, gain=0.5, process_noise=0.0, min_activity=0))
    assert np.abs(stable[0].truth.latents[:, -1]).max() < 1e-6
    with pytest.raises(ValueError, match="min_activity"):
        S.generate_sessions(1, 2, **dict(TINY, gain=0.5))


def _high_frequency_share(x):
    """Share of (Hann-windowed, detrended) power at frequencies >= 1/4 cycle per sample."""
    f, p = signal.periodogram(x, window="hann", detrend="linear", axis=-1)
    return p[:, f >= 0.25].sum() / p.sum()


def test_calcium_recursion_and_smoothing():
    s = S.generate_sessions(1, 3, noise_std=0.0, calcium_tau=3.0, **TINY)[0]
    tr = s.truth
    a = np.exp(-1.0 / 3.0)
    assert tr.calcium_decay == pytest.approx(a)
    calcium = (s.data.astype(np.float64) - tr.offsets[:, None]) / tr.gains[:, None]
    # Independent reference: c_t = a c_{t-1} + (1 - a) r_t.
    np.testing.assert_allclose(
        calcium[:, 1:], a * calcium[:, :-1] + (1 - a) * tr.rates[:, 1:], rtol=1e-5, atol=1e-5
    )
    # The kernel's power gain |H(f)|^2 = (1-a)^2 / (1 - 2a cos 2 pi f + a^2) is <= 0.054 for
    # f >= 1/4, so the high-frequency share of power must fall well below the rates'.
    assert _high_frequency_share(calcium) < 0.2 * _high_frequency_share(tr.rates)
    raw = S.generate_sessions(1, 3, noise_std=0.0, calcium_tau=0.0, **TINY)[0]
    np.testing.assert_allclose(
        (raw.data - raw.truth.offsets[:, None]) / raw.truth.gains[:, None],
        raw.truth.rates,
        rtol=1e-5,
        atol=1e-5,
    )
    # Observation noise: data - clean is N(0, noise_std^2).
    noisy = S.generate_sessions(1, 3, noise_std=0.1, calcium_tau=3.0, **TINY)[0]
    residual = noisy.data.astype(np.float64) - s.data
    assert abs(residual.std() - 0.1) < 0.01 and abs(residual.mean()) < 0.01


def test_drift_zero_is_stationary():
    s = S.generate_sessions(1, 4, noise_std=0.0, **SMALL)[0]
    tr = s.truth
    np.testing.assert_array_equal(tr.angles, 0.0)
    for t in range(200):
        np.testing.assert_array_equal(tr.loadings_at(t), tr.loadings)
    # The signal is the same function of the latents at every time: the drive recovered from
    # the observed signal is L0 tanh(x_t) throughout.
    drive = _drive_from_signal(s)
    np.testing.assert_allclose(drive, tr.loadings @ np.tanh(tr.latents[:, 1:]), atol=2e-3)
    # Statistic of the signal per half: the loadings regressed from each half agree.
    observed = np.flatnonzero(np.any(tr.loadings != 0, 0) | np.any(tr.loadings_perp != 0, 0))
    x = np.tanh(tr.latents[observed, 1:].astype(np.float64))
    fits = [
        np.linalg.lstsq(x[:, half].T, drive[:, half].T, rcond=None)[0]
        for half in (slice(0, 99), slice(99, None))
    ]
    np.testing.assert_allclose(fits[0], fits[1], atol=1e-3)
    np.testing.assert_allclose(fits[0].T, tr.loadings[:, observed], atol=1e-3)
    # The recording's time origin does not matter: starting 50 samples later gives the same data.
    later = S.generate_sessions(1, 4, noise_std=0.0, **dict(SMALL, burn_in=150, num_steps=150))[0]
    np.testing.assert_allclose(later.data, s.data[:, 50:], rtol=1e-6, atol=1e-6)
    drifting = S.generate_sessions(1, 4, noise_std=0.0, drift=0.2, **dict(SMALL, burn_in=150))
    assert not np.allclose(drifting[0].data[:, :150], s.data[:, 50:], atol=1e-3)


@pytest.mark.parametrize("magnitude", [0.1, 0.2, 0.3])
def test_drift_rotates_loadings_by_the_magnitude(magnitude):
    s = S.generate_sessions(1, 5, noise_std=0.0, drift=magnitude, **TINY)[0]
    tr = s.truth
    l0 = tr.loadings
    rel = lambda t: np.linalg.norm(tr.loadings_at(t) - l0) / np.linalg.norm(l0)
    assert rel(0) == 0.0
    np.testing.assert_allclose(rel(199), magnitude, rtol=1e-9)
    # Smooth: the angle grows linearly, so the change at mid-session is about half of it.
    theta_end = 2 * np.arcsin(magnitude / 2)
    np.testing.assert_allclose(tr.angles, theta_end * np.arange(200) / 199, rtol=1e-12)
    np.testing.assert_allclose(rel(99), 2 * np.sin(theta_end * 99 / 199 / 2), rtol=1e-9)
    assert abs(rel(99) - magnitude / 2) < 0.01 * magnitude
    # A rotation: row norms are kept and each partner row is orthogonal to its row.
    np.testing.assert_allclose(
        np.linalg.norm(tr.loadings_at(199), axis=1), np.linalg.norm(l0, axis=1), rtol=1e-12
    )
    np.testing.assert_allclose(np.sum(l0 * tr.loadings_perp, axis=1), 0.0, atol=1e-12)
    # The signal follows L(t) (not L0) at every time.
    x = np.tanh(tr.latents[:, 1:].astype(np.float64))
    expected = np.stack([tr.loadings_at(t) @ x[:, t - 1] for t in range(1, 200)], axis=1)
    np.testing.assert_allclose(_drive_from_signal(s), expected, atol=2e-3)
    # Common random numbers: only the loadings' rotation differs from the drift-0 session.
    still = S.generate_sessions(1, 5, noise_std=0.0, **TINY)[0]
    np.testing.assert_array_equal(still.truth.latents, tr.latents)
    np.testing.assert_array_equal(still.truth.loadings, l0)
    np.testing.assert_array_equal(still.data[:, 0], s.data[:, 0])
    gap = np.abs(still.data - s.data)
    assert gap[:, :50].mean() < gap[:, -50:].mean()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="drift"):
        S.generate_sessions(1, 0, drift=2.5)
    with pytest.raises(ValueError, match="max_neurons"):
        S.generate_sessions(1, 0, min_neurons=5, max_neurons=4)
    with pytest.raises(ValueError, match="calcium_tau"):
        S.generate_sessions(1, 0, calcium_tau=-1.0)
    with pytest.raises(ValueError, match="num_sessions"):
        S.generate_sessions(0, 0)
    with pytest.raises(ValueError, match="unknown SessionConfig fields"):
        S.generate_sessions(1, 0, neurons=3)


def test_loader_round_trip(tmp_path):
    sessions = S.generate_sessions(3, 0, **TINY)
    for s in sessions:
        S.save_session(tmp_path / f"session_{s.meta['session_id']:02d}", s)
    bare = np.random.default_rng(0).normal(size=(4, 50))
    np.save(tmp_path / "z_bare.npy", bare)  # float64, no metadata
    loaded = S.load_sessions(tmp_path)
    assert len(loaded) == 4
    for s, back in zip(sessions, loaded, strict=False):
        np.testing.assert_array_equal(back.data, s.data)
        assert back.meta == {**s.meta, "name": f"session_{s.meta['session_id']:02d}"}
        assert back.truth is None
    assert loaded[3].data.dtype == np.float32
    np.testing.assert_allclose(loaded[3].data, bare, rtol=1e-6)
    assert loaded[3].meta == {"session_id": 3, "num_neurons": 4, "name": "z_bare"}


@pytest.mark.parametrize(
    "write, error, match",
    [
        (lambda d: np.save(d / "a.npy", np.zeros((2, 3, 4), np.float32)), ValueError, "2-D"),
        (lambda d: np.save(d / "a.npy", np.zeros((2, 3), np.int32)), ValueError, "floating"),
        (lambda d: np.save(d / "a.npy", np.full((2, 3), np.nan)), ValueError, "non-finite"),
        (lambda d: (d / "a.npy").write_text("not an array"), ValueError, "not a readable"),
        (
            lambda d: np.save(d / "a.npy", np.array([{"x": 1}], object), allow_pickle=True),
            ValueError,
            "not a readable",
        ),
        (lambda d: None, ValueError, "no .npy files"),
    ],
)
def test_loader_rejects_bad_files(tmp_path, write, error, match):
    write(tmp_path)
    with pytest.raises(error, match=match) as info:
        S.load_sessions(tmp_path)
    if "npy" not in match:
        assert "a.npy" in str(info.value)  # the message names the file


def test_loader_rejects_bad_metadata_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.load_sessions(tmp_path / "missing")
    np.save(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(NotADirectoryError):
        S.load_sessions(tmp_path / "a.npy")
    (tmp_path / "a.json").write_text("{oops")
    with pytest.raises(ValueError, match="a.json: invalid JSON"):
        S.load_sessions(tmp_path)
    (tmp_path / "a.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        S.load_sessions(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"num_neurons": 5}))
    with pytest.raises(ValueError, match="num_neurons = 5"):
        S.load_sessions(tmp_path)
    with pytest.raises(ValueError, match="2-D"):
        S.save_session(tmp_path / "b", S.Session(np.zeros(3, np.float32), {}))


def test_padding_and_unit_ids():
    sessions = S.generate_sessions(3, 0, **TINY)
    counts = [s.meta["num_neurons"] for s in sessions]
    padded = S.pad_sessions(sessions, max_neurons=12)
    assert padded.data.shape == (3, 12, 200) and padded.mask.shape == (3, 12)
    for i, s in enumerate(sessions):
        np.testing.assert_array_equal(padded.data[i, : counts[i]], s.data)
        np.testing.assert_array_equal(padded.data[i, counts[i] :], 0.0)
        np.testing.assert_array_equal(padded.mask[i], np.arange(12) < counts[i])
    ids = S.assign_unit_ids(counts, 12, start=5)
    flat = np.concatenate([ids[i, : counts[i]] for i in range(3)])
    np.testing.assert_array_equal(flat, 5 + np.arange(sum(counts)))
    np.testing.assert_array_equal(ids[~padded.mask], 0)
    with pytest.raises(ValueError, match="max_neurons"):
        S.pad_sessions(sessions, max_neurons=min(counts) - 1 if max(counts) > 1 else 0)
    with pytest.raises(ValueError, match="time steps"):
        S.pad_sessions([np.zeros((2, 5)), np.zeros((2, 6))])


def test_windows_match_a_slicing_loop_and_split_without_leakage():
    data = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32)
    mask = np.array([True, True, False, True, False])
    ids = np.array([3, 4, 0, 9, 0], np.int32)
    w = S.session_windows(
        data, context=6, horizon=3, stride=4, mask=mask, unit_ids=ids, session_id=7
    )
    starts = list(range(0, 40 - 9 + 1, 4))
    np.testing.assert_array_equal(w.start, starts)
    for k, t in enumerate(starts):
        np.testing.assert_array_equal(w.context[k], data[:, t : t + 6])
        np.testing.assert_array_equal(w.target[k], data[:, t + 6 : t + 9])
    np.testing.assert_array_equal(w.mask, np.broadcast_to(mask, (len(starts), 5)))
    np.testing.assert_array_equal(w.unit_ids[0], ids)
    np.testing.assert_array_equal(w.session_id, 7)

    task = S.session_task(data, context=6, horizon=3, support_fraction=0.5)
    cut = 20
    assert np.all(task.support.start + 9 <= cut) and np.all(task.query.start >= cut)
    np.testing.assert_array_equal(task.support.start, [0, 9])
    np.testing.assert_array_equal(task.query.start, [20, 29])

    sessions = S.generate_sessions(3, 0, **TINY)
    padded = S.pad_sessions(sessions)
    n = padded.mask.shape[1]
    unit_ids = S.assign_unit_ids([s.meta["num_neurons"] for s in sessions], n)
    tasks = S.stack_session_tasks(
        padded.data, padded.mask, unit_ids, np.array([0, 1, 2]), context=16, horizon=4
    )
    assert tasks.support.context.shape == (3, 5, n, 16)
    assert tasks.query.target.shape == (3, 5, n, 4)
    np.testing.assert_array_equal(tasks.query.session_id[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(tasks.support.mask[:, 0], padded.mask)
    np.testing.assert_array_equal(
        tasks.query.context[1, 0], padded.data[1, :, 100:116]
    )  # first query window starts at the cut
