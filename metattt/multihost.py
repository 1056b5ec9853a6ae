"""What the processes of one multi-process run must agree on: who writes, and when to stop.

A run started as several JAX processes (``jax.distributed.initialize``) executes every jitted
step collectively: each process must make the same calls in the same order, or the others wait
in a collective until the runtime times out. So a decision that one process takes alone (the
workdir lock is held by someone else; a SIGTERM arrived; a checkpoint is damaged) must reach the
others before anyone acts on it, and a file that every process could write is written by
process 0 only. In a single-process run every function here is the plain local answer and
makes no collective call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np

__all__ = ["any_process", "barrier", "is_primary", "on_primary"]

T = TypeVar("T")
_MESSAGE_BYTES = 2048  # an error message crosses processes as a fixed-size buffer


def is_primary() -> bool:
    """True in process 0, the one that writes a run's files (always True in one process)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one (a collective call)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (nothing in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def on_primary(fn: Callable[[], T], errors: tuple[type[Exception], ...]) -> T | None:
    """``fn()`` run on process 0 only; when it raises one of ``errors``, every process raises.

    Process 0 re-raises its own exception; the others raise the same type with the message
    ``"process 0: <its message>"``, so a refusal (e.g. a workdir held by another run) stops the
    whole launch in one line instead of leaving the other processes waiting in a collective.
    Exceptions not listed in ``errors`` are not shared (they end process 0 only).

    Returns:
      ``fn()``'s result on process 0, None on the others.
    """
    result, error, code = None, None, 0
    if is_primary():
        try:
            result = fn()
        except errors as e:
            error, code = e, 1 + next(i for i, t in enumerate(errors) if isinstance(e, t))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        message = np.zeros(_MESSAGE_BYTES, np.uint8)
        text = str(error).encode()[:_MESSAGE_BYTES] if error is not None else b""
        message[: len(text)] = np.frombuffer(text, np.uint8)
        code, message = multihost_utils.broadcast_one_to_all((np.int32(code), message))
        code = int(code)
        if code and error is None:
            text = bytes(np.asarray(message, np.uint8)).rstrip(b"\0").decode(errors="replace")
            raise errors[code - 1](f"process 0: {text}")
    if error is not None:
        raise error
    return result
