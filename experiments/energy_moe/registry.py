"""The methods that serve a stream, by name: ``<kind>`` or ``<kind>/<value>``.

``no_ttt`` and ``ttt`` take no value; ``energy_ttt/<λ>`` (λ_energy > 0), ``budget/<f>`` (a
share in (0, 1) of the unadapted model's dynamic power), ``prune/<n>`` (n costliest experts
off) and ``top_k/<k>`` (a smaller top-k) take one. ``int8``, ``int8_ttt`` and
``int8_energy_ttt/<λ>`` are ``no_ttt``, ``ttt`` and ``energy_ttt`` on weight-only int8 experts
(:mod:`metattt.models.quantize`). :func:`parse_method` turns a name into a
:class:`Method` and rejects anything else in one line that lists the valid forms;
:func:`methods` names the config's methods in the order they run.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

ENERGY_AWARE = ("energy_ttt", "budget", "int8_energy_ttt")
BASELINES = ("prune", "top_k", "int8")
ADAPTING = ("ttt", "energy_ttt", "budget", "int8_ttt", "int8_energy_ttt")
INT8 = ("int8", "int8_ttt", "int8_energy_ttt")


class Method(NamedTuple):
    """One way of serving the shifted stream.

    Attributes:
        kind: one of :data:`KINDS`.
        lam: λ_energy (``energy_ttt``).
        fraction: the budget's share of the dynamic power (``budget``).
        prune: experts pruned (``prune``).
        top_k: K of the routing (0: the model's).
    """

    kind: str
    lam: float = 0.0
    fraction: float = 0.0
    prune: int = 0
    top_k: int = 0

    @property
    def adapts(self) -> bool:
        return self.kind in ADAPTING

    @property
    def int8(self) -> bool:
        """Served with weight-only int8 experts."""
        return self.kind in INT8


#: kind -> (the :class:`Method` field its value sets, the value's type, how names write it);
#: a kind without a field takes no value.
KINDS = {
    "no_ttt": (None, None, "no_ttt"),
    "ttt": (None, None, "ttt"),
    "energy_ttt": ("lam", float, "energy_ttt/<λ>"),
    "budget": ("fraction", float, "budget/<fraction>"),
    "prune": ("prune", int, "prune/<n>"),
    "top_k": ("top_k", int, "top_k/<k>"),
    "int8": (None, None, "int8"),
    "int8_ttt": (None, None, "int8_ttt"),
    "int8_energy_ttt": ("lam", float, "int8_energy_ttt/<λ>"),
}


def parse_method(name: str) -> Method:
    """``"energy_ttt/0.3"`` -> ``Method("energy_ttt", lam=0.3)``.

    Raises:
        ValueError: an unknown kind, a missing, extra or unparsable value (one line listing
            the valid forms).
    """
    kind, slash, value = str(name).partition("/")
    if kind in KINDS:
        field, cast, _ = KINDS[kind]
        if field is None and not slash:
            return Method(kind)
        if field is not None and slash:
            with contextlib.suppress(ValueError):
                return Method(kind, **{field: cast(value)})
    valid = ", ".join(form for _, _, form in KINDS.values())
    raise ValueError(f"unknown method {name!r}; valid: {valid}")


def method_names(cfg) -> list[str]:
    """The config's method names in the order they run (``no_ttt`` first: budgets are set
    from it)."""
    return [
        "no_ttt",
        "ttt",
        *(f"energy_ttt/{lam:g}" for lam in cfg.ttt.lambdas),
        *(f"budget/{f:g}" for f in cfg.budget.fractions),
        *(f"prune/{n}" for n in cfg.baselines.prune),
        *(f"top_k/{k}" for k in cfg.baselines.top_k),
        *(["int8", "int8_ttt"] if _int8(cfg).enabled else []),
        *(f"int8_energy_ttt/{lam:g}" for lam in _int8(cfg).lambdas),
    ]


def methods(cfg) -> dict[str, Method]:
    """``{name: Method}`` in the order they run, with the config's exact values (a name prints
    λ and f with ``:g``)."""
    values = [
        None,
        None,
        *(float(lam) for lam in cfg.ttt.lambdas),
        *(float(f) for f in cfg.budget.fractions),
        *(int(n) for n in cfg.baselines.prune),
        *(int(k) for k in cfg.baselines.top_k),
        *([None, None] if _int8(cfg).enabled else []),
        *(float(lam) for lam in _int8(cfg).lambdas),
    ]
    out = {}
    for name, value in zip(method_names(cfg), values, strict=True):
        method = parse_method(name)
        field = KINDS[method.kind][0]
        out[name] = method if field is None else method._replace(**{field: value})
    return out


class Int8Options(NamedTuple):
    """The config's ``int8`` section (absent: off): serve ``int8`` and ``int8_ttt`` when
    ``enabled``, and ``int8_energy_ttt/<λ>`` for each of ``lambdas`` (only when enabled)."""

    enabled: bool
    lambdas: tuple[float, ...]


def _int8(cfg) -> Int8Options:
    section = cfg.get("int8")
    if section is None or not section.enabled:
        return Int8Options(False, ())
    return Int8Options(True, tuple(section.lambdas))
