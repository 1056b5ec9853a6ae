"""Compare a results tree from a run with a frozen one made by another compiled program."""

import math
import re

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def assert_close_tree(got, want, *, rtol: float, path: str = "results") -> None:
    """``got`` equals ``want`` in structure, strings, ints and booleans, and in every float
    within ``rtol`` (relative, with an absolute floor of ``rtol`` near 0); NaN equals NaN.

    A fixture frozen on one machine is another compiled program than a run on this one (XLA's
    fusion and its optimisation level differ), so floats are compared within a tolerance, never
    bit for bit."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), (path, sorted(got))
        for k in want:
            assert_close_tree(got[k], want[k], rtol=rtol, path=f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (path, got)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close_tree(g, w, rtol=rtol, path=f"{path}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        g, w = float(got), float(want)
        if math.isnan(w):
            assert math.isnan(g), (path, g, w)
        else:
            assert abs(g - w) <= rtol * max(abs(w), 1.0), (path, g, w)
    else:
        assert got == want, (path, got, want)


def assert_same_structure(got, want, *, path: str = "results") -> None:
    """``got`` and ``want`` have the same keys, list lengths, strings and leaf kinds (number or
    not), whatever the numbers, those written inside strings included (a sentence that quotes
    a probability or an expert's index): for runs whose discrete choices (routing, argmax) can
    flip under float rounding, so that no tolerance on the numbers would be safe."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), (path, sorted(got))
        for k in want:
            assert_same_structure(got[k], want[k], path=f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (path, got)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_structure(g, w, path=f"{path}[{i}]")
    elif isinstance(want, str) or isinstance(got, str):
        assert isinstance(got, str) and isinstance(want, str), (path, got, want)
        assert _NUMBER.sub("#", got) == _NUMBER.sub("#", want), (path, got, want)
    else:
        assert isinstance(got, (int, float, type(None))) == isinstance(
            want, (int, float, type(None))
        ), (path, got, want)
