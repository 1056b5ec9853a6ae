"""Lazy package exports (PEP 562): a package's submodules, and the names it re-exports from
them, are imported on first use, so that a process pays only for the modules it touches."""

from __future__ import annotations

import importlib
import sys


def exports(package: str, submodules: str, names: dict[str, str]):
    """The ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: the package's ``__name__``.
        submodules: its submodules, separated by spaces (``"inner meta"``).
        names: for each submodule (a dotted path below the package), the names re-exported from
            it, separated by spaces.
    """
    modules = frozenset(submodules.split())
    origin = {name: module for module, listed in names.items() for name in listed.split()}

    def __getattr__(name: str):
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        if name in origin:
            value = getattr(importlib.import_module(f"{package}.{origin[name]}"), name)
            setattr(sys.modules[package], name, value)  # later lookups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted({*vars(sys.modules[package]), *modules, *origin})

    return __getattr__, __dir__
