"""metattt.multihost in one process: the plain local answers, with no collective call.

The same functions across two processes are tested by ``test_multiprocess.py``.
"""

import pytest

from metattt import multihost


def test_one_process_is_the_primary_and_decides_alone(monkeypatch):
    from jax.experimental import multihost_utils

    def no_collective(*args, **kwargs):
        raise AssertionError("a single process made a collective call")

    for name in ("broadcast_one_to_all", "process_allgather", "sync_global_devices"):
        monkeypatch.setattr(multihost_utils, name, no_collective)
    assert multihost.is_primary()
    assert multihost.any_process(True) is True and multihost.any_process(False) is False
    multihost.barrier("nothing to wait for")
    assert multihost.on_primary(lambda: 7, (ValueError,)) == 7

    def refuse():
        raise ValueError("refused: the workdir is taken")

    with pytest.raises(ValueError, match="^refused: the workdir is taken$"):
        multihost.on_primary(refuse, (KeyError, ValueError))
    with pytest.raises(ZeroDivisionError):  # not listed: raised as it is
        multihost.on_primary(lambda: 1 / 0, (ValueError,))
