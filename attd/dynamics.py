"""The ATTD dynamics adapter ψ = (U, V): a low-rank change of each layer's state matrix.

Mamba's state matrix is a (D, N) table A[d, n] < 0 per layer (each channel d has its own
diagonal transition over the N states). ATTD adapts it at test time through a rank-r update
applied in log space (dimension names: D inner channels, N state size, r rank)::

    A_log = A_log₀ + U Vᵀ          U: (n_layers, D, r), V: (n_layers, N, r)
    A     = -exp(A_log) < 0         for every U, V
    Ā_t   = exp(Δ_t · A)  ∈ (0, 1)  since Δ_t = softplus(·) > 0

so the discretised transition of every channel and state is a contraction for *any* ψ: the
adapter cannot make the recurrence unstable, whatever the inner optimiser does. (In float32
the extremes round: a huge U Vᵀ gives A = -inf and Ā = 0, a hugely negative one gives A → -0
and Ā = 1; ``|Ā| ≤ 1`` still holds and the scan stays finite.) ``a_log_delta(psi)`` is what
:func:`attd.mamba.Mamba.__call__` takes as its ``a_log_delta`` hook; with U = 0 it is zero and
the model is the base model exactly.

``max_transition`` reports ρ(Ā) = ``max |exp(Δ_t A)|`` over the batch, time, layers, channels and
states seen on an input: the spectral radius of the (diagonal) transition, the stability
diagnostic the experiment logs during adaptation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attd.mamba import Mamba, MambaConfig


class Psi(NamedTuple):
    """The dynamics adapter of all layers.

    Attributes:
        U: (n_layers, D, r) channel factors.
        V: (n_layers, N, r) state factors.
    """

    U: jax.Array
    V: jax.Array


def _check_psi(config: MambaConfig, psi: Psi) -> None:
    if not isinstance(psi, Psi):
        raise ValueError(f"psi must be a Psi, got {type(psi).__name__}")
    u_shape, v_shape = jnp.shape(psi.U), jnp.shape(psi.V)
    if len(u_shape) != 3 or u_shape[:2] != (config.n_layers, config.d_inner):
        raise ValueError(
            f"psi.U must have shape (n_layers, D, r) = ({config.n_layers}, {config.d_inner}, r), "
            f"got {u_shape}"
        )
    if v_shape != (config.n_layers, config.d_state, u_shape[2]):
        raise ValueError(
            f"psi.V must have shape (n_layers, N, r) = "
            f"({config.n_layers}, {config.d_state}, {u_shape[2]}), got {v_shape}"
        )


def init_psi(
    config: MambaConfig, rank: int, key: jax.Array, scale: float = 0.1, dtype: Any = jnp.float32
) -> Psi:
    """ψ₀ with U = 0 (so the model equals the base model exactly) and V ~ scale · N(0, 1).

    As in LoRA, the zero factor makes the start neutral while the random one lets the first
    gradient step move U (∂L/∂U = G V with G = ∂L/∂A_log, non-zero when V is).

    Args:
        config: the model's config (n_layers, D = d_inner, N = d_state).
        rank: r ≥ 1.
        key: PRNG key for V.
        scale: standard deviation of V.
        dtype: parameter dtype.

    Returns:
        A :class:`Psi` with U (n_layers, D, r) and V (n_layers, N, r).

    Raises:
        ValueError: ``rank`` is not a positive int.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    u = jnp.zeros((config.n_layers, config.d_inner, rank), dtype)
    v = scale * jax.random.normal(key, (config.n_layers, config.d_state, rank), dtype)
    return Psi(u, v)


def a_log_delta(psi: Psi) -> jax.Array:
    """U Vᵀ per layer: (n_layers, D, r), (n_layers, N, r) -> (n_layers, D, N)."""
    return jnp.einsum("ldr,lnr->ldn", psi.U, psi.V)


def _like(template: Any, tree: Any) -> Any:
    """Re-key a string-keyed parameter dict like the NNX pure dict ``template``."""
    if isinstance(template, dict):
        return {k: _like(v, tree[str(k)]) for k, v in template.items()}
    return tree


def _module(config: MambaConfig, params: Any) -> Mamba:
    """A :class:`Mamba` holding ``params`` (built abstractly: no initialiser runs)."""
    abstract = nnx.eval_shape(lambda: Mamba(config, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, _like(nnx.to_pure_dict(state), params))
    return nnx.merge(graphdef, state, rest)


def transition_range(
    config: MambaConfig, params: Any, psi: Psi | None, tokens: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Smallest and largest discretised transition exp(Δ_t[d] A[d, n]) seen on ``tokens``.

    Runs the model's layers (the residual stream must be exact for deeper layers) and, in each
    mixer, recomputes the step sizes Δ from the mixer's own submodules, as
    :class:`attd.mamba.MambaMixer` does. Since Ā = exp(Δ A) is increasing in A, the extremes
    over states are exp(Δ_t[d] · min_n A[d, n]) and exp(Δ_t[d] · max_n A[d, n]).

    Args:
        config: the model's config.
        params: the model's parameter dict (from :func:`attd.mamba.init_mamba`).
        psi: the adapter, or None for the base model.
        tokens: (B, L) int.

    Returns:
        ``(min Ā, max Ā)``, scalars in [0, 1]; the maximum is ρ(Ā).

    Raises:
        ValueError: ``psi`` does not match ``config``.
    """
    if psi is not None:
        _check_psi(config, psi)
    model = _module(config, params)
    delta_log = None if psi is None else a_log_delta(psi)
    h = model.embedding(tokens)
    lo, hi = jnp.ones((), h.dtype), jnp.zeros((), h.dtype)
    for i, layer in enumerate(model.layers):
        mixer = layer.mixer
        layer_delta = None if delta_log is None else delta_log[i]
        x, _ = jnp.split(mixer.in_proj(layer.norm(h)), 2, axis=-1)
        x = jax.nn.silu(mixer.conv1d(x))
        if config.selective:
            dt_r = mixer.x_proj(x)[..., : config.rank]
            dt = jax.nn.softplus(dt_r @ mixer.dt_proj.kernel[...] + mixer.dt_proj.bias[...])
        else:
            dt = jnp.broadcast_to(jax.nn.softplus(mixer.dt_bias[...]), x.shape)
        a = mixer.A_log[...] if layer_delta is None else mixer.A_log[...] + layer_delta
        a = -jnp.exp(a)  # (D, N)
        lo = jnp.minimum(lo, jnp.min(jnp.exp(dt * jnp.min(a, axis=-1))).astype(lo.dtype))
        hi = jnp.maximum(hi, jnp.max(jnp.exp(dt * jnp.max(a, axis=-1))).astype(hi.dtype))
        h = layer(h, layer_delta)
    return lo, hi


def max_transition(
    config: MambaConfig, params: Any, psi: Psi | None, tokens: jax.Array
) -> jax.Array:
    """ρ(Ā) = max exp(Δ_t[d] A[d, n]) over batch, time, layers, channels, states: (B, L) -> ()."""
    return transition_range(config, params, psi, tokens)[1]


class Adapter(NamedTuple):
    """A family of test-time adapters ψ on a Mamba's parameter dict θ (one interface).

    Attributes:
        name: the family's name (a key of :data:`ADAPTERS`).
        init: ``init(key) -> ψ₀``, neutral: ``edit(θ, ψ₀)`` equals θ exactly.
        edit: ``edit(θ, ψ) -> θ'``, θ with ψ added to the parameters the family adapts.
        dynamics: whether ψ changes the SSM's dynamics (``False`` for a control adapter).
        size: the number of adapted scalars.
    """

    name: str
    init: Callable[[jax.Array], Any]
    edit: Callable[[Any, Any], Any]
    dynamics: bool
    size: int


def _edit_mixers(theta: Any, change: Callable[[int, dict], dict]) -> Any:
    """θ with each layer's mixer dict replaced by ``change(layer index, mixer dict)``."""
    layers = {
        key: {**layer, "mixer": change(int(key), layer["mixer"])}
        for key, layer in theta["layers"].items()
    }
    return {**theta, "layers": layers}


def _add(mixer: dict, path: tuple[str, ...], value: jax.Array) -> dict:
    head, *rest = path
    if not rest:
        return {**mixer, head: mixer[head] + value}
    return {**mixer, head: _add(mixer[head], tuple(rest), value)}


def make_adapter(kind: str, config: MambaConfig, *, rank: int = 2, scale: float = 0.1) -> Adapter:
    """The adapter family ``kind`` for a model of ``config``.

    Families (L layers, D channels, N states)::

        low_rank   Psi(U (L, D, r), V (L, N, r))  A_log += U Vᵀ        the ATTD ψ
        a_log      (L, D)                         A_log[d, :] += ψ[d]  each channel's rates
        dt_bias    (L, D)                         Δ's bias += ψ        Δ scales ΔA and ΔB
        timescale  (L,)                           A_log += ψ           one rate per layer
        d_skip     (L, D)                         D += ψ               control, not dynamics

    ``low_rank``, ``a_log`` and ``timescale`` move A only, so they change the transition
    Ā = exp(ΔA) but not the input gain B̄ = ΔB: a time warp of a continuous system scales Δ,
    and of the per-channel families only ``dt_bias`` reaches that (through the softplus, so
    approximately multiplicatively). ``d_skip`` has ``a_log``'s size and changes no dynamics:
    the control that tells adapting dynamics from adapting any D parameters per channel.
    ``rank`` and ``scale`` (the standard deviation of V) apply to ``low_rank`` only; the other
    families start at zero, where their gradient is not zero.
    """
    n, d = config.n_layers, config.d_inner
    dt_path = ("dt_proj", "bias") if config.selective else ("dt_bias",)
    per_channel = {
        "a_log": (("A_log",), lambda v: v[:, None]),
        "dt_bias": (dt_path, lambda v: v),
        "d_skip": (("D",), lambda v: v),
    }
    if kind == "low_rank":
        return Adapter(
            kind,
            lambda key: init_psi(config, rank, key, scale),
            lambda theta, psi: _edit_mixers(
                theta, lambda i, mx: _add(mx, ("A_log",), psi.U[i] @ psi.V[i].T)
            ),
            True,
            n * (d + config.d_state) * rank,
        )
    if kind == "timescale":
        return Adapter(
            kind,
            lambda key: jnp.zeros((n,), jnp.float32),
            lambda theta, psi: _edit_mixers(theta, lambda i, mx: _add(mx, ("A_log",), psi[i])),
            True,
            n,
        )
    if kind in per_channel:
        path, shape = per_channel[kind]
        return Adapter(
            kind,
            lambda key: jnp.zeros((n, d), jnp.float32),
            lambda theta, psi: _edit_mixers(theta, lambda i, mx: _add(mx, path, shape(psi[i]))),
            kind != "d_skip",
            n * d,
        )
    raise ValueError(f"unknown adapter family {kind!r}; known: {ADAPTERS}")


ADAPTERS = ("low_rank", "a_log", "dt_bias", "timescale", "d_skip")
