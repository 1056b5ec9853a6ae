"""The method names of the ATTD-on-LRA experiment: a controller and optional variants.

A name is ``<controller>[+<variant>...]``: ``attd+so`` is ATTD trained second order through
the inner loop, ``ttt+sgd+r8`` full TTT with an SGD inner rule and ψ of rank 8, ``ttt+so+j``
second-order full TTT whose outer loss also keeps the self-supervised loss, ``ttt+k2`` TTT
with K = 2 steps on every input, ``ttt+dt_bias`` full TTT of a per-channel shift of Δ's bias
instead of the low-rank ψ (the families of :func:`attd.dynamics.make_adapter`). Controllers
live in :data:`BASES`, variants in :data:`VARIANTS` (plus ``r<N>`` and ``k<N>``);
:func:`parse_method` rejects anything else in one line that names the method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from attd.controller import fixed_controller, gate_controller, threshold_controller
from attd.dynamics import ADAPTERS

LRA_TASKS = ("listops", "pathfinder", "text")
SHIFT_TASKS = ("timewarp", "oscillator", "recorded")  # attd.shifts: temporal-dynamics shifts
TASKS = LRA_TASKS + SHIFT_TASKS
INNER_RULES = ("adam", "sgd")
#: Per task: the difficulty the K-vs-difficulty plot and correlation use, and its label.
DIFFICULTY = {
    "listops": "nesting depth",
    "pathfinder": "path length",
    "text": "length (bytes)",
    "timewarp": "|log warp|",
    "oscillator": "|log timescale factor|",
    "recorded": "|log sampling-rate factor|",
}
ADAPTER_LABELS = {
    "low_rank": "low-rank ψ on A_log",
    "a_log": "per-channel A_log shift",
    "dt_bias": "per-channel Δ-bias shift",
    "timescale": "one A_log shift per layer",
    "d_skip": "per-channel D-skip shift (control)",
}


class Base(NamedTuple):
    """A controller: its table label, whether K depends on the input, and its factory
    ``make(k_max, temperature) -> controller``."""

    label: str
    controlled: bool
    make: Callable[[int, float], Any]


BASES = {
    "fixed": Base("fixed Mamba (K=0)", False, lambda k_max, t: fixed_controller(0)),
    "ttt": Base("full TTT (K=K_max)", False, lambda k_max, t: fixed_controller(k_max)),
    "gate": Base("ponder-or-not", True, lambda k_max, t: gate_controller(k_max, temperature=t)),
    "attd": Base("ATTD", True, lambda k_max, t: threshold_controller(k_max, temperature=t)),
    # ATTD without the step cost (λ = 0), to see what the task loss alone does to K
    "attd_nocost": Base(
        "ATTD, λ=0 (ablation)", True, lambda k_max, t: threshold_controller(k_max, temperature=t)
    ),
}
METHODS = tuple(BASES)
METHOD_LABELS = {name: base.label for name, base in BASES.items()}
CONTROLLED = tuple(name for name, base in BASES.items() if base.controlled)
#: A variant token -> (the :class:`MethodSpec` field it sets, its value); ``r<N>`` sets the rank.
VARIANTS = {
    "so": ("second_order", True),
    "j": ("joint", True),
    **{rule: ("inner_opt", rule) for rule in INNER_RULES},
    **{family: ("adapter", family) for family in ADAPTERS},
}


class MethodSpec(NamedTuple):
    """A parsed method name: the controller and what differs from the config's defaults.

    Attributes:
        base: one of :data:`METHODS` (the controller).
        second_order: ``+so``; ``None`` keeps ``attd.first_order`` of the config.
        inner_opt: ``+sgd`` / ``+adam``; ``None`` keeps ``attd.inner_opt``.
        psi_rank: ``+r<N>``; ``None`` keeps ``model.psi_rank``.
        joint: ``+j``: the outer objective adds ``attd.joint_weight`` · E[L_int(ψ₀)] (joint
            training of task and self-supervised loss, :func:`attd.method.make_attd`'s
            ``int_weight``); ``None``: no such term.
        adapter: ``+<family>`` of :data:`attd.dynamics.ADAPTERS`; ``None``: ``low_rank``.
        steps: ``+k<N>`` (``ttt`` only): N inner steps on every input instead of K_max.
    """

    base: str
    second_order: bool | None = None
    inner_opt: str | None = None
    psi_rank: int | None = None
    joint: bool | None = None
    adapter: str | None = None
    steps: int | None = None


def _variant(name: str, token: str) -> tuple[str, Any]:
    if token in VARIANTS:
        return VARIANTS[token]
    if token[:1] == "r" and token[1:].isdigit() and int(token[1:]) >= 1:
        return "psi_rank", int(token[1:])
    if token[:1] == "k" and token[1:].isdigit() and int(token[1:]) >= 1:
        return "steps", int(token[1:])
    known = ", ".join([*VARIANTS, "r<rank>", "k<steps>"])
    raise ValueError(f"method {name!r}: unknown variant {token!r} (known: {known})")


def parse_method(name: str) -> MethodSpec:
    """``"attd+so"`` -> ``MethodSpec("attd", second_order=True)``; ``"ttt+sgd+r8"`` -> SGD inner
    rule and ψ rank 8.

    Raises:
        ValueError: unknown controller, unknown or repeated variant.
    """
    base, *variants = str(name).split("+")
    if base not in BASES:
        raise ValueError(f"method {name!r}: the controller must be one of {METHODS}")
    fields: dict[str, Any] = {}
    for token in variants:
        key, value = _variant(name, token)
        if key in fields:
            raise ValueError(f"method {name!r}: {key} given twice")
        fields[key] = value
    if "steps" in fields and base != "ttt":
        raise ValueError(f"method {name!r}: k<steps> sets uniform TTT's K, so only ttt+k<N>")
    if "psi_rank" in fields and fields.get("adapter", "low_rank") != "low_rank":
        raise ValueError(f"method {name!r}: r<rank> is the low-rank ψ's rank only")
    return MethodSpec(base, **fields)


def method_label(name: str) -> str:
    """The table label of a method name, e.g. ``"ATTD, 2nd order"``."""
    spec = parse_method(name)
    extra = []
    if spec.second_order:
        extra.append("2nd order")
    if spec.inner_opt:
        extra.append(f"{spec.inner_opt.upper() if spec.inner_opt == 'sgd' else 'Adam'} inner")
    if spec.psi_rank:
        extra.append(f"ψ rank {spec.psi_rank}")
    if spec.joint:
        extra.append("joint L_int")
    if spec.adapter:
        extra.append(ADAPTER_LABELS[spec.adapter])
    base = METHOD_LABELS[spec.base]
    if spec.steps:
        base = f"uniform TTT (K={spec.steps})"
    return ", ".join([base, *extra])


def seed_methods(cfg, seed: int) -> tuple[str, ...]:
    """The methods run for ``seed``: all of ``methods``, and the ablation on its seeds."""
    extra = tuple(cfg.ablation_methods) if seed in tuple(cfg.ablation_seeds) else ()
    return tuple(cfg.methods) + extra
