"""A pure-function Mamba (S6) model in Flax NNX: classification and next-token heads.

Architecture (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces"; ``state-spaces/mamba`` ``mamba_ssm/modules/mamba_simple.py``). Dimension names: B batch,
L length, M = d_model, D = expand·M inner channels, N = d_state, R = dt_rank, V vocabulary::

    h⁰ = embedding[tokens]                                      (B, L, M)
    for each layer:  hˡ⁺¹ = hˡ + Mixer(RMSNorm(hˡ))
    Mixer(u):  x, z = in_proj(u)                                (B, L, D) each
               x    = silu(causal depthwise conv1d(x))          kernel d_conv, left padding
               Δ_r, B, C = x_proj(x)                            (B, L, R), (B, L, N), (B, L, N)
               Δ    = softplus(dt_proj(Δ_r) + dt_bias)          (B, L, D)
               A    = -exp(A_log + a_log_delta)                 (D, N), A_log₀[d, n] = log(n + 1)
               y    = selective_scan(x, Δ, A, B, C, D_skip, z)  (C·h + D x) ⊙ silu(z)
               out_proj(y)                                      (B, L, M)
    h = RMSNorm(h^L); classify: mean of h over valid positions -> linear -> (B, num_classes)
                      lm:       h · embeddingᵀ (tied) -> (B, L, V), position t predicts t + 1

``a_log_delta`` is the hook of the ATTD dynamics adapter (A = -exp(A_log₀ + U Vᵀ)): an
additive change of each layer's A_log that is not a parameter. Zero (or None) gives the base
model exactly; since A = -exp(·) < 0 for any value, every exp(Δ A) stays in (0, 1).

``selective=False`` is the time-invariant ablation of the selective-copying check: Δ, B and C
are learned constants (``dt_bias`` (D,), ``B`` (N,), ``C`` (N,)) broadcast over batch and time,
with the same parametrisation otherwise (B and C shared by the channels, as in the selective
model), so the only difference is the input dependence.

Parameter names follow :mod:`metattt.params`: ``embedding/embedding``, ``layers/i/norm/scale``,
``layers/i/mixer/{in_proj,conv1d,x_proj,dt_proj,out_proj}/...``, ``layers/i/mixer/A_log``,
``layers/i/mixer/D``, ``final_norm/scale``, ``classifier/{kernel,bias}``.

Padding: the model is causal, so pad on the right; ``mask`` then keeps padded positions out of
the pooled head, and valid positions never see them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.selective_scan import BACKENDS, selective_scan
from metattt.models.functional import Functional, functionalize

HEADS = ("classify", "lm")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Sizes and switches of a Mamba model.

    Attributes:
        vocab_size: V, number of token ids.
        d_model: M, residual width.
        n_layers: number of Mamba blocks.
        d_state: N, state size per channel.
        d_conv: kernel size of the causal depthwise convolution.
        expand: D = expand · d_model inner channels.
        dt_rank: R, rank of the Δ projection; ``"auto"`` is ceil(d_model / 16).
        num_classes: classes of the pooled head (None: no classification head).
        scan_backend: ``backend`` of :func:`kernels_pallas.selective_scan.selective_scan`.
        selective: input-dependent Δ, B, C (S6); False gives the time-invariant ablation.
        lean_backward: chunk-recomputing backward of the ``"reference"`` scan.
        scan_chunk_size: chunk length T of that backward; ``None`` picks it from the sizes.
        dt_min, dt_max: range of the initial Δ (log-uniform), as in Mamba.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    num_classes: int | None = None
    scan_backend: str = "reference"
    selective: bool = True
    lean_backward: bool = True
    scan_chunk_size: int | None = None
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand"):
            _positive_int(name, getattr(self, name))
        if self.scan_chunk_size is not None:
            _positive_int("scan_chunk_size", self.scan_chunk_size)
        if self.dt_rank != "auto":
            _positive_int("dt_rank", self.dt_rank)
        if self.num_classes is not None:
            _positive_int("num_classes", self.num_classes)
        if self.scan_backend not in BACKENDS:
            raise ValueError(
                f"MambaConfig.scan_backend must be one of {BACKENDS}, got {self.scan_backend!r}"
            )
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"MambaConfig needs 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}"
            )

    @property
    def d_inner(self) -> int:
        """D, the number of SSM channels."""
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        """R, the resolved ``dt_rank``."""
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)


def _dt_bias_init(rngs: nnx.Rngs, cfg: MambaConfig) -> jax.Array:
    """Bias whose softplus is log-uniform in [dt_min, dt_max] (Mamba's Δ initialisation)."""
    u = jax.random.uniform(rngs.params(), (cfg.d_inner,), jnp.float32)  # float32 under x64 too
    dt = jnp.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
    dt = jnp.maximum(dt, 1e-4)
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse of softplus


def _symmetric_uniform(scale: float):
    """Initializer U(-scale, scale) (Mamba's dt_proj weight, scale = dt_rank^-1/2)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Causal depthwise conv1d as a sum of K shifted products: x (B, L, D) -> (B, L, D).

    out[:, t, d] = bias[d] + Σ_k kernel[k, 0, d] · x[:, t − (K − 1) + k, d] (zero before t = 0),
    the function of ``nnx.Conv(D, D, (K,), padding=((K − 1, 0),), feature_group_count=D)``,
    whose parameters (kernel (K, 1, D), bias (D,)) it takes. XLA:CPU runs that grouped
    convolution ~50x slower than these K fused multiply-adds at Mamba's sizes.
    """
    taps, length = kernel.shape[0], x.shape[1]
    padded = jnp.pad(x, ((0, 0), (taps - 1, 0), (0, 0)))
    out = bias
    for k in range(taps):
        out = out + padded[:, k : k + length] * kernel[k, 0]
    return out


class MambaMixer(nnx.Module):
    """The S6 mixer of one block: (B, L, M) -> (B, L, M)."""

    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
        d, n, r = cfg.d_inner, cfg.d_state, cfg.rank
        self.cfg = cfg
        self.in_proj = nnx.Linear(cfg.d_model, 2 * d, use_bias=False, rngs=rngs)
        self.conv1d = nnx.Conv(
            d,
            d,
            kernel_size=(cfg.d_conv,),
            padding=((cfg.d_conv - 1, 0),),
            feature_group_count=d,
            rngs=rngs,
        )
        if cfg.selective:
            self.x_proj = nnx.Linear(d, r + 2 * n, use_bias=False, rngs=rngs)
            self.dt_proj = nnx.Linear(r, d, kernel_init=_symmetric_uniform(r**-0.5), rngs=rngs)
            self.dt_proj.bias[...] = _dt_bias_init(rngs, cfg)
        else:
            self.dt_bias = nnx.Param(_dt_bias_init(rngs, cfg))
            self.B = nnx.Param(jnp.ones((n,), jnp.float32))
            self.C = nnx.Param(jax.random.normal(rngs.params(), (n,)) / math.sqrt(n))
        # S4D-real: A[d, n] = -(n + 1) for every channel.
        self.A_log = nnx.Param(jnp.log(jnp.tile(jnp.arange(1, n + 1, dtype=jnp.float32), (d, 1))))
        self.D = nnx.Param(jnp.ones((d,), jnp.float32))
        self.out_proj = nnx.Linear(d, cfg.d_model, use_bias=False, rngs=rngs)

    def __call__(self, u: jax.Array, a_log_delta: jax.Array | None = None) -> jax.Array:
        """u: (B, L, M); a_log_delta: (D, N) or None -> (B, L, M)."""
        cfg = self.cfg
        xz = self.in_proj(u)
        x, z = jnp.split(xz, 2, axis=-1)
        x = jax.nn.silu(causal_depthwise_conv(x, self.conv1d.kernel[...], self.conv1d.bias[...]))
        batch, length, _ = x.shape
        if cfg.selective:
            dbc = self.x_proj(x)
            dt_r, B, C = jnp.split(dbc, [cfg.rank, cfg.rank + cfg.d_state], axis=-1)
            delta = dt_r @ self.dt_proj.kernel[...]
            delta_bias = self.dt_proj.bias[...]
        else:
            delta = jnp.zeros_like(x)
            delta_bias = self.dt_bias[...]
            B = jnp.broadcast_to(self.B[...], (batch, length, cfg.d_state))
            C = jnp.broadcast_to(self.C[...], (batch, length, cfg.d_state))
        a_log = self.A_log[...]
        if a_log_delta is not None:
            a_log = a_log + a_log_delta
        y = selective_scan(
            x,
            delta,
            -jnp.exp(a_log),
            B,
            C,
            self.D[...],
            z,
            delta_bias=delta_bias,
            delta_softplus=True,
            backend=cfg.scan_backend,
            lean_backward=cfg.lean_backward,
            chunk_size=cfg.scan_chunk_size,
        )
        return self.out_proj(y)


class MambaBlock(nnx.Module):
    """Pre-norm residual block: h + Mixer(RMSNorm(h))."""

    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
        self.mixer = MambaMixer(cfg, rngs=rngs)

    def __call__(self, h: jax.Array, a_log_delta: jax.Array | None = None) -> jax.Array:
        return h + self.mixer(self.norm(h), a_log_delta)


class Mamba(nnx.Module):
    """Token embedding, ``n_layers`` Mamba blocks, final RMSNorm, pooled and LM heads."""

    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedding = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        # nnx.Embed freezes its compute dtype to the init dtype; None follows the parameters,
        # so float64 parameters (finite-difference checks) stay float64 through the LM head.
        self.embedding.dtype = None
        self.layers = nnx.List([MambaBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = nnx.RMSNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
        self.classifier = (
            nnx.Linear(cfg.d_model, cfg.num_classes, rngs=rngs)
            if cfg.num_classes is not None
            else None
        )

    def _check(self, tokens, mask, a_log_delta, head) -> None:
        cfg = self.cfg
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "classify" and self.classifier is None:
            raise ValueError("head='classify' needs MambaConfig.num_classes")
        if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise ValueError(
                f"tokens must be integers of shape (B, L), got {jnp.result_type(tokens)} "
                f"{jnp.shape(tokens)}"
            )
        if mask is not None and jnp.shape(mask) != jnp.shape(tokens):
            raise ValueError(
                f"mask must have the shape of tokens {jnp.shape(tokens)}, got {jnp.shape(mask)}"
            )
        expected = (cfg.n_layers, cfg.d_inner, cfg.d_state)
        if a_log_delta is not None and jnp.shape(a_log_delta) != expected:
            raise ValueError(
                f"a_log_delta must have shape (n_layers, D_inner, N) = {expected}, "
                f"got {jnp.shape(a_log_delta)}"
            )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        mask: jax.Array | None = None,
        a_log_delta: jax.Array | None = None,
        head: str = "classify",
    ) -> jax.Array:
        """tokens (B, L) int -> logits (B, num_classes) [classify] or (B, L, V) [lm].

        Args:
            tokens: token ids.
            mask: (B, L), 1 at valid positions (pooled head only; pad on the right).
            a_log_delta: (n_layers, D, N) additive change of each layer's A_log, or None.
            head: ``"classify"`` (pooled) or ``"lm"`` (next token, tied to the embedding).
        """
        self._check(tokens, mask, a_log_delta, head)
        h = self.embedding(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if a_log_delta is None else a_log_delta[i])
        h = self.final_norm(h)
        if head == "lm":
            return self.embedding.attend(h)
        if mask is None:
            pooled = jnp.mean(h, axis=1)
        else:
            w = mask.astype(h.dtype)[..., None]
            pooled = jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        return self.classifier(pooled)


def init_mamba(config: MambaConfig, seed: int = 0) -> Functional:
    """A functionalised :class:`Mamba`: ``(apply, params)``.

    ``apply(params, tokens, *, mask=None, a_log_delta=None, head="classify")`` returns
    (B, num_classes) or, with ``head="lm"``, (B, L, vocab_size) logits.

    Example:
        >>> apply, params = init_mamba(MambaConfig(vocab_size=16, d_model=32, n_layers=2,
        ...                                        num_classes=4), seed=0)
        >>> logits = apply(params, tokens, mask=mask)
    """
    if not isinstance(config, MambaConfig):
        raise ValueError(f"config must be a MambaConfig, got {type(config).__name__}")
    # Initialising under one jit compiles all initialisers together (eagerly, each new shape
    # compiles its own sampler, several seconds in all on the CPU).
    module = nnx.jit(lambda: Mamba(config, rngs=nnx.Rngs(int(seed))))()
    return functionalize(module)


def zero_a_log_delta(config: MambaConfig, dtype: Any = jnp.float32) -> jax.Array:
    """The neutral ``a_log_delta``: zeros of shape (n_layers, D_inner, N)."""
    return jnp.zeros((config.n_layers, config.d_inner, config.d_state), dtype)
