"""digits-C: split, corruptions (against independent references where one exists), streams."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression

from metattt.data import digits_c as dc

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "rotate", "translate", "elastic"}


@pytest.fixture(scope="module")
def split():
    return dc.load_digits_split(seed=0, test_fraction=0.25)


def test_split_is_stratified_deterministic_and_normalised(split):
    x_tr, y_tr, x_te, y_te = split
    assert x_tr.shape == (1347, 8, 8) and x_te.shape == (450, 8, 8)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int32
    assert x_tr.min() == 0.0 and x_tr.max() == 1.0 and x_te.min() >= 0.0 and x_te.max() <= 1.0
    counts_tr, counts_te = np.bincount(y_tr, minlength=10), np.bincount(y_te, minlength=10)
    share = counts_te / (counts_tr + counts_te)
    assert np.all(np.abs(share - 0.25) < 0.02)
    again = dc.load_digits_split(seed=0, test_fraction=0.25)
    for a, b in zip(split, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = dc.load_digits_split(seed=1, test_fraction=0.25)
    assert not np.array_equal(other[1], y_tr)
    with pytest.raises(ValueError, match="test_fraction"):
        dc.load_digits_split(0, 1.0)


@pytest.mark.parametrize("corruption", dc.CORRUPTIONS)
def test_shapes_ranges_determinism_identity_and_monotone_severity(split, corruption):
    x = split[2]
    clean_identity = dc.corrupt_at(x, corruption, dc.IDENTITY_LEVELS[corruption], seed=3)
    np.testing.assert_array_equal(clean_identity, x)
    distances = []
    for severity in range(1, 6):
        out = dc.corrupt(x, corruption, severity, seed=3)
        assert out.shape == x.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        np.testing.assert_array_equal(out, dc.corrupt(x, corruption, severity, seed=3))
        other_seed = dc.corrupt(x, corruption, severity, seed=4)
        assert np.array_equal(out, other_seed) == (corruption not in RANDOM)
        distances.append(float(np.mean(np.abs(out - x))))
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances
    assert distances[0] > 0


def test_corruptions_match_independent_references(split):
    x = split[2][:40]
    # Contrast and brightness: closed forms.
    mean = x.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(
        dc.corrupt(x, "contrast", 2), np.clip((x - mean) * 0.4 + mean, 0, 1), atol=1e-6
    )
    np.testing.assert_allclose(dc.corrupt(x, "brightness", 3), np.clip(x + 0.3, 0, 1), atol=1e-6)
    # Blur: explicit 2-D convolution with the truncated, normalised Gaussian kernel.
    sigma = dc.LEVELS["gaussian_blur"][2]
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    k1 = np.exp(-0.5 * (t / sigma) ** 2)
    k1 /= k1.sum()
    kernel = np.outer(k1, k1)
    padded = np.pad(x.astype(np.float64), ((0, 0), (radius, radius), (radius, radius)))
    ref = np.zeros(x.shape)
    for i in range(8):
        for j in range(8):
            ref[:, i, j] = np.sum(
                padded[:, i : i + 2 * radius + 1, j : j + 2 * radius + 1] * kernel, (1, 2)
            )
    np.testing.assert_allclose(dc.corrupt(x, "gaussian_blur", 3), np.clip(ref, 0, 1), atol=1e-6)
    # Pixelate by one half: 2 x 2 block means.
    blocks = x.reshape(40, 4, 2, 4, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(
        dc.corrupt(x, "pixelate", 3), np.repeat(np.repeat(blocks, 2, 1), 2, 2), atol=1e-6
    )
    # Rotation by 90 degrees is np.rot90 in one direction or the other, image by image.
    rotated = dc.corrupt_at(x, "rotate", 90.0, seed=5)
    for img, out in zip(x, rotated, strict=True):
        assert np.allclose(out, np.rot90(img, 1), atol=1e-6) or np.allclose(
            out, np.rot90(img, -1), atol=1e-6
        )
    # Translation: ndimage.shift by d (sin phi, cos phi), with phi drawn as documented (the
    # corruption's generator, seeded by (seed, index), draws one direction per image).
    rng = np.random.default_rng(np.random.SeedSequence([6, dc.CORRUPTIONS.index("translate")]))
    phi = rng.uniform(0.0, 2.0 * np.pi, len(x))
    shifted = dc.corrupt_at(x, "translate", 1.3, seed=6)
    for img, out, p in zip(x, shifted, phi, strict=True):
        ref = ndimage.shift(img.astype(np.float64), (1.3 * np.sin(p), 1.3 * np.cos(p)), order=1)
        np.testing.assert_allclose(out, np.clip(ref, 0, 1), atol=1e-6)
    # Impulse noise: the affected pixel set grows with the severity (same draws).
    masks = [dc.corrupt(x, "impulse_noise", s, seed=7) != x for s in (1, 3, 5)]
    assert np.all(masks[0] <= masks[1]) and np.all(masks[1] <= masks[2])
    # Gaussian noise: every pixel moves at least as far at a higher severity.
    d1 = np.abs(dc.corrupt(x, "gaussian_noise", 1, seed=8) - x)
    d4 = np.abs(dc.corrupt(x, "gaussian_noise", 4, seed=8) - x)
    assert np.all(d4 >= d1 - 1e-7)


def test_classifier_accuracy_falls_with_severity(split):
    x_tr, y_tr, x_te, y_te = split
    clf = LogisticRegression(max_iter=2000).fit(x_tr.reshape(len(x_tr), -1), y_tr)
    clean = clf.score(x_te.reshape(len(x_te), -1), y_te)
    kinds = ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur")
    acc = [
        np.mean(
            [clf.score(dc.corrupt(x_te, c, s, seed=0).reshape(len(x_te), -1), y_te) for c in kinds]
        )
        for s in range(1, 6)
    ]
    print(f"clean {clean:.3f}; noise/blur mean accuracy by severity {np.round(acc, 3)}")
    assert clean > 0.93
    assert all(a > b for a, b in zip([clean] + acc[:-1], acc, strict=True)), (clean, acc)
    assert acc[-1] < clean - 0.2


def test_stream_follows_schedule(split):
    x, y = split[2], split[3]
    schedule = [(5, 8, "contrast", 4)] + dc.ramp("gaussian_noise", start=10, steps_per_severity=2)
    assert schedule[1:] == [(10 + 2 * i, 12 + 2 * i, "gaussian_noise", i + 1) for i in range(5)]
    stream = dc.make_stream(x, y, schedule, num_steps=24, batch_size=16, seed=1)
    assert stream.x.shape == (24, 16, 8, 8) and stream.y.shape == (24, 16)
    noise = dc.CORRUPTIONS.index("gaussian_noise")
    expected_sev = [0] * 5 + [4] * 3 + [0] * 2 + [1, 1, 2, 2, 3, 3, 4, 4, 5, 5] + [0] * 4
    np.testing.assert_array_equal(stream.severity, expected_sev)
    expected_c = [-1] * 5 + [dc.CORRUPTIONS.index("contrast")] * 3 + [-1] * 2 + [noise] * 10
    np.testing.assert_array_equal(stream.corruption, expected_c + [-1] * 4)
    flat = x.reshape(len(x), -1)
    for t in range(24):
        # Each batch holds distinct source images; clean steps show them unchanged.
        matches = [np.flatnonzero((flat == img.ravel()).all(1)) for img in stream.x[t]]
        if stream.severity[t] == 0:
            assert all(stream.y[t, i] in y[m] for i, m in enumerate(matches))
            assert len(np.unique(stream.x[t].reshape(16, -1), axis=0)) == 16
        else:
            assert all(len(m) == 0 for m in matches)
    again = dc.make_stream(x, y, schedule, num_steps=24, batch_size=16, seed=1)
    np.testing.assert_array_equal(again.x, stream.x)
    other = dc.make_stream(x, y, schedule, num_steps=24, batch_size=16, seed=2)
    assert not np.array_equal(other.y, stream.y)


def test_bad_arguments_raise_value_error(split):
    x, y = split[2][:20], split[3][:20]
    with pytest.raises(ValueError, match="unknown corruption"):
        dc.corrupt(x, "fog", 1)
    for severity in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="severity"):
            dc.corrupt(x, "gaussian_noise", severity)
    with pytest.raises(ValueError, match="images"):
        dc.corrupt(x.reshape(20, 64), "contrast", 1)
    with pytest.raises(ValueError, match="level"):
        dc.corrupt_at(x, "pixelate", 1.5)
    with pytest.raises(ValueError, match="overlaps"):
        dc.make_stream(
            x, y, [(0, 5, "contrast", 1), (4, 6, "rotate", 2)], num_steps=8, batch_size=4
        )
    with pytest.raises(ValueError, match="num_steps"):
        dc.make_stream(x, y, [(0, 9, "contrast", 1)], num_steps=8, batch_size=4)
    with pytest.raises(ValueError, match="severity"):
        dc.make_stream(x, y, [(0, 2, "contrast", 7)], num_steps=8, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        dc.make_stream(x, y, [], num_steps=8, batch_size=21)
    with pytest.raises(ValueError, match="labels"):
        dc.make_stream(x, y[:5], [], num_steps=8, batch_size=4)
