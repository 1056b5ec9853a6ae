"""Side effects at the edge of a run: metric writers, progress bars and the run record.

Everything here runs outside ``jit``. A training or evaluation loop hands host-side scalars to a
:class:`MetricWriter`; :func:`create_writer` gives the standard pair for a work directory
(JSON lines for scripts, tensorboardX events for eyes). :func:`progress` is a tqdm bar on stderr
that ``METATTT_NO_PROGRESS=1`` silences, and :func:`write_run_info` records what produced a run
(config, git commit, package versions, devices, the kernel backends ``"auto"`` resolved to) in
``run_info.json`` beside its results; :func:`record_kernel_backends` refreshes that last field
at the end of a run, once the model has been traced.

Example:
    >>> with create_writer("/tmp/run") as writer:  # doctest: +SKIP
    ...     for step in progress(range(100), desc="train"):
    ...         writer.write_scalars(step, {"loss": 1.0 / (step + 1)})
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, final

import numpy as np
import tqdm

from metattt import atomic

__all__ = [
    "JsonlWriter",
    "MemoryWriter",
    "MetricWriter",
    "MultiWriter",
    "TensorboardWriter",
    "create_writer",
    "progress",
    "read_metrics",
    "record_kernel_backends",
    "write_run_info",
]

_NO_PROGRESS_ENV = "METATTT_NO_PROGRESS"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy")


# ------------------------------------------------------------------------------------------------
# Metric writers
# ------------------------------------------------------------------------------------------------


class MetricWriter(abc.ABC):
    """Where a run's scalars and images go; implementations are final, compose with MultiWriter.

    A writer is also a context manager that closes itself on exit.
    """

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records named scalars (Python, numpy or jax 0-d values) at ``step``."""

    @abc.abstractmethod
    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Records an image at ``step``.

        Args:
          step: the global step.
          name: the image's tag.
          image: ``[H, W, C]`` with ``C`` in {1, 3, 4}; ``uint8`` in [0, 255] or floating point in
            [0, 1] (clipped to that range).
        """

    @abc.abstractmethod
    def flush(self) -> None:
        """Pushes buffered records to disk."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flushes and releases the writer; further writes are an error."""

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _to_float(name: str, value: Any) -> float:
    """Converts a 0-d Python, numpy or jax value to a Python float, naming it on failure."""
    arr = np.asarray(value)  # a jax array is copied to the host here
    if arr.size != 1:
        raise ValueError(f"scalar {name!r} has shape {arr.shape}; expected a single value")
    return float(arr.reshape(()))


def _image_to_uint8(name: str, image: np.ndarray) -> np.ndarray:
    """Checks an ``[H, W, C]`` image; converts it to ``uint8`` (floats: clip to [0, 1], round)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image {name!r} has shape {img.shape}; expected [H, W, C], C in 1, 3, 4")
    if img.dtype == np.uint8:
        return img
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"image {name!r} has dtype {img.dtype}; expected uint8 or float in [0, 1]")
    # tensorboardX would multiply by 255 and cast, wrapping values outside [0, 1] around.
    img = np.clip(np.nan_to_num(img.astype(np.float32)), 0.0, 1.0)
    return np.round(img * 255.0).astype(np.uint8)


@final
class JsonlWriter(MetricWriter):
    """Writes one JSON object per call, ``{"step": s, "name": value, ...}``, one per line.

    The file is opened for appending, so a resumed run continues the same file. Values are
    Python floats; NaN and infinities are written as ``NaN`` / ``Infinity``, which Python's
    ``json`` reads back. Images are not stored: :meth:`write_image` is a no-op, as a text log is
    no place for pixels (the tensorboard writer keeps them).
    """

    def __init__(self, path: str | os.PathLike[str]):
        """Opens (appending) ``path``, creating its parent directory."""
        self.path = os.path.abspath(os.fspath(path))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends ``{"step": step, **scalars}`` as one line."""
        if "step" in scalars:
            raise ValueError("a scalar may not be named 'step' (it is the line's step key)")
        record: dict[str, Any] = {"step": int(step)}
        record.update({str(k): _to_float(k, v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Does nothing: JSON lines hold scalars only (the image is still validated)."""
        del step
        _image_to_uint8(name, image)

    def flush(self) -> None:
        """Flushes the file to the operating system."""
        self._file.flush()

    def close(self) -> None:
        """Closes the file (idempotent)."""
        if not self._file.closed:
            self._file.close()


@final
class TensorboardWriter(MetricWriter):
    """Writes tensorboard event files with tensorboardX.

    Scalars are stored as the events' ``simple_value``, a float32: expect float32 precision when
    reading them back. Images need Pillow, which tensorboardX does not declare.
    """

    def __init__(self, logdir: str | os.PathLike[str]):
        """Creates ``logdir`` and a ``SummaryWriter`` writing a new event file into it."""
        from tensorboardX import SummaryWriter  # deferred: heavy import, only writers need it

        self.logdir = os.path.abspath(os.fspath(logdir))
        os.makedirs(self.logdir, exist_ok=True)
        self._writer = SummaryWriter(logdir=self.logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Adds one scalar event per name."""
        for name, value in scalars.items():
            self._writer.add_scalar(str(name), _to_float(name, value), global_step=int(step))

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Adds one ``HWC`` image event."""
        img = _image_to_uint8(name, image)
        self._writer.add_image(str(name), img, global_step=int(step), dataformats="HWC")

    def flush(self) -> None:
        """Flushes pending events to the event file."""
        self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file."""
        self._writer.close()


@final
class MemoryWriter(MetricWriter):
    """Keeps every record in memory: ``history`` is a list of ``(step, {name: float})``.

    For notebooks and for callers that want a run's last metrics (e.g. the final training loss
    after :func:`metattt.train.fit`) without reading a file back.
    """

    def __init__(self):
        """Starts with an empty history."""
        self.history: list[tuple[int, dict[str, float]]] = []

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends ``(step, scalars as floats)``."""
        self.history.append((int(step), {str(k): _to_float(k, v) for k, v in scalars.items()}))

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Does nothing: only scalars are kept (the image is still validated)."""
        del step
        _image_to_uint8(name, image)

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to release; the history stays readable."""

    def last(self, name: str) -> float:
        """The newest value of ``name``; KeyError when it was never written."""
        for _, scalars in reversed(self.history):
            if name in scalars:
                return scalars[name]
        raise KeyError(f"no scalar named {name!r} was written")


@final
class MultiWriter(MetricWriter):
    """Fans every call out to several writers, in order."""

    def __init__(self, writers: Sequence[MetricWriter]):
        """Keeps ``writers``; closing this writer closes them all."""
        self.writers = tuple(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Writes the scalars to every writer."""
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Writes the image to every writer."""
        for w in self.writers:
            w.write_image(step, name, image)

    def flush(self) -> None:
        """Flushes every writer."""
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        """Closes every writer."""
        for w in self.writers:
            w.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """The records of a :class:`JsonlWriter` file, one per step, in step order.

    A resumed run logs the steps after its last checkpoint a second time (with the same values,
    as they are recomputed exactly); the last record of each step is kept. A missing file reads
    as no records; a torn last line (a kill during a write) is skipped.
    """
    by_step: dict[int, dict[str, float]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}: line {i + 1} is not a JSON record") from None
        by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def create_writer(workdir: str | os.PathLike[str]) -> MultiWriter:
    """The standard writer of a run: ``workdir/metrics.jsonl`` plus tensorboard in ``workdir/tb``.

    In a multi-process run only process 0 writes: the others get a writer that discards
    everything (every process logs the same replicated metrics, and two writers would
    interleave their lines in one file).

    Args:
      workdir: the run's directory; created if missing (by process 0).

    Returns:
      A :class:`MultiWriter` over a :class:`JsonlWriter` and a :class:`TensorboardWriter`
      (over no writer on processes other than 0).
    """
    from metattt import multihost  # deferred: imports jax

    if not multihost.is_primary():
        return MultiWriter([])
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    return MultiWriter(
        [
            JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
            TensorboardWriter(os.path.join(workdir, "tb")),
        ]
    )


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    initial: int = 0,
    disable: bool | None = None,
) -> tqdm.tqdm:
    """A tqdm progress bar on stderr.

    Args:
      iterable: what to iterate over, or None for a bar advanced by hand with ``update``.
      total: the expected number of iterations (taken from ``len(iterable)`` when it has one).
      desc: a prefix for the bar.
      initial: where the bar starts, e.g. the step a resumed run starts from.
      disable: True hides the bar; None (the default) hides it only when the environment
        variable ``METATTT_NO_PROGRESS`` is ``1``, which also overrides False.

    Returns:
      The ``tqdm.tqdm`` instance (iterate over it, or call ``update`` / ``set_postfix``).
    """
    env_off = os.environ.get(_NO_PROGRESS_ENV, "") == "1"
    return tqdm.tqdm(
        iterable,
        total=total,
        desc=desc,
        initial=initial,
        disable=env_off or bool(disable),
        file=sys.stderr,
        dynamic_ncols=True,
    )


# ------------------------------------------------------------------------------------------------
# Run record
# ------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Converts a config value to plain JSON types; anything unknown becomes ``str(value)``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # strict JSON has no NaN
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "to_dict") and callable(value.to_dict):  # ml_collections.ConfigDict
        return _jsonable(value.to_dict())
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


def _git(args: Sequence[str], cwd: str) -> str | None:
    """Runs ``git args`` in ``cwd``; None when git is missing, fails or is not in a checkout."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _git_info() -> dict[str, Any]:
    """The commit and dirty flag of the git checkout this package's code lives in."""
    here = os.path.dirname(os.path.abspath(__file__))
    commit = _git(["rev-parse", "HEAD"], here)
    if not commit:
        return {"commit": None, "dirty": None}
    status = _git(["status", "--porcelain"], here)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on; None for a missing one."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _device_info() -> dict[str, Any]:
    """Platform, kind and count of the JAX devices (of all processes), and the process
    count (never raises)."""
    try:
        import jax

        devices = jax.devices()
    except Exception as e:  # a run record must not crash the run
        return {"platform": None, "device_kind": None, "count": 0, "error": repr(e)}
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "count": len(devices),
        "processes": jax.process_count(),
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _kernel_backends() -> list[dict[str, str]]:
    """What each Pallas-backed function's ``backend`` resolved to in this process, and why
    (:func:`kernels_pallas.selftest.resolutions`; empty before any such function is traced)."""
    from kernels_pallas import selftest

    return selftest.resolutions()


#: run_info.json: indented, key-sorted, strict JSON (no NaN).
_JSON_STYLE = {"indent": 2, "sort_keys": True, "allow_nan": False}


def write_run_info(workdir: str | os.PathLike[str], config: Mapping[str, Any]) -> dict[str, Any]:
    """Writes ``workdir/run_info.json``: what produced this run, to report it and to reproduce it.

    The record holds the resolved config as plain JSON (values JSON cannot hold become their
    ``str``), the git commit of the checkout this code lives in with a ``dirty`` flag (both None
    outside a git checkout or without git), the Python version, the versions of jax, jaxlib,
    flax, optax, orbax-checkpoint, chex and numpy (None when not installed), the JAX devices, the
    CPU model and core count, a UTC timestamp, and ``kernel_backends``: the backends the
    selective scan and MoE dispatch resolved to so far, with the reason (see
    :func:`record_kernel_backends`). The file is replaced atomically.

    Args:
      workdir: the run's directory; created if missing.
      config: the resolved configuration (a mapping, or anything with ``to_dict()``).

    Returns:
      The record, as written.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    info = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "config": _jsonable(config),
        "git": _git_info(),
        "python": platform.python_version(),
        "packages": _package_versions(),
        "devices": _device_info(),
        "argv": list(sys.argv),
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel_backends": _kernel_backends(),
    }
    atomic.write_json(os.path.join(workdir, "run_info.json"), info, **_JSON_STYLE)
    return info


def record_kernel_backends(workdir: str | os.PathLike[str]) -> list[dict[str, str]] | None:
    """Rewrites the ``kernel_backends`` field of ``workdir/run_info.json`` with every backend
    resolution this process has made (call it at the end of a run: the backends are resolved
    when the model is first traced, after the record was written at the start). Each entry
    names the kernel, the backend asked for and the one that ran, the reason (e.g. "not proven
    on 'cpu'", "self-test failed: ..."), the device kind, the JAX version, the dtype and the
    block config. Other fields are kept.

    Returns:
      The list written, or None when the workdir has no ``run_info.json`` (nothing is written).
    """
    path = os.path.join(os.fspath(workdir), "run_info.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    info["kernel_backends"] = _kernel_backends()
    atomic.write_json(path, info, **_JSON_STYLE)
    return info["kernel_backends"]
