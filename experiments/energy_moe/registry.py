"""The methods that serve a stream, by name: ``<kind>`` or ``<kind>/<value>``.

``no_ttt`` and ``ttt`` take no value; ``energy_ttt/<λ>`` (λ_energy > 0), ``budget/<f>`` (a share
in (0, 1) of the unadapted model's dynamic power), ``prune/<n>`` (n costliest experts off) and
``top_k/<k>`` (a smaller top-k) take one. ``int8``, ``int8_ttt`` and ``int8_energy_ttt/<λ>`` are
``no_ttt``, ``ttt`` and ``energy_ttt`` on weight-only int8 experts
(:mod:`metattt.models.quantize`). The expert-level kinds (issue 15, see :mod:`.expert`) are
``lora_ttt/<rank>`` (LoRA of that rank on every expert), ``lora_hw/<R>`` (ranks up to R chosen
per batch from the monitor's power, temperature and memory headroom), ``norm_ttt``, ``bias_ttt``
and ``fast_ttt/<rank>`` (fast-weight experts, item 3, with the trainable parameters of
``lora_ttt/<rank>``; ``int8_fast_ttt/<rank>``: the same on weight-only int8 experts); these
and ``ttt``, ``energy_ttt`` may end in ``:<objective>`` (``entropy``, ``next_token``,
``masked``, ``consistency``; without it the task's own objective), and the config names them
in full (``expert.methods``). Every kind that adapts at test time but
``budget`` (whose policy decides when) may then end in ``@<schedule>`` (issue 15 item 7,
:mod:`.schedules`): adapt on the batches whose prediction entropy (``@entropy``) or router
margin (``@margin``), from the served model's own forward pass, is past an in-distribution
quantile, or at a period that halves on hard batches and doubles on easy ones (``@adaptive``);
the config names them in ``schedule.methods`` (e.g. ``int8_ttt@margin``,
``lora_ttt/4:masked@entropy``). The router TTT kinds (``ttt``, ``energy_ttt``, ``int8_ttt``,
``int8_energy_ttt``, without objective or schedule) may instead end in ``~w<W>``: adapt after
every window of W tokens (LM) or W images (classifier) inside each batch (:mod:`.windows`,
named in ``window.methods``, e.g. ``ttt~w16``). ``memory`` (item 6, :mod:`.pressure`) serves the
trained model while other tenants' memory use follows a simulated trace, stepping down through
serving levels (``memory.enabled``). :func:`parse_method` turns a name into a :class:`Method`
and rejects anything else in one line that lists the valid forms; :func:`methods` names the
config's methods in the order they run.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

EXPERT = (
    "lora_ttt",
    "lora_hw",
    "norm_ttt",
    "bias_ttt",
    "fast_ttt",
    "int8_fast_ttt",
)  # issue 15: λ_energy = expert.lam
INT8 = ("int8", "int8_ttt", "int8_energy_ttt", "int8_fast_ttt")
ENERGY_AWARE = ("energy_ttt", "budget", "int8_energy_ttt", *EXPERT)
BASELINES = ("prune", "top_k", "int8")
ADAPTING = ("ttt", "energy_ttt", "budget", "int8_ttt", "int8_energy_ttt", *EXPERT)
OBJECTIVES = ("entropy", "next_token", "masked", "consistency")
OBJECTIVE_KINDS = ("ttt", "energy_ttt", *EXPERT)  # the kinds that may name an objective
SCHEDULES = ("entropy", "margin", "adaptive")
#: the kinds that may name a schedule: all that adapt at test time but ``budget``
SCHEDULE_KINDS = ("ttt", "energy_ttt", "int8_ttt", "int8_energy_ttt", *EXPERT)
#: the kinds that may adapt per window of tokens or images (``~w<W>``): the router TTT's
WINDOW_KINDS = ("ttt", "energy_ttt", "int8_ttt", "int8_energy_ttt")


class Method(NamedTuple):
    """One way of serving the shifted stream.

    Attributes:
        kind: one of :data:`KINDS`.
        lam: λ_energy (``energy_ttt``).
        fraction: the budget's share of the dynamic power (``budget``).
        prune: experts pruned (``prune``).
        top_k: K of the routing (0: the model's).
        rank: the expert LoRA rank (``lora_ttt``; the largest, ``lora_hw``; ``fast_ttt``,
            ``int8_fast_ttt``: the LoRA rank whose trainable parameters its fast-weight experts
            match).
        objective: the adaptation's objective (``""``: the task's own).
        schedule: when to adapt (``""``: every ``ttt.every``-th batch; else :data:`SCHEDULES`).
        window: W > 0: adapt after every window of W tokens (LM) or W images (classifier)
            of every batch (:mod:`.windows`).
    """

    kind: str
    lam: float = 0.0
    fraction: float = 0.0
    prune: int = 0
    top_k: int = 0
    rank: int = 0
    objective: str = ""
    schedule: str = ""
    window: int = 0

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
    "lora_ttt": ("rank", int, "lora_ttt/<rank>"),
    "lora_hw": ("rank", int, "lora_hw/<max rank>"),
    "norm_ttt": (None, None, "norm_ttt"),
    "bias_ttt": (None, None, "bias_ttt"),
    "fast_ttt": ("rank", int, "fast_ttt/<matched LoRA rank>"),
    "int8_fast_ttt": ("rank", int, "int8_fast_ttt/<matched LoRA rank>"),
    "int8": (None, None, "int8"),
    "int8_ttt": (None, None, "int8_ttt"),
    "int8_energy_ttt": ("lam", float, "int8_energy_ttt/<λ>"),
    "memory": (None, None, "memory"),
}


def parse_method(name: str) -> Method:
    """``"energy_ttt/0.3"`` -> ``Method("energy_ttt", lam=0.3)``; ``"lora_ttt/4:masked"`` ->
    ``Method("lora_ttt", rank=4, objective="masked")``; ``"int8_ttt@margin"`` ->
    ``Method("int8_ttt", schedule="margin")``; ``"ttt~w16"`` -> ``Method("ttt", window=16)``.

    Raises:
        ValueError: an unknown kind, a missing, extra or unparsable value, an objective that
            is unknown or on a kind that does not adapt, a schedule that is unknown or on a
            kind that does not take one, or a window that is not ``w<W>`` (W >= 1) on a router
            TTT kind alone (one line listing the valid forms).
    """
    named, tilde, win = str(name).partition("~")
    base, at, schedule = named.partition("@")
    head, colon, objective = base.partition(":")
    kind, slash, value = head.partition("/")
    ok_objective = not colon or (objective in OBJECTIVES and kind in OBJECTIVE_KINDS)
    ok_schedule = not at or (schedule in SCHEDULES and kind in SCHEDULE_KINDS)
    window = int(win[1:]) if win[:1] == "w" and win[1:].isdigit() else 0
    ok_window = not tilde or (window >= 1 and kind in WINDOW_KINDS and not colon and not at)
    if kind in KINDS and ok_objective and ok_schedule and ok_window:
        field, cast, _ = KINDS[kind]
        named = {"objective": objective, "schedule": schedule, "window": window}
        if field is None and not slash:
            return Method(kind, **named)
        if field is not None and slash:
            with contextlib.suppress(ValueError):
                method = Method(kind, **named, **{field: cast(value)})
                if field != "rank" or method.rank >= 1:
                    return method
    valid = ", ".join(form for _, _, form in KINDS.values())
    raise ValueError(
        f"unknown method {name!r}; valid: {valid}; {', '.join(OBJECTIVE_KINDS)} may end in "
        f":<objective> ({', '.join(OBJECTIVES)}), then {', '.join(SCHEDULE_KINDS)} in "
        f"@<schedule> ({', '.join(SCHEDULES)}); or {', '.join(WINDOW_KINDS)} in ~w<W> (W >= 1)"
    )


def method_names(cfg) -> list[str]:
    """The config's method names in the order they run, repeats kept (see :func:`methods`)."""
    return [name for name, _ in _listed(cfg)]


def methods(cfg) -> dict[str, Method]:
    """``{name: Method}`` in the order they run (``no_ttt`` first: budgets are set from it),
    with the config's exact values (a name prints λ and f with ``:g``); the expert-level kinds
    take λ_energy = ``expert.lam``."""
    return dict(_listed(cfg))


def _listed(cfg) -> list[tuple[str, Method]]:
    """``(name, Method)`` of every method the config runs: the sweeps, the methods named in full
    (``expert.methods``, ``schedule.methods``, ``window.methods``, issue 15), then ``memory``."""
    int8 = cfg.get("int8")
    int8_on = int8 is not None and bool(int8.enabled)
    named = [*(cfg.expert.methods if "expert" in cfg else ()),
             *(cfg.schedule.methods if "schedule" in cfg else ()),
             *(cfg.window.methods if "window" in cfg else ())]  # fmt: skip
    memory = "memory" in cfg and bool(cfg.memory.enabled)
    return [
        ("no_ttt", Method("no_ttt")),
        ("ttt", Method("ttt")),
        *((f"energy_ttt/{lam:g}", Method("energy_ttt", lam=float(lam))) for lam in cfg.ttt.lambdas),
        *((f"budget/{f:g}", Method("budget", fraction=float(f))) for f in cfg.budget.fractions),
        *((f"prune/{n}", Method("prune", prune=int(n))) for n in cfg.baselines.prune),
        *((f"top_k/{k}", Method("top_k", top_k=int(k))) for k in cfg.baselines.top_k),
        *([("int8", Method("int8")), ("int8_ttt", Method("int8_ttt"))] if int8_on else []),
        *(
            (f"int8_energy_ttt/{lam:g}", Method("int8_energy_ttt", lam=float(lam)))
            for lam in (int8.lambdas if int8_on else ())
        ),
        *((name, _named(name, cfg)) for name in named),
        *([("memory", Method("memory"))] if memory else []),
    ]


def _named(name: str, cfg) -> Method:
    method = parse_method(name)
    return method._replace(lam=float(cfg.expert.lam)) if method.kind in EXPERT else method
