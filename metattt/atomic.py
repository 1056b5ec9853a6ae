"""Atomic file writes: a reader (or a restarted run) sees the old file or the new one, never a
torn one.

The text goes to a temporary file beside the target, named with the writing process's id (so two
processes writing the same target never share a temporary), then ``os.replace`` swaps it in,
which POSIX makes atomic within one file system. A process killed mid-write leaves at most a
stray ``<path>.tmp.<pid>`` and the previous file intact.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["write_json", "write_text"]


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; parent folders are created."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike[str], value: Any, **dump_kwargs: Any) -> None:
    """Replace ``path`` with ``json.dumps(value, **dump_kwargs)`` and a newline, atomically.

    The value is serialised before the file is touched, so a value JSON cannot hold raises
    without changing anything on disk.
    """
    write_text(path, json.dumps(value, **dump_kwargs) + "\n")
