"""Orbax checkpoints of arbitrary training-state pytrees, for saving and resuming runs.

:class:`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager`` with the two things every
caller would otherwise have to remember:

* restore against an *abstract* tree built from a template
  (``jax.tree.map(ocp.utils.to_shape_dtype_struct, template)``), so optax's ``NamedTuple``
  states come back with their types rather than as plain lists and dicts;
* typed PRNG keys (``jax.random.key``), which orbax cannot store, are saved as their raw
  ``key_data`` and wrapped back with the template's key implementation on restore.

Each checkpoint also stores a SHA-256 digest of its arrays, checked on every restore.

Saves are asynchronous (orbax copies the arrays to the host, then writes in the background);
``wait()`` blocks until the last one is on disk and ``close()`` waits and releases the manager.
A checkpoint directory that does not exist is created on the first save only, never on a read.

:meth:`Checkpointer.restore_verified` is how a run resumes: it tries the checkpoints newest
first and takes the first that loads, whose floating-point arrays are all finite and that passes
the caller's own check; each one refused is moved aside into ``<directory>_rejected/`` (nothing
is deleted) with a one-line warning saying what was wrong, so that a corrupted newest checkpoint
(zero-byte, truncated or garbled files, missing metadata, an empty step folder) costs the steps
since the one before it, never the run.

Example:
    >>> ckpt = Checkpointer("/tmp/run/ckpt", max_to_keep=2)  # doctest: +SKIP
    >>> ckpt.save(100, {"params": params, "opt": opt_state, "key": key})
    >>> state = ckpt.restore({"params": params, "opt": opt_state, "key": key})
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from metattt import atomic, multihost

__all__ = ["Checkpointer", "CorruptCheckpoint"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


_DIGEST_BYTES = 32


class CorruptCheckpoint(ValueError):
    """A checkpoint whose arrays do not match the digest saved with them."""


def _digest(encoded: Any) -> np.ndarray:
    """SHA-256 over every leaf's dtype, shape and bytes, in tree order, as (32,) uint8.

    Saved beside each checkpoint so that a restore detects changed bytes that still decode
    (a garbled file can yield finite, wrong numbers that no finiteness check would catch).
    """
    sha = hashlib.sha256()
    for leaf in jax.tree.leaves(encoded):
        array = np.ascontiguousarray(_host(leaf))
        sha.update(f"{array.dtype.str}{array.shape}".encode())
        sha.update(array.tobytes())
    return np.frombuffer(sha.digest(), np.uint8).copy()


def _host(leaf: Any) -> np.ndarray:
    """``leaf`` as one NumPy array; an array sharded over several processes is gathered from
    all of them (a collective call: every process digests the same leaves in the same order)."""
    if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def _is_key(x: Any) -> bool:
    """True for a typed PRNG key array, concrete or abstract (``jax.random.key``, not uint32)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _key_impl(x: Any) -> Any:
    """The PRNG implementation of a key array; works for a ``ShapeDtypeStruct`` template too."""
    if isinstance(x, jax.Array):
        return jax.random.key_impl(x)
    found = []

    def probe(k):
        found.append(jax.random.key_impl(k))  # key_impl works on a traced key
        return k

    jax.eval_shape(probe, x)
    return found[0]


def _encode(state: Any) -> Any:
    """Replaces typed PRNG keys by their raw ``uint32`` data, which orbax can store."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _abstract(leaf: Any) -> Any:
    """The abstract restore target of one template leaf (key leaves: that of their key data)."""
    if not _is_key(leaf):
        return ocp.utils.to_shape_dtype_struct(leaf)
    if isinstance(leaf, jax.Array):
        return ocp.utils.to_shape_dtype_struct(jax.random.key_data(leaf))
    data = jax.eval_shape(jax.random.key_data, leaf)
    # The key's sharding also lays out its data: the trailing key dimension is replicated.
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(leaf, "sharding", None))


def _placed_like(template: Any, restored: Any) -> Any:
    """Restored arrays uncommitted where the template's are (fresh ``jnp`` arrays, NumPy).

    orbax returns arrays committed to a device; a jitted step traced on the fresh, uncommitted
    state would then compile again for the resumed one (the placement is part of its cache
    key). Templates placed on purpose (committed or sharded arrays) keep their placement."""

    def place(t, r):
        placed = t.committed if isinstance(t, jax.Array) else getattr(t, "sharding", None)
        return r if placed else jnp.asarray(np.asarray(r))

    return jax.tree.map(place, template, restored)


def _decode(template: Any, restored: Any) -> Any:
    """Wraps restored key data back into typed keys wherever the template holds a key."""
    return jax.tree.map(
        lambda t, r: jax.random.wrap_key_data(r, impl=_key_impl(t)) if _is_key(t) else r,
        template,
        restored,
    )


class Checkpointer:
    """Saves and restores training-state pytrees in a directory of numbered steps.

    Attributes:
      directory: the absolute checkpoint directory (orbax requires absolute paths).
      max_to_keep: how many of the most recent checkpoints are kept.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int = 2):
        """Points at ``directory``; nothing is created or read until the first call.

        Args:
          directory: where step folders ``<directory>/<step>/`` live; made absolute.
          max_to_keep: older checkpoints beyond this many are deleted after each save.
        """
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = max_to_keep
        self._manager: ocp.CheckpointManager | None = None

    def _get_manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts saving ``state`` as checkpoint ``step`` (asynchronously; see :meth:`wait`).

        Args:
          step: the checkpoint's number; later steps are "newer".
          state: any pytree of arrays and Python scalars: parameters, optax states (NamedTuples
            included), typed PRNG keys.
          force: save even where orbax's save policy would skip this step.

        Returns:
          Whether a save was started.
        """
        encoded = _encode(state)
        payload = {"state": encoded, "digest": _digest(encoded)}
        self.wait()  # the previous save is complete (usually long since): seal it first
        return self._get_manager().save(int(step), args=ocp.args.StandardSave(payload), force=force)

    def all_steps(self) -> list[int]:
        """The steps with a finished checkpoint, ascending; empty when the directory is missing."""
        if self._manager is None and not os.path.isdir(self.directory):
            return []
        return sorted(self._get_manager().all_steps())

    def latest_step(self) -> int | None:
        """The newest checkpointed step, or None when there is none (or no directory)."""
        if self._manager is None and not os.path.isdir(self.directory):
            return None
        return self._get_manager().latest_step()

    def restore(self, template: T, step: int | None = None) -> T:
        """Restores a checkpoint into the structure, types, dtypes and shardings of ``template``.

        Args:
          template: a pytree like the saved state: concrete arrays or ``jax.ShapeDtypeStruct``
            leaves (typed PRNG keys as key arrays or key-typed ``ShapeDtypeStruct``).
          step: which checkpoint; None means the latest.

        Returns:
          The restored state, with optax NamedTuples and typed PRNG keys as in ``template``.

        Raises:
          FileNotFoundError: the directory does not exist, holds no checkpoint, or lacks ``step``.
          CorruptCheckpoint: the restored arrays differ from the digest saved with them.
        """
        if self._manager is None and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        manager = self._get_manager()
        manager.wait_until_finished()  # a save of this very step may still be in flight
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif int(step) not in manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} "
                f"(steps: {sorted(manager.all_steps())})"
            )
        abstract = {
            "state": jax.tree.map(_abstract, template),
            "digest": jax.ShapeDtypeStruct((_DIGEST_BYTES,), np.uint8),
        }
        restored = manager.restore(int(step), args=ocp.args.StandardRestore(abstract))
        if not np.array_equal(np.asarray(restored["digest"]), _digest(restored["state"])):
            raise CorruptCheckpoint(
                f"checkpoint {self.directory}/{step}: its arrays do not match the SHA-256 "
                "digest saved with them"
            )
        return _decode(template, _placed_like(template, restored["state"]))

    def restore_verified(
        self, template: T, check: Callable[[int, T], str | None] | None = None
    ) -> tuple[int, T] | None:
        """The newest checkpoint that loads and passes the checks, older ones tried in turn.

        A checkpoint is refused when its files differ from the manifest sealed after its save
        (checked before orbax reads anything: missing, zero-byte, truncated or garbled files),
        when orbax cannot restore it into ``template`` (an empty or unsealed damaged folder),
        when its arrays differ from their saved digest, when one of its floating-point arrays
        holds a NaN or an infinity, or when ``check(step, state)``
        returns a reason. A refused step folder is moved into ``<directory>_rejected/`` and a
        warning names it and the reason; the next one down is tried.

        Args:
          template: as for :meth:`restore`.
          check: optional ``(step, state) -> reason or None``, e.g. that a step counter stored
            in the state matches the folder's step.

        Returns:
          ``(step, state)`` of the newest good checkpoint, or None when there is none left.
        """
        for step in reversed(self.all_steps()):
            reason = _unsealed_damage(os.path.join(self.directory, str(step)))
            with _quiet_orbax_failures() as settle:
                try:
                    if reason is not None:
                        raise CorruptCheckpoint(reason)
                    state = self.restore(template, step=step)
                    reason = _nonfinite(state) or (check(step, state) if check else None)
                except Exception as error:  # noqa: BLE001 - any failure to load refuses it
                    reason = _first_line(error)
                if reason is not None:
                    settle()  # a failed read's debris, collected while it is muted
            if not multihost.any_process(reason is not None):
                return step, state
            reason = reason or "refused by another process of this run"
            moved = self._reject(step)
            logger.warning(
                "Checkpoint %s/%d is unusable (%s); moved to %s, trying an older one.",
                self.directory,
                step,
                reason,
                moved,
            )
        return None

    def _reject(self, step: int) -> str:
        """Moves step folder ``step`` into ``<directory>_rejected/`` and returns where it went
        (process 0 moves it; the others wait until it has)."""
        self.close()  # the manager caches its step list; it is rebuilt on next use
        rejected = self.directory + "_rejected"
        target, n = os.path.join(rejected, str(step)), 1
        if multihost.is_primary():
            os.makedirs(rejected, exist_ok=True)
            while os.path.exists(target):
                target, n = os.path.join(rejected, f"{step}.{n}"), n + 1
            shutil.move(os.path.join(self.directory, str(step)), target)
        multihost.barrier(f"metattt.ckpt.reject:{self.directory}/{step}")
        return target

    def wait(self) -> None:
        """Blocks until every started save is complete on disk, then seals it (see below).

        Sealing writes ``<step>/manifest.sha256.json`` (every file's size and SHA-256), which
        lets :meth:`restore_verified` refuse a damaged checkpoint before orbax reads it.
        """
        if self._manager is not None:
            self._manager.wait_until_finished()
            if not multihost.is_primary():
                return  # orbax finishes a multi-process save on process 0, which seals it
            for step in self._manager.all_steps():
                _seal(os.path.join(self.directory, str(step)))

    def close(self) -> None:
        """Waits for pending saves and releases the manager (it is recreated on next use)."""
        if self._manager is not None:
            self.wait()
            self._manager.close()
            self._manager = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_MANIFEST = "manifest.sha256.json"


def _file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _listing(folder: str) -> dict[str, str]:
    """``relative path -> "size:sha256"`` of every file under ``folder`` but the manifest."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if not rel.startswith(_MANIFEST):  # the manifest and its temporaries
                out[rel] = f"{os.path.getsize(path)}:{_file_sha256(path)}"
    return out


def _seal(folder: str) -> None:
    """Writes ``folder``'s manifest (atomically) unless it has one."""
    target = os.path.join(folder, _MANIFEST)
    if os.path.exists(target) or not os.path.isdir(folder):
        return
    atomic.write_json(target, _listing(folder))


def _unsealed_damage(folder: str) -> str | None:
    """What differs from ``folder``'s manifest (a missing, resized or changed file), else None.

    A folder without a manifest (a run killed between a save and its seal) is left to orbax and
    the array digest.
    """
    if os.path.isdir(folder) and not any(files for _, _, files in os.walk(folder)):
        return "the step folder is empty"
    try:
        with open(os.path.join(folder, _MANIFEST), encoding="utf-8") as f:
            want = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"its {_MANIFEST} is unreadable"
    have = _listing(folder)
    for rel, entry in sorted(want.items()):
        if rel not in have:
            return f"file {rel} is missing"
        if have[rel] != entry:
            size, got = entry.split(":")[0], have[rel].split(":")[0]
            what = f"has {got} bytes, not {size}" if size != got else "has changed bytes"
            return f"file {rel} {what}"
    return None


@contextlib.contextmanager
def _quiet_orbax_failures() -> Iterator[Callable[[], None]]:
    """Keeps a failed restore's debris off the console: our one-line warning says it all.

    When orbax fails to read a corrupted checkpoint, its sibling asyncio tasks fail too and,
    when garbage-collected, print "Task exception was never retrieved" with the whole
    tensorstore spec; and tensorstore's own threads, finishing the cancelled reads a moment
    later, raise "Event loop is closed" as unraisable exceptions (seen up to ~1 ms after the
    failure, often after the restore had returned). The block mutes the asyncio logger and the
    unraisable hook; call what it yields after a failure: it collects the debris
    (``gc.collect()``; a successful restore leaves none, and a full collection costs ~0.3 s in
    a process holding JAX's caches) and waits until no unraisable exception has arrived for
    0.1 s (1 s at most) before the block unmutes them.
    """
    asyncio_logger = logging.getLogger("asyncio")
    level, hook = asyncio_logger.level, sys.unraisablehook
    last = [time.monotonic()]

    def mute(unraisable: Any) -> None:
        last[0] = time.monotonic()

    def settle(quiet_s: float = 0.1, limit_s: float = 1.0) -> None:
        gc.collect()
        deadline = time.monotonic() + limit_s
        last[0] = time.monotonic()
        while time.monotonic() - last[0] < quiet_s and time.monotonic() < deadline:
            time.sleep(quiet_s / 5)

    asyncio_logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = mute
    try:
        yield settle
    finally:
        asyncio_logger.setLevel(level)
        sys.unraisablehook = hook


def _nonfinite(state: Any) -> str | None:
    """A reason naming the first floating-point leaf with a NaN or infinity, else None."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if _is_key(leaf):
            continue
        array = _host(leaf)
        if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
            return f"non-finite values in {jax.tree_util.keystr(path)}"
    return None


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message``, cut to 200 characters (orbax's run to pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."
