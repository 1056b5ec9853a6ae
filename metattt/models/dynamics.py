"""An action-conditioned transformer dynamics predictor, its rollout and one-step losses.

Predictor. A latent state z_t (dimension Z) and an action a_t (dimension A) form one token; a
few pre-norm causal transformer blocks over a history window of W tokens predict the next
state at every position, as a residual ``z_{t+1} = z_t + head(norm_out(x_t))``:

    x_t = embed([z_t, a_t]) + pos_emb[t]                                   (W, D)
    x   = num_layers x [x + attn(norm1(x), causal); x + mlp(norm2(x))]
    z_{t+1}_hat = z_t + head(norm_out(x_t))                                (W, Z)

A rollout over a horizon H is autoregressive: the last position's prediction is appended to
the history window (the oldest token drops out) together with the next, known, action.

Parameter names follow :mod:`metattt.params`' naming contract: norms ``norm1``, ``norm2``,
``norm_out``; attention ``blocks/i/attn`` with output projection ``out``; the MLP
``blocks/i/mlp`` with hidden layer ``hidden`` and output layer ``out``; so the presets
``layernorm``, ``attn_proj``, ``mlp_out`` and ``bias`` select what their names say.

The synthetic controlled system it is tested on lives in :mod:`metattt.data.controlled`.

Shapes: W history window, H horizon, Z state dim, A action dim, D width, B windows, C clips.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metattt.data.controlled import Trajectories
from metattt.models.functional import Functional, functionalize

__all__ = [
    "DynamicsPredictor",
    "PredictorConfig",
    "clip_losses",
    "init_predictor",
    "one_step_loss",
    "predict_next",
    "rollout",
    "rollout_loss",
]

PyTree = Any


# ------------------------------------------------------------------------------------------------
# Predictor
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """Sizes of the predictor.

    Attributes:
        state_dim: Z.
        action_dim: A.
        dim: D, the token width.
        num_heads: attention heads (divides D).
        num_layers: transformer blocks.
        mlp_ratio: MLP hidden width = mlp_ratio * D.
        window: W, history tokens the predictor sees.
        horizon: H, rollout steps of the losses.
    """

    state_dim: int = 4
    action_dim: int = 2
    dim: int = 32
    num_heads: int = 2
    num_layers: int = 2
    mlp_ratio: int = 2
    window: int = 8
    horizon: int = 8

    def validate(self) -> PredictorConfig:
        """Raise ``ValueError`` naming the first bad field; return ``self``."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{f.name} must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide dim ({self.dim})")
        return self


class _MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(dim, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.hidden(x)))


class _Block(nnx.Module):
    def __init__(self, cfg: PredictorConfig, *, rngs: nnx.Rngs):
        d = cfg.dim
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=cfg.num_heads, in_features=d, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = _MLP(d, cfg.mlp_ratio * d, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class DynamicsPredictor(nnx.Module):
    """``(z (..., W, Z), a (..., W, A)) -> (..., W, Z)``: the next state at every position."""

    def __init__(self, cfg: PredictorConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.embed = nnx.Linear(cfg.state_dim + cfg.action_dim, cfg.dim, rngs=rngs)
        self.pos_emb = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.window, cfg.dim)))
        self.blocks = nnx.List([_Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm_out = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.head = nnx.Linear(cfg.dim, cfg.state_dim, rngs=rngs)

    def __call__(self, z: jax.Array, a: jax.Array) -> jax.Array:
        w = self.cfg.window
        if z.shape[-2:] != (w, self.cfg.state_dim) or a.shape[-2:] != (w, self.cfg.action_dim):
            raise ValueError(
                f"z must end in (W, Z) = ({w}, {self.cfg.state_dim}) and a in (W, A) = "
                f"({w}, {self.cfg.action_dim}); got z {z.shape}, a {a.shape}"
            )
        x = self.embed(jnp.concatenate([z, a], axis=-1)) + self.pos_emb[...]
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
        for block in self.blocks:
            x = block(x, mask)
        return z + self.head(self.norm_out(x))


def init_predictor(cfg: PredictorConfig, *, seed: int = 0) -> Functional:
    """A functionalised :class:`DynamicsPredictor`: ``apply(params, z, a)`` and its params."""
    return functionalize(DynamicsPredictor(cfg, rngs=nnx.Rngs(seed)))


def predict_next(apply: Callable, params: PyTree, z: jax.Array, a: jax.Array) -> jax.Array:
    """The predicted state after the last of W history steps: (W, Z), (W, A) -> (Z,)."""
    return apply(params, z, a)[..., -1, :]


def rollout(apply: Callable, params: PyTree, windows: Trajectories, window: int) -> jax.Array:
    """Autoregressive H-step rollout from the first W steps: (W+H, Z) -> (H, Z) predictions.

    Step h predicts z[W+h] from the window ending at the state predicted at step h-1 (the true
    history at h = 0) and the true actions.
    """
    z, a = windows
    hist_z, hist_a = z[:window], a[:window]

    def step(carry, a_next):
        hz, ha = carry
        pred = predict_next(apply, params, hz, ha)
        hz = jnp.concatenate([hz[1:], pred[None]], axis=0)
        ha = jnp.concatenate([ha[1:], a_next[None]], axis=0)
        return (hz, ha), pred

    _, preds = jax.lax.scan(step, (hist_z, hist_a), a[window:])
    return preds


def rollout_loss(apply: Callable, params: PyTree, windows: Trajectories, window: int) -> jax.Array:
    """Mean squared error of the H-step rollout, averaged over windows (B, W+H, .)."""
    preds = jax.vmap(lambda w: rollout(apply, params, w, window))(windows)
    return jnp.mean((preds - windows.z[:, window:]) ** 2)


def one_step_loss(apply: Callable, params: PyTree, windows: Trajectories, window: int) -> jax.Array:
    """Teacher-forced one-step MSE on the same H targets: z[W+h] from the true z[h:W+h]."""
    horizon = windows.z.shape[1] - window

    def per_window(w):
        starts = jnp.arange(horizon)
        hz = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(w.z, s, window))(starts)
        ha = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(w.a, s, window))(starts)
        return predict_next(apply, params, hz, ha)

    preds = jax.vmap(per_window)(windows)
    return jnp.mean((preds - windows.z[:, window:]) ** 2)


def clip_losses(apply: Callable, window: int) -> tuple[dict[str, Callable], Callable]:
    """The adaptation losses per protocol mode (on ``clip.adapt``) and the evaluation loss.

    Returns:
        ``({"rollout": f, "one_step": g}, eval_fn)``; every function maps (params, clip) to a
        scalar; ``eval_fn`` is the H-step rollout MSE on ``clip.eval``.
    """
    losses = {
        "rollout": lambda p, clip: rollout_loss(apply, p, clip.adapt, window),
        "one_step": lambda p, clip: one_step_loss(apply, p, clip.adapt, window),
    }
    return losses, lambda p, clip: rollout_loss(apply, p, clip.eval, window)
