"""Tests of metattt.runlog: JSON lines, tensorboard event files, progress and the run record."""

from __future__ import annotations

import glob
import io
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from metattt import runlog


def _read_events(path: str) -> list[event_pb2.Event]:
    """Parses a TFRecord file (u64 length, u32 masked crc, payload, u32 masked crc) into Events."""
    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert header_crc == masked_crc32c(header)
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert payload_crc == masked_crc32c(payload)
        events.append(event_pb2.Event.FromString(payload))
        pos += 16 + length
    assert pos == len(data)
    return events


def _random_scalars(rng: np.random.Generator) -> dict:
    return {
        "loss": float(rng.normal()),
        "np_metric": np.float32(rng.uniform(0.5, 2.0)),
        "jax_metric": jnp.asarray(rng.uniform(-3.0, -1.0), jnp.float32),
        "int_metric": np.int64(rng.integers(1, 1000)),
    }


def test_jsonl_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "sub" / "metrics.jsonl"
    written = []
    with runlog.JsonlWriter(path) as w:
        for step in rng.integers(1, 10_000, size=5):
            scalars = _random_scalars(rng)
            w.write_scalars(int(step), scalars)
            w.write_image(int(step), "img", rng.uniform(size=(4, 5, 3)))  # a no-op
            written.append((int(step), {k: float(np.asarray(v)) for k, v in scalars.items()}))
    lines = path.read_text().splitlines()
    assert len(lines) == len(written)
    for line, (step, scalars) in zip(lines, written, strict=True):
        record = json.loads(line)
        assert record.pop("step") == step
        assert record == scalars  # float64 round trip through JSON is exact
        assert all(type(v) is float for v in record.values())


def test_jsonl_rejects_non_scalars_and_step_name(tmp_path):
    with runlog.JsonlWriter(tmp_path / "m.jsonl") as w:
        with pytest.raises(ValueError, match="'vec'"):
            w.write_scalars(1, {"vec": np.ones(3)})
        with pytest.raises(ValueError, match="step"):
            w.write_scalars(1, {"step": 3.0})


def test_create_writer_tensorboard_contains_scalars(tmp_path):
    rng = np.random.default_rng(1)
    steps = sorted(int(s) for s in rng.choice(1000, size=4, replace=False) + 1)
    expected = {}
    with runlog.create_writer(tmp_path) as w:
        for step in steps:
            scalars = _random_scalars(rng)
            w.write_scalars(step, scalars)
            for k, v in scalars.items():
                expected[(step, k)] = float(np.asarray(v))
        rgb = rng.uniform(size=(6, 7, 3)).astype(np.float32)
        gray = rng.integers(1, 255, size=(6, 7, 1), dtype=np.uint8)
        w.write_image(steps[-1], "rgb", rgb)
        w.write_image(steps[-1], "gray", gray)

    assert (tmp_path / "metrics.jsonl").is_file()
    files = glob.glob(os.path.join(tmp_path, "tb", "events.out.tfevents.*"))
    assert len(files) == 1
    found, images = {}, {}
    for event in _read_events(files[0]):
        for value in event.summary.value:
            if value.HasField("image"):
                images[value.tag] = value.image
            else:
                found[(event.step, value.tag)] = value.simple_value
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        # simple_value is a float32
        np.testing.assert_allclose(found[key], value, rtol=1e-6, err_msg=str(key))
    assert images["rgb"].height == 6 and images["rgb"].width == 7
    decoded = np.asarray(PIL.Image.open(io.BytesIO(images["rgb"].encoded_image_string)))
    np.testing.assert_array_equal(decoded, np.round(rgb * 255).astype(np.uint8))
    # tensorboardX stores a one-channel image as RGB with the channel repeated.
    decoded = np.asarray(PIL.Image.open(io.BytesIO(images["gray"].encoded_image_string)))
    np.testing.assert_array_equal(decoded, np.repeat(gray, 3, axis=-1))


def test_image_validation(tmp_path):
    with runlog.JsonlWriter(tmp_path / "m.jsonl") as w:
        with pytest.raises(ValueError, match="shape"):
            w.write_image(0, "bad", np.ones((3, 4, 5)))
        with pytest.raises(ValueError, match="dtype"):
            w.write_image(0, "bad", np.ones((3, 4, 3), np.int32))


def test_progress_env_var_disables(monkeypatch):
    monkeypatch.setenv("METATTT_NO_PROGRESS", "1")
    bar = runlog.progress(range(3), desc="x", disable=False)
    assert bar.disable
    assert list(bar) == [0, 1, 2]
    monkeypatch.delenv("METATTT_NO_PROGRESS")
    bar = runlog.progress(total=10, initial=4)
    assert not bar.disable and bar.n == 4
    bar.close()


def test_write_run_info(tmp_path):
    config = {
        "lr": 3e-4,
        "nested": {"layers": (2, 3), "name": "tiny", "dtype": jnp.float32},
        "seed": np.int64(7),
        "path": tmp_path,
        "nan": float("nan"),
    }
    info = runlog.write_run_info(tmp_path / "run", config)
    on_disk = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert on_disk == info
    expected_keys = {"config", "git", "python", "packages", "devices", "timestamp_utc"}
    assert expected_keys <= info.keys()
    assert info["config"]["lr"] == 3e-4
    assert info["config"]["seed"] == 7
    assert info["config"]["nested"]["layers"] == [2, 3]
    assert isinstance(info["config"]["nested"]["dtype"], str)
    assert info["config"]["path"] == str(tmp_path)
    assert info["config"]["nan"] == "nan"
    assert set(info["git"]) == {"commit", "dirty"}
    assert info["git"]["commit"] is None or len(info["git"]["commit"]) == 40
    assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy"} == set(
        info["packages"]
    )
    assert info["packages"]["jax"] == jax.__version__
    assert info["devices"]["count"] == jax.device_count()
    assert info["devices"]["platform"] == jax.devices()[0].platform


def test_write_run_info_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git executable on the PATH
    info = runlog.write_run_info(tmp_path, {"a": 1})
    assert info["git"] == {"commit": None, "dirty": None}


def _small_scan_inputs():
    rng = np.random.default_rng(3)
    shapes = ((2, 5, 4), (2, 5, 4), (4, 3), (2, 5, 3), (2, 5, 3))
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    args[2] = -jnp.exp(args[2])
    return args


def test_run_info_records_the_kernel_backends_and_refreshes_them(tmp_path):
    from kernels_pallas import selftest
    from kernels_pallas.moe_dispatch import moe_dispatch
    from kernels_pallas.selective_scan import PallasConfig, selective_scan

    selftest.reset()
    selective_scan(*_small_scan_inputs(), delta_softplus=True, backend="auto")
    info = runlog.write_run_info(tmp_path, {"a": 1})
    kind = jax.devices()[0].device_kind
    assert info["kernel_backends"] == [
        {
            "kernel": "selective_scan",
            "requested": "auto",
            "backend": "reference",
            "reason": f"the selective_scan kernel is not proven on {kind!r} "
            "(kernels_pallas.selftest)",
            "device_kind": kind,
            "jax": jax.__version__,
            "dtype": "float32",
            "config": repr(PallasConfig()),  # the default block config the self-test keys on
        }
    ]
    rng = np.random.default_rng(4)
    x, wg, wu, wd, logits = (
        jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
        for s in ((6, 4), (3, 4, 5), (3, 4, 5), (3, 5, 4), (6, 3))
    )
    moe_dispatch(x, wg, wu, wd, logits.astype(jnp.float32), top_k=2, backend="reference")
    written = runlog.record_kernel_backends(tmp_path)
    on_disk = json.loads((tmp_path / "run_info.json").read_text())
    assert on_disk["kernel_backends"] == written and written[0] == info["kernel_backends"][0]
    assert [(e["kernel"], e["backend"], e["reason"], e["dtype"]) for e in written[1:]] == [
        ("moe_dispatch", "reference", "asked for", "bfloat16")
    ]
    assert {k: v for k, v in on_disk.items() if k != "kernel_backends"} == {
        k: v for k, v in info.items() if k != "kernel_backends"
    }  # the rest of the record is kept
    assert runlog.record_kernel_backends(tmp_path / "no_run") is None
    assert not (tmp_path / "no_run").exists()
    selftest.reset()
