"""Orbax checkpoints of arbitrary training-state pytrees, for saving and resuming runs.

:class:`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager`` with the two things every
caller would otherwise have to remember:

* restore against an *abstract* tree built from a template
  (``jax.tree.map(ocp.utils.to_shape_dtype_struct, template)``), so optax's ``NamedTuple``
  states come back with their types rather than as plain lists and dicts;
* typed PRNG keys (``jax.random.key``), which orbax cannot store, are saved as their raw
  ``key_data`` and wrapped back with the template's key implementation on restore.

Saves are asynchronous (orbax copies the arrays to the host, then writes in the background);
``wait()`` blocks until the last one is on disk and ``close()`` waits and releases the manager.
A checkpoint directory that does not exist is created on the first save only, never on a read.

Example:
    >>> ckpt = Checkpointer("/tmp/run/ckpt", max_to_keep=2)  # doctest: +SKIP
    >>> ckpt.save(100, {"params": params, "opt": opt_state, "key": key})
    >>> state = ckpt.restore({"params": params, "opt": opt_state, "key": key})
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]

T = TypeVar("T")


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
        return self._get_manager().save(
            int(step), args=ocp.args.StandardSave(_encode(state)), force=force
        )

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
        abstract = jax.tree.map(_abstract, template)
        restored = manager.restore(int(step), args=ocp.args.StandardRestore(abstract))
        return _decode(template, restored)

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager (it is recreated on next use)."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
