"""Every bad input is a one-line error naming the argument or file, raised before heavy work.

One table per layer (config values, library arguments, loaders); each case asserts the
message. Cases the CLI owns (config files, workdirs) are in tests/experiments/test_harness.py
and test_sinusoid_experiment.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metattt as mt
from attd.lra import listops, pathfinder
from configs import energy_moe, forecasting, sinusoid, tta_protocol
from experiments import harness
from metattt.data import sessions, ucr

CONFIG_CASES = [
    (sinusoid, "train.meta_lr", 0.0, "config.train.meta_lr must be a finite learning rate > 0"),
    (sinusoid, "train.meta_lr", float("nan"), "config.train.meta_lr must be a finite learning"),
    (sinusoid, "inner.lr", -0.1, "config.inner.lr must be a finite learning rate > 0"),
    (sinusoid, "train.meta_batch", 0, "config.train.meta_batch must be a positive int"),
    (sinusoid, "train.steps_per_call", 0, "config.train.steps_per_call must be a positive int"),
    (sinusoid, "train.checkpoint_every", 0, "config.train.checkpoint_every must be a positive"),
    (sinusoid, "seeds", (), "config.seeds is empty"),
    (sinusoid, "seeds", (0, 1, 1), "config.seeds repeats seed\\(s\\) \\[1\\]"),
    (sinusoid, "train.clip_norm", float("nan"), "config.train.clip_norm must be finite and > 0"),
    (energy_moe, "train.batch", 0, "config.train.batch must be a positive int"),
    (energy_moe, "ttt.lr", 0.0, "config.ttt.lr must be a finite learning rate > 0"),
    (forecasting, "meta.steps", -2, "config.meta.steps must be a positive int"),
    (tta_protocol, "train.num_steps", 0, "config.train.num_steps must be a positive int"),
]


@pytest.mark.parametrize("module, key, value, message", CONFIG_CASES)
def test_config_values(module, key, value, message):
    cfg = module.get_config("tiny")
    *sections, field = key.split(".")
    node = cfg
    for s in sections:
        node = node[s]
    with cfg.ignore_type():
        node[field] = value
    with pytest.raises(ValueError, match=message) as info:
        harness.check_config(cfg)
    assert "\n" not in str(info.value)
    harness.check_config(module.get_config("tiny"))  # the shipped config passes


def _loss(p, batch):
    return jnp.mean((batch @ p["w"] + p["b"]) ** 2)


PARAMS = {"w": jnp.arange(1.0, 4.0), "b": jnp.float32(0.5)}
BATCH = jnp.ones((2, 3))


def _adapt(fast, slow, **kw):
    return mt.adapt(_loss, fast, slow, BATCH, **{"opt": optax.sgd(0.1), "max_steps": 2, **kw})


def _halves():
    return mt.split(PARAMS, mt.select(PARAMS, "re:^w$"))


LIBRARY_CASES = [
    ("clip_norm nan", lambda: _adapt(*_halves(), clip_norm=float("nan")), "clip_norm must be"),
    ("clip_norm 0", lambda: _adapt(*_halves(), clip_norm=0.0), "clip_norm must be a finite"),
    ("num_steps > max", lambda: _adapt(*_halves(), num_steps=3), "num_steps must be in \\[0, "),
    ("whole tree twice", lambda: _adapt(PARAMS, PARAMS), "did you mean fast, slow = metat"),
    ("unrelated trees", lambda: _adapt(*_halves()[:1], {"x": 1.0}), "not two halves of one"),
    ("no fast leaves", lambda: _adapt({"w": None, "b": None}, PARAMS), "no fast parameters"),
    ("empty selector", lambda: mt.select(PARAMS, "re:nothing"), "selects no"),
    ("unknown preset", lambda: mt.select(PARAMS, "layernrom"), "unknown"),
    ("fit steps_per_call", lambda: mt.fit(lambda s, b: (s, {}), 0, lambda i: i, num_steps=10,
                                          steps_per_call=3), "num_steps=10 must be a multiple"),
    ("inner sgd lr 0", lambda: mt.inner.sgd(0.0), "learning_rate must be a number with 0 <"),
    ("inner sgd lr > 1", lambda: mt.inner.sgd(1.5), "0 < \\|learning_rate\\| <= 1 \\(optax"),
    ("inner sgd lr nan", lambda: mt.inner.sgd(float("nan")), "learning_rate must be a number"),
    ("supervised clip", lambda: mt.supervised(_loss, optax.sgd(0.1), clip_norm=-1.0),
     "clip_norm must be a finite positive"),
]  # fmt: skip


@pytest.mark.parametrize("name, call, message", LIBRARY_CASES, ids=[c[0] for c in LIBRARY_CASES])
def test_library_arguments(name, call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value), name


def test_a_traced_step_count_out_of_range_is_clamped_as_documented():
    fast, slow = _halves()
    run = jax.jit(lambda k: _adapt(fast, slow, num_steps=k).active)
    np.testing.assert_array_equal(run(-3), [False, False])
    np.testing.assert_array_equal(run(99), [True, True])


def _listops_header_only(tmp_path):
    path = tmp_path / "basic_test.tsv"
    path.write_text("Source\tTarget\n")
    return lambda: listops.load_listops_tsv(path), f"{path} has a header but no rows"


def _pathfinder(tmp_path, lines, image=None):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "0.npy").write_text(lines)
    if image is not None:
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "a.png").write_bytes(image)
    return lambda: pathfinder.load_pathfinder(tmp_path)


def _png_bytes(tmp_path):
    from PIL import Image

    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "x.png")
    return (tmp_path / "x.png").read_bytes()


def _pathfinder_empty(tmp_path):
    return _pathfinder(tmp_path, ""), "lists no image"


def _pathfinder_label_7(tmp_path):
    return _pathfinder(tmp_path, "imgs a.png 0 7\n", _png_bytes(tmp_path)), "label 7 is not 0 or 1"


def _pathfinder_truncated(tmp_path):
    data = _png_bytes(tmp_path)
    return _pathfinder(tmp_path, "imgs a.png 0 1\n", data[: len(data) // 2]), "a.png is unreadable"


def _session_transposed(tmp_path):
    np.save(tmp_path / "s.npy", np.random.default_rng(0).normal(size=(2000, 50)))
    return lambda: sessions.load_sessions(tmp_path), "s.npy: 2000 neurons but only 50 time"


_TS_HEAD = "@problemName P\n@univariate true\n@classLabel true a b\n@data\n"


def _ts(tmp_path, text):
    path = tmp_path / "P_TRAIN.ts"
    path.write_text(text)
    return path


def _ucr_header_only(tmp_path):
    path = _ts(tmp_path, _TS_HEAD)
    return lambda: ucr.read_ts(path), f"{path}: no series after the header"


def _ucr_unknown_label(tmp_path):
    path = _ts(tmp_path, _TS_HEAD + "1,2,3:a\n4,5,6:c\n")
    return lambda: ucr.read_ts(path), r"labels \['c'\] are not in @classLabel"


def _ucr_multivariate(tmp_path):
    path = _ts(tmp_path, _TS_HEAD + "1,2,3:4,5,6:a\n")
    return lambda: ucr.read_ts(path), f"{path}:5: 2 dimensions; only univariate"


def _ucr_missing_value(tmp_path):
    path = _ts(tmp_path, _TS_HEAD + "1,?,3:a\n")
    return lambda: ucr.read_ts(path), f"{path}:5: a value is not a number"


def _ucr_unequal_lengths(tmp_path):
    path = _ts(tmp_path, _TS_HEAD + "1,2,3:a\n1,2:b\n")
    return lambda: ucr.read_ts(path), r"series of unequal lengths \[2, 3\]"


LOADER_CASES = [
    _ucr_header_only,
    _ucr_unknown_label,
    _ucr_multivariate,
    _ucr_missing_value,
    _ucr_unequal_lengths,
    _listops_header_only,
    _pathfinder_empty,
    _pathfinder_label_7,
    _pathfinder_truncated,
    _session_transposed,
]


@pytest.mark.parametrize("case", LOADER_CASES, ids=[c.__name__[1:] for c in LOADER_CASES])
def test_loaders(case, tmp_path):
    call, message = case(tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
