"""A POYO / Perceiver-IO population forecaster (Flax NNX) with preallocated embedding tables.

Each neuron's past C steps become one token; a small set of learned latents reads the tokens
by cross-attention, refines itself by self-attention, and is read back out by one query per
neuron that predicts that neuron's next P steps (Jaegle et al., 2022, Perceiver IO;
Azabou et al., 2023, POYO; Duan et al., 2025, POCO):

    token_n   = Linear_C->D(context_n) + unit_emb[u_n] + session_emb[s]             (B, N, D)
    z         = latent_emb + CrossAttn(latents <- tokens, padded neurons masked)   (B, L, D)
    z         = z + MLP(z); then num_layers x [z + SelfAttn(z); z + MLP(z)]
    query_n   = unit_emb[u_n] + session_emb[s]  (+ the token itself if query_context)
    y_n       = query_n + CrossAttn(query_n <- z); y_n + MLP(y_n)
    pred_n    = Linear_D->P(LayerNorm(y_n))                                        (B, N, P)

All blocks are pre-norm residual blocks. Shapes: B batch, N neurons (padded to N_max),
C context steps, P horizon, D width, L latents, H heads.

Registering sessions without retracing. ``unit_emb`` (max_units, D) and ``session_emb``
(max_sessions, D) are preallocated tables indexed by global unit ids and the session id; a new
session gets fresh rows by :func:`register_session` (values change, shapes do not), and a
:class:`Registry` of boolean active masks records which rows are in use
(:func:`activate`, :func:`unused_unit_ids`). Passing the registry to ``apply`` treats
inactive units as padding and zeroes an inactive session's embedding; as an array argument it
never triggers recompilation.

Padding. Padded neurons (``mask`` False) have their context and unit id replaced by zeros
before anything reads them and are masked out of the encoder's keys, so their values (even
NaN or out-of-range ids) change no other neuron's prediction.

Parameter names follow :mod:`metattt.params`' presets: attention modules are ``attn`` with
output projection ``out``; norms are ``norm*``; MLPs are ``mlp`` with output layer ``out``;
the embeddings are ``unit_emb``, ``session_emb`` and ``latent_emb``. Useful adapted sets:
embeddings only ``"re:^(unit_emb|session_emb)$"``; embeddings + latents ``"emb"``;
embeddings + last self-attention layer ``f"re:^(unit_emb|session_emb|layers/{num_layers-1}/)"``.

Mixed precision. ``dtype="bfloat16"`` (in the config or per call) casts the floating
parameters and activations to that dtype inside ``apply`` (the stored parameters stay fp32;
LayerNorm statistics are reduced in fp32 by Flax); predictions are returned in fp32.

Example:
    >>> cfg = PerceiverConfig(context=16, horizon=4, max_units=512, max_sessions=32)
    >>> apply, params = init_perceiver(cfg, seed=0)
    >>> pred = apply(params, batch)             # batch: context, unit_ids, session_id, mask
    >>> loss = masked_mse(pred, batch.target, batch.mask)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metattt.models.functional import Functional, functionalize

__all__ = [
    "Perceiver",
    "PerceiverConfig",
    "Registry",
    "activate",
    "dot_product_attention",
    "forecast_loss",
    "init_perceiver",
    "init_registry",
    "masked_mse",
    "register_session",
    "unused_unit_ids",
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """Sizes of the forecaster.

    Attributes:
        context: C, input steps per neuron.
        horizon: P, predicted steps per neuron.
        max_units: rows of the unit-embedding table (global unit ids are < max_units).
        max_sessions: rows of the session-embedding table.
        dim: D, the token / latent width.
        num_latents: L.
        num_heads: H (divides D).
        num_layers: latent self-attention layers.
        mlp_ratio: MLP hidden width = mlp_ratio * D.
        emb_init_std: std of the normal initialisation of embedding rows (also what
            :func:`register_session` uses by default).
        query_context: add each neuron's own token to its decoder query (POCO-style
            conditioning); False decodes from unit + session embeddings only (Perceiver IO).
        dtype: compute dtype (None: the parameters' dtype), e.g. ``"bfloat16"``.
    """

    context: int = 16
    horizon: int = 4
    max_units: int = 1024
    max_sessions: int = 64
    dim: int = 64
    num_latents: int = 16
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 2
    emb_init_std: float = 0.1
    query_context: bool = False
    dtype: str | None = None

    def validate(self) -> PerceiverConfig:
        """Raise ``ValueError`` naming the first bad field; return ``self``."""
        for name in (
            "context",
            "horizon",
            "max_units",
            "max_sessions",
            "dim",
            "num_latents",
            "num_heads",
            "mlp_ratio",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_layers, (int, np.integer)) or self.num_layers < 0:
            raise ValueError(f"num_layers must be a non-negative int, got {self.num_layers!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide dim ({self.dim})")
        if not self.emb_init_std >= 0:
            raise ValueError(f"emb_init_std must be >= 0, got {self.emb_init_std}")
        if self.dtype is not None:
            _float_dtype(self.dtype, "dtype")
        return self


def _float_dtype(dtype: Any, name: str) -> jnp.dtype:
    try:
        out = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"{name} must be a floating dtype, got {dtype!r}") from err
    if not jnp.issubdtype(out, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype, got {dtype!r}")
    return out


class MLP(nnx.Module):
    """``D -> mlp_ratio * D -> D`` with GELU; layers ``hidden`` and ``out``."""

    def __init__(self, dim: int, ratio: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(dim, ratio * dim, rngs=rngs)
        self.out = nnx.Linear(ratio * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.hidden(x)))


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    **unused: Any,
) -> jax.Array:
    """softmax(q k^T / sqrt(K) + bias, masked) v with logits and softmax in >= fp32.

    query (B, Lq, H, K), key and value (B, Lk, H, K), mask broadcastable to (B, H, Lq, Lk)
    (False: ignore that key) -> (B, Lq, H, K) in the inputs' dtype. ``jax.nn``'s attention
    (Flax's default) computes the logits in fp32 whatever the inputs, which would cap a float64
    finite-difference check at fp32 accuracy; here fp64 stays fp64 and bf16 is accumulated and
    normalised in fp32. Flax's dropout arguments arrive in ``unused`` (no dropout here).
    """
    del unused
    dtype = query.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    logits = jnp.einsum("...qhk,...shk->...hqs", query, key, preferred_element_type=acc)
    logits = logits / jnp.sqrt(jnp.asarray(query.shape[-1], acc))
    if bias is not None:
        logits = logits + bias.astype(acc)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(acc).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("...hqs,...shk->...qhk", weights, value)


def _attention(dim: int, heads: int, rngs: nnx.Rngs) -> nnx.MultiHeadAttention:
    return nnx.MultiHeadAttention(
        heads, dim, decode=False, attention_fn=dot_product_attention, rngs=rngs
    )


class CrossBlock(nnx.Module):
    """Pre-norm cross-attention block: ``q + attn(norm_q(q), norm_kv(kv)); + mlp(norm_mlp)``."""

    def __init__(self, dim: int, heads: int, ratio: int, *, rngs: nnx.Rngs):
        self.norm_q = nnx.LayerNorm(dim, rngs=rngs)
        self.norm_kv = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = _attention(dim, heads, rngs)
        self.norm_mlp = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = MLP(dim, ratio, rngs=rngs)

    def __call__(self, q: jax.Array, kv: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """q: (B, Lq, D), kv: (B, Lk, D), mask: (B, Lk) bool keys -> (B, Lq, D)."""
        attn_mask = None if mask is None else mask[:, None, None, :]
        q = q + self.attn(self.norm_q(q), self.norm_kv(kv), mask=attn_mask)
        return q + self.mlp(self.norm_mlp(q))


class SelfBlock(nnx.Module):
    """Pre-norm transformer block on the latents: ``z + attn(norm1(z)); z + mlp(norm2(z))``."""

    def __init__(self, dim: int, heads: int, ratio: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = _attention(dim, heads, rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = MLP(dim, ratio, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        z = z + self.attn(self.norm1(z))
        return z + self.mlp(self.norm2(z))


class Perceiver(nnx.Module):
    """The forecaster as an NNX module; use :func:`init_perceiver` for the functional form."""

    def __init__(self, config: PerceiverConfig, *, rngs: nnx.Rngs):
        cfg = config.validate()
        self.config = cfg
        d = cfg.dim
        emb = jax.nn.initializers.normal(cfg.emb_init_std)
        self.unit_emb = nnx.Param(emb(rngs.params(), (cfg.max_units, d)))
        self.session_emb = nnx.Param(emb(rngs.params(), (cfg.max_sessions, d)))
        self.latent_emb = nnx.Param(jax.random.normal(rngs.params(), (cfg.num_latents, d)))
        self.token = nnx.Linear(cfg.context, d, rngs=rngs)
        self.encoder = CrossBlock(d, cfg.num_heads, cfg.mlp_ratio, rngs=rngs)
        self.layers = nnx.List(
            [SelfBlock(d, cfg.num_heads, cfg.mlp_ratio, rngs=rngs) for _ in range(cfg.num_layers)]
        )
        self.decoder = CrossBlock(d, cfg.num_heads, cfg.mlp_ratio, rngs=rngs)
        self.norm_out = nnx.LayerNorm(d, rngs=rngs)
        self.readout = nnx.Linear(d, cfg.horizon, rngs=rngs)

    def __call__(
        self,
        context: jax.Array,
        unit_ids: jax.Array,
        session_id: jax.Array,
        mask: jax.Array,
        session_active: jax.Array,
    ) -> jax.Array:
        """context (B, N, C), unit_ids (B, N), session_id (B,), mask (B, N), session_active (B,)
        -> predictions (B, N, P) in the compute dtype."""
        dtype = self.latent_emb[...].dtype
        context = jnp.where(mask[..., None], context, 0).astype(dtype)
        unit_ids = jnp.where(mask, unit_ids, 0)
        units = jnp.take(self.unit_emb[...], unit_ids, axis=0)  # (B, N, D)
        sessions = jnp.take(self.session_emb[...], session_id, axis=0)  # (B, D)
        sessions = jnp.where(session_active[:, None], sessions, 0)[:, None, :]
        tokens = self.token(context) + units + sessions
        tokens = jnp.where(mask[..., None], tokens, 0)

        batch = context.shape[0]
        z = jnp.broadcast_to(self.latent_emb[...], (batch, *self.latent_emb[...].shape))
        z = self.encoder(z, tokens, mask)
        for layer in self.layers:
            z = layer(z)
        queries = units + sessions
        if self.config.query_context:
            queries = tokens
        y = self.decoder(queries, z)
        return jnp.where(mask[..., None], self.readout(self.norm_out(y)), 0)


def _field(batch: Any, name: str) -> Any:
    if isinstance(batch, Mapping):
        if name not in batch:
            raise ValueError(f"batch has no {name!r} entry")
        return batch[name]
    if not hasattr(batch, name):
        raise ValueError(f"batch has no {name!r} field")
    return getattr(batch, name)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_ids(ids: Any, valid: Any, limit: int, name: str) -> None:
    if _is_concrete(ids) and _is_concrete(valid):
        ids, valid = np.asarray(ids), np.asarray(valid, bool)
        chosen = ids[np.broadcast_to(valid, ids.shape)]
        if chosen.size and (chosen.min() < 0 or chosen.max() >= limit):
            raise ValueError(
                f"{name} must lie in [0, {limit}) where used, got range "
                f"[{chosen.min()}, {chosen.max()}]"
            )


def _cast_floats(tree: PyTree, dtype: jnp.dtype) -> PyTree:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
    )


class Registry(NamedTuple):
    """Which embedding rows are in use: ``unit_active`` (max_units,), ``session_active``
    (max_sessions,) bool."""

    unit_active: jax.Array
    session_active: jax.Array


def init_registry(config: PerceiverConfig) -> Registry:
    """A registry with no active unit or session."""
    return Registry(jnp.zeros((config.max_units,), bool), jnp.zeros((config.max_sessions,), bool))


def activate(
    registry: Registry,
    session_id: int | jax.Array,
    unit_ids: jax.Array,
    mask: jax.Array | None = None,
) -> Registry:
    """Mark ``session_id`` and ``unit_ids[mask]`` active (jittable; shapes unchanged)."""
    unit_ids = jnp.asarray(unit_ids).reshape(-1)
    valid = jnp.ones(unit_ids.shape, bool) if mask is None else jnp.asarray(mask).reshape(-1)
    _check_ids(unit_ids, valid, registry.unit_active.shape[0], "unit_ids")
    _check_ids(jnp.asarray(session_id), True, registry.session_active.shape[0], "session_id")
    hits = (
        jnp.zeros(registry.unit_active.shape, jnp.int32).at[unit_ids].add(valid.astype(jnp.int32))
    )
    return Registry(
        registry.unit_active | (hits > 0), registry.session_active.at[session_id].set(True)
    )


def unused_unit_ids(registry: Registry, num: int) -> np.ndarray:
    """The ``num`` lowest inactive unit ids (host-side, for allocating a new session's neurons).

    Raises:
        ValueError: fewer than ``num`` rows are free.
    """
    free = np.flatnonzero(~np.asarray(registry.unit_active))
    if free.size < num:
        raise ValueError(f"num = {num} units requested but only {free.size} rows are free")
    return free[:num].astype(np.int32)


def register_session(
    params: PyTree,
    session_id: int | jax.Array,
    unit_ids: jax.Array,
    key: jax.Array,
    *,
    mask: jax.Array | None = None,
    init_std: float = 0.1,
) -> PyTree:
    """(Re)initialise the embedding rows of one session: ``session_emb[session_id]`` and
    ``unit_emb[unit_ids[mask]]`` become fresh N(0, init_std^2) draws; nothing else changes.

    Rows are drawn per table row from ``key`` (the row a unit gets does not depend on its
    position in ``unit_ids``). Pure and jittable; the result has the shapes and dtypes of
    ``params``. This is the "reset the new session's embeddings" step of the fine-tuning
    baseline.

    Args:
        params: the forecaster's parameters (with ``unit_emb`` and ``session_emb``).
        session_id: scalar id.
        unit_ids: (N,) global unit ids of the session's neurons.
        key: PRNG key.
        mask: (N,) which entries of ``unit_ids`` are real (default: all).
        init_std: std of the fresh rows (PerceiverConfig.emb_init_std for a freshly
            initialised look; 0 for zero rows).

    Raises:
        ValueError: ``params`` lacks the tables, or an id is out of range.
    """
    if "unit_emb" not in params or "session_emb" not in params:
        raise ValueError("params must hold 'unit_emb' and 'session_emb' tables")
    units, sessions = params["unit_emb"], params["session_emb"]
    unit_ids = jnp.asarray(unit_ids).reshape(-1)
    valid = jnp.ones(unit_ids.shape, bool) if mask is None else jnp.asarray(mask).reshape(-1)
    _check_ids(unit_ids, valid, units.shape[0], "unit_ids")
    _check_ids(jnp.asarray(session_id), True, sessions.shape[0], "session_id")
    k_units, k_session = jax.random.split(key)
    hits = jnp.zeros((units.shape[0],), jnp.int32).at[unit_ids].add(valid.astype(jnp.int32))
    fresh_units = init_std * jax.random.normal(k_units, units.shape, units.dtype)
    fresh_session = init_std * jax.random.normal(k_session, sessions.shape[1:], sessions.dtype)
    out = dict(params)
    out["unit_emb"] = jnp.where((hits > 0)[:, None], fresh_units, units).astype(units.dtype)
    out["session_emb"] = sessions.at[session_id].set(fresh_session)
    return out


def init_perceiver(config: PerceiverConfig, seed: int = 0) -> Functional:
    """Build the forecaster and return ``Functional(apply, params)``.

    ``apply(params, batch, *, registry=None, dtype=config.dtype) -> (B, N, P)`` where ``batch``
    (a mapping or an object with these fields, e.g. a
    :class:`metattt.data.sessions.WindowBatch`) holds ``context`` (B, N, C) float,
    ``unit_ids`` (B, N) int, ``session_id`` (B,) int and ``mask`` (B, N) bool. Predictions
    are fp32 when a compute dtype is set, else the parameters' dtype; padded (and, with a
    registry, inactive) neurons predict 0. Shapes are checked (``ValueError`` naming the
    field), and ids are range-checked when concrete (outside ``jit``). Under ``jax.jit`` pass
    ``dtype`` as a static argument (``static_argnames="dtype"``) or bind it with
    ``functools.partial``; ``registry`` is an ordinary array argument.
    """
    cfg = config.validate()
    model = functionalize(Perceiver(cfg, rngs=nnx.Rngs(seed)))

    def apply(
        params: PyTree, batch: Any, *, registry: Registry | None = None, dtype: Any = cfg.dtype
    ) -> jax.Array:
        context = jnp.asarray(_field(batch, "context"))
        unit_ids = jnp.asarray(_field(batch, "unit_ids"))
        session_id = jnp.asarray(_field(batch, "session_id"))
        mask = jnp.asarray(_field(batch, "mask"))
        if context.ndim != 3 or context.shape[-1] != cfg.context:
            raise ValueError(f"context must be (B, N, {cfg.context}), got {context.shape}")
        b, n = context.shape[:2]
        if unit_ids.shape != (b, n) or not jnp.issubdtype(unit_ids.dtype, jnp.integer):
            raise ValueError(
                f"unit_ids must be integer ({b}, {n}), got {unit_ids.dtype} {unit_ids.shape}"
            )
        if mask.shape != (b, n):
            raise ValueError(f"mask must be ({b}, {n}), got {mask.shape}")
        if session_id.shape != (b,) or not jnp.issubdtype(session_id.dtype, jnp.integer):
            raise ValueError(
                f"session_id must be integer ({b},), got {session_id.dtype} {session_id.shape}"
            )
        mask = mask.astype(bool)
        _check_ids(unit_ids, mask, cfg.max_units, "unit_ids")
        _check_ids(session_id, True, cfg.max_sessions, "session_id")
        session_active = jnp.ones((b,), bool)
        if registry is not None:
            mask = mask & registry.unit_active[jnp.where(mask, unit_ids, 0)]
            session_active = registry.session_active[session_id]
        if dtype is not None:
            params = _cast_floats(params, _float_dtype(dtype, "dtype"))
        out = model.apply(params, context, unit_ids, session_id, mask, session_active)
        return out.astype(jnp.float32) if dtype is not None else out

    return Functional(apply, model.params)


def masked_mse(prediction: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of (prediction - target)^2 over real neurons and all P steps.

    prediction, target: (B, N, P); mask: (B, N). Computed in at least fp32 (fp64 stays fp64).
    """
    if jnp.shape(prediction) != jnp.shape(target):
        raise ValueError(
            f"prediction shape {jnp.shape(prediction)} != target shape {jnp.shape(target)}"
        )
    if jnp.shape(mask) != jnp.shape(prediction)[:-1]:
        raise ValueError(
            f"mask must have shape {jnp.shape(prediction)[:-1]}, got {jnp.shape(mask)}"
        )
    dtype = jnp.promote_types(jnp.result_type(prediction, target), jnp.float32)
    err = jnp.square(prediction.astype(dtype) - target.astype(dtype))
    weight = jnp.asarray(mask, dtype)[..., None]
    count = jnp.sum(weight) * prediction.shape[-1]
    return jnp.sum(err * weight) / jnp.maximum(count, 1.0)


def forecast_loss(apply: Callable, **apply_kwargs: Any) -> Callable[[PyTree, Any], jax.Array]:
    """``loss_fn(params, batch) = masked_mse(apply(params, batch), batch.target, batch.mask)``,
    the form :mod:`metattt.inner` and :mod:`metattt.meta` take.

    ``apply_kwargs`` go to ``apply``; with a ``registry`` among them, inactive units are left
    out of the loss as well.
    """
    registry = apply_kwargs.get("registry")

    def loss_fn(params: PyTree, batch: Any) -> jax.Array:
        pred = apply(params, batch, **apply_kwargs)
        mask = jnp.asarray(_field(batch, "mask"), bool)
        if registry is not None:
            ids = jnp.where(mask, jnp.asarray(_field(batch, "unit_ids")), 0)
            mask = mask & registry.unit_active[ids]
        return masked_mse(pred, jnp.asarray(_field(batch, "target")), mask)

    return loss_fn
