"""A small mixture-of-experts transformer (Flax NNX) with routing losses and profiling hooks.

Decoder-only, pre-norm: token + learned position embedding, then ``num_layers`` blocks of
causal multi-head self-attention and a MoE feed-forward layer of E SwiGLU experts with top-k
routing (dispatched by :func:`kernels_pallas.moe_dispatch.moe_dispatch`), a final norm, a
language-model head and an optional mean-pooled classification head. Dimension names: B batch,
L length, D model width, F expert hidden width, E experts, K experts per token, V vocabulary.

Why these pieces. The energy-aware TTT of issue 5 adapts the router (and norms, or LoRA on the
experts) so that routing gets cheaper under a power budget; it needs the router probabilities
(for TENT-style entropy and the expected energy), the per-expert token counts (for the FLOPs
and bytes each expert costs) and a way to prune experts (``expert_mask``). All of those come out
of one forward pass in ``aux``.

Parameter names follow :mod:`metattt.params`: ``embedding``/``pos_embedding`` (preset
``emb``), ``blocks/i/attn/out`` (``attn_proj``), ``blocks/i/norm1``, ``norm2``, ``final_norm``
(``layernorm`` and ``norm``: names of no stated kind, so also when they are the default
RMSNorms), ``blocks/i/ffn/router`` (``router``), ``blocks/i/ffn/experts/{gate,up,down}``
(``down`` is ``mlp_out``) and, with ``lora_rank > 0``, ``blocks/i/ffn/experts/lora_*`` (``lora``)
and the rank mask ``blocks/i/ffn/experts/rank_mask`` (a 0/1 buffer no preset selects).

Routing losses (per layer, averaged over layers):

* load balancing (Fedus et al. 2021, "Switch Transformers", eq. 4, for top-k):
  L_bal = E · Σ_e f_e · P_e with f_e the share of the T·K routed assignments that chose e
  (before capacity dropping) and P_e the mean router probability of e; 1 when uniform.
* router z-loss (Zoph et al. 2022, "ST-MoE", eq. 5): L_z = mean_t (logsumexp_e logits_t,e)².
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas.moe_dispatch import BACKENDS, DROP_PRIORITIES, moe_dispatch, top_k_routing
from metattt.adapters import LoRA, LoRAFactors, realloc
from metattt.models import fast_weights
from metattt.models.functional import Functional, functionalize

PyTree = Any


class MoEConfig(NamedTuple):
    """Static shape and routing choices of :class:`MoETransformer`.

    Attributes:
        vocab_size: V.
        d_model: D.
        num_heads: attention heads (must divide D).
        num_layers: transformer blocks.
        num_experts: E.
        d_ff: F, hidden width of each SwiGLU expert (the buffer width when
            ``expert_widths`` is set).
        top_k: K experts per token.
        max_len: longest sequence (learned position embedding).
        capacity_factor: expert capacity factor, None for dropless routing (causal).
        drop_priority: ``"score"`` or ``"position"`` (see :mod:`kernels_pallas.moe_dispatch`).
        renormalize: renormalise each token's K gates to sum to 1.
        norm: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm).
        lora_rank: R; > 0 adds LoRA adapters ``W + (alpha/R)·(A·diag(m_e))·B`` on every expert
            matrix (B starts at zero, so adding them leaves the function unchanged). R is a
            max-rank buffer: the (E, R) 0/1 ``rank_mask`` m (all ones at init) switches each
            expert's components on, so :func:`lora_realloc` changes ranks at fixed shapes.
        lora_alpha: LoRA scale numerator.
        num_classes: > 0 adds a classification head on the mean-pooled final states.
        backend: dispatch backend, ``"auto"`` (default), ``"reference"`` or ``"ragged"`` (ragged and
            auto differentiate in reverse mode only; ``"reference"`` also supports ``jvp``).
        expert_widths: heterogeneous experts: E active hidden widths F_e in [1, F], or None
            (every expert has width F). Expert e uses only hidden units ``< F_e`` of its
            (D, F) / (F, D) buffers: the ``up`` columns and ``down`` rows past F_e are masked to
            zero, so it computes exactly a width-F_e SwiGLU while every shape (and the
            dispatch) stays static. :func:`expert_work` and :func:`expert_token_costs` price
            expert e at width F_e, so cheap and expensive experts exist for energy-aware routing.
        fast_rank: R; > 0 makes every expert a fast-weight expert
            (:mod:`metattt.models.fast_weights`): its output gains ``(q W) θ_O`` from an (R, R)
            fast weight trained inside the forward pass on a key/value loss, chunk by chunk of
            ``fast_chunk`` positions, ``fast_steps`` steps of rate ``fast_lr`` per chunk. θ_O
            starts at zero, so adding them leaves the function unchanged (:func:`with_fast`).
        fast_chunk, fast_lr, fast_steps: see ``fast_rank``.
    """

    vocab_size: int
    d_model: int = 16
    num_heads: int = 2
    num_layers: int = 2
    num_experts: int = 4
    d_ff: int = 32
    top_k: int = 2
    max_len: int = 64
    capacity_factor: float | None = None
    drop_priority: str = "score"
    renormalize: bool = True
    norm: str = "rms"
    lora_rank: int = 0
    lora_alpha: float = 1.0
    num_classes: int = 0
    backend: str = "auto"
    expert_widths: tuple[int, ...] | None = None
    fast_rank: int = 0
    fast_chunk: int = 16
    fast_lr: float = 0.5
    fast_steps: int = 1


def expert_widths(config: MoEConfig) -> tuple[int, ...]:
    """The E active hidden widths F_e (all F when ``config.expert_widths`` is None)."""
    if config.expert_widths is None:
        return (config.d_ff,) * config.num_experts
    return tuple(int(w) for w in config.expert_widths)


def width_mask(config: MoEConfig) -> jax.Array:
    """(E, F) float32: 1 where hidden unit j < F_e of expert e is active."""
    widths = jnp.asarray(expert_widths(config), jnp.int32)
    return (jnp.arange(config.d_ff)[None, :] < widths[:, None]).astype(jnp.float32)


class MoEOutput(NamedTuple):
    """What :class:`MoETransformer` returns.

    Attributes:
        logits: (B, L, V) next-token logits.
        class_logits: (B, num_classes) logits of the mean-pooled head, or None.
        aux: dict with ``load_balance_loss`` and ``router_z_loss`` (scalars, mean over layers)
            and, stacked over layers (first axis), ``expert_counts`` (layers, E) int32
            assignments processed, ``router_probs`` (layers, B, L, E), ``router_logits``
            (layers, B, L, E), ``expert_ids`` and ``gates`` (layers, B, L, K), ``dropped``
            (layers, B, L, K) bool.
    """

    logits: jax.Array
    class_logits: jax.Array | None
    aux: dict[str, jax.Array]


def _validate_config(config: MoEConfig) -> None:
    def positive(name: str) -> None:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name} must be a positive int, got {value!r}")

    for name in ("vocab_size", "d_model", "num_heads", "num_layers", "num_experts", "d_ff"):
        positive(name)
    positive("max_len")
    if config.d_model % config.num_heads:
        raise ValueError(
            f"config.num_heads={config.num_heads} must divide config.d_model={config.d_model}"
        )
    if not 1 <= config.top_k <= config.num_experts:
        raise ValueError(f"config.top_k must be in [1, num_experts], got {config.top_k}")
    if config.capacity_factor is not None and not config.capacity_factor > 0:
        raise ValueError(
            f"config.capacity_factor must be > 0 or None, got {config.capacity_factor}"
        )
    if config.drop_priority not in DROP_PRIORITIES:
        raise ValueError(f"config.drop_priority must be one of {DROP_PRIORITIES}")
    if config.norm not in ("rms", "layer"):
        raise ValueError(f"config.norm must be 'rms' or 'layer', got {config.norm!r}")
    if config.lora_rank < 0 or config.num_classes < 0:
        raise ValueError("config.lora_rank and config.num_classes must be >= 0")
    if config.fast_rank < 0 or config.fast_chunk < 1 or config.fast_steps < 0:
        raise ValueError("config.fast_rank and fast_steps must be >= 0, config.fast_chunk >= 1")
    if not 0 < config.fast_lr <= 1:
        raise ValueError(f"config.fast_lr must be in (0, 1], got {config.fast_lr}")
    if config.backend not in BACKENDS:
        raise ValueError(f"config.backend must be one of {BACKENDS}, got {config.backend!r}")
    if config.expert_widths is not None:
        widths = tuple(config.expert_widths)
        ok = len(widths) == config.num_experts and all(
            isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= config.d_ff for w in widths
        )
        if not ok:
            raise ValueError(
                f"config.expert_widths must be E={config.num_experts} ints in "
                f"[1, d_ff={config.d_ff}], got {config.expert_widths!r}"
            )


def merge_lora(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale·A·B per expert. w (E, I, O), a (E, I, R), b (E, R, O) -> (E, I, O)."""
    return w + scale * jnp.einsum("eir,ero->eio", a, b)


def _norm(config: MoEConfig, rngs: nnx.Rngs) -> nnx.Module:
    if config.norm == "rms":
        return nnx.RMSNorm(config.d_model, rngs=rngs)
    return nnx.LayerNorm(config.d_model, rngs=rngs)


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention with a causal mask; projections ``qkv`` and ``out``."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, L, D) -> (B, L, D); position l attends to positions <= l."""
        batch, length, dim = x.shape
        head = dim // self.num_heads
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, head)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(head)
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        attn = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhlm,bmhd->blhd", attn, v).reshape(batch, length, dim)
        return self.out(out)


class SwiGLUExperts(nnx.Module):
    """E SwiGLU experts stacked: ``gate``, ``up`` (E, D, F), ``down`` (E, F, D), optional LoRA.

    With ``config.expert_widths`` the effective weights are masked to each expert's width.
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        e, d, f, r = config.num_experts, config.d_model, config.d_ff, config.lora_rank
        normal = lambda shape, fan_in: jax.random.normal(rngs.params(), shape) / math.sqrt(fan_in)
        self.gate = nnx.Param(normal((e, d, f), d))
        self.up = nnx.Param(normal((e, d, f), d))
        self.down = nnx.Param(normal((e, f, d), f))
        self.lora_scale = config.lora_alpha / r if r else 0.0
        if r:
            self.lora_gate_a = nnx.Param(normal((e, d, r), d))
            self.lora_gate_b = nnx.Param(jnp.zeros((e, r, f)))
            self.lora_up_a = nnx.Param(normal((e, d, r), d))
            self.lora_up_b = nnx.Param(jnp.zeros((e, r, f)))
            self.lora_down_a = nnx.Param(normal((e, f, r), f))
            self.lora_down_b = nnx.Param(jnp.zeros((e, r, d)))
            # A parameter so that it lives in the functional params (a traced value), never
            # adapted: no preset selects it; :func:`lora_realloc` sets it.
            self.rank_mask = nnx.Param(jnp.ones((e, r)))
        self.has_lora = bool(r)
        self.config = config

    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The effective (w_gate, w_up, w_down), LoRA merged in, masked to the widths."""
        w = self._merged()
        if self.config.expert_widths is None:
            return w
        # silu(g)·u is 0 on a unit whose ``up`` column is 0, and ``down`` rows past F_e are 0:
        # the masked units contribute nothing and get no gradient through the output.
        m = width_mask(self.config).astype(w[0].dtype)
        return w[0], w[1] * m[:, None, :], w[2] * m[:, :, None]

    def _merged(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        w = (self.gate[...], self.up[...], self.down[...])
        if not self.has_lora:
            return w
        pairs = (
            (self.lora_gate_a, self.lora_gate_b),
            (self.lora_up_a, self.lora_up_b),
            (self.lora_down_a, self.lora_down_b),
        )
        mask = self.rank_mask[...][:, None, :]
        return tuple(
            merge_lora(m, a[...] * mask, b[...], self.lora_scale)
            for m, (a, b) in zip(w, pairs, strict=True)
        )


class FastWeightProjections(nnx.Module):
    """The slow projections of E fast-weight experts: ``key``, ``query``, ``value`` (E, D, R),
    ``out`` (E, R, D), zero at init (:func:`metattt.models.fast_weights.fast_modulation`)."""

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        e, d, r = config.num_experts, config.d_model, config.fast_rank
        normal = lambda: nnx.Param(jax.random.normal(rngs.params(), (e, d, r)) / math.sqrt(d))
        self.key, self.query, self.value = normal(), normal(), normal()
        self.out = nnx.Param(jnp.zeros((e, r, d)))
        self.config = config

    def __call__(self, x: jax.Array, assign: jax.Array, combine: jax.Array) -> jax.Array:
        """x (B, L, D), assign and combine (B, L, E) -> the (B, L, D) fast-weight term."""
        c = self.config
        return fast_weights.fast_modulation(
            x, self.key[...], self.query[...], self.value[...], self.out[...], assign, combine,
            chunk=c.fast_chunk, lr=c.fast_lr, steps=c.fast_steps,
        )  # fmt: skip


class MoEFeedForward(nnx.Module):
    """Router (``router``, no bias) + top-k dispatch to :class:`SwiGLUExperts` (``experts``),
    plus :class:`FastWeightProjections` (``fast``) when ``config.fast_rank`` > 0."""

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.router = nnx.Linear(config.d_model, config.num_experts, use_bias=False, rngs=rngs)
        self.experts = SwiGLUExperts(config, rngs=rngs)
        self.fast = FastWeightProjections(config, rngs=rngs) if config.fast_rank else None

    def __call__(
        self, x: jax.Array, expert_mask: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: (B, L, D), expert_mask (E,) bool or None -> ((B, L, D), per-layer aux)."""
        cfg = self.config
        batch, length, dim = x.shape
        tokens = x.reshape(batch * length, dim)
        logits = self.router(tokens).astype(jnp.float32)
        if expert_mask is not None:
            logits = jnp.where(expert_mask[None, :], logits, -jnp.inf)
        routing = top_k_routing(logits, cfg.top_k, renormalize=cfg.renormalize)
        res = moe_dispatch(
            tokens,
            *self.experts.weights(),
            expert_ids=routing.expert_ids,
            gates=routing.gates.astype(tokens.dtype),
            capacity_factor=cfg.capacity_factor,
            drop_priority=cfg.drop_priority,
            backend=cfg.backend,
        )
        seq = lambda a: a.reshape(batch, length, *a.shape[1:])
        out = seq(res.out)
        if self.fast is not None:
            kept = jax.nn.one_hot(routing.expert_ids, cfg.num_experts) * ~res.dropped[..., None]
            combine = jnp.sum(kept * routing.gates[..., None], 1)  # (B·L, E)
            out = out + self.fast(x, seq(jnp.sum(kept, 1)), seq(combine)).astype(out.dtype)
        aux = {
            "load_balance_loss": load_balancing_loss(
                routing.probs, routing.expert_ids, cfg.num_experts
            ),
            "router_z_loss": router_z_loss(logits),
            "expert_counts": res.expert_counts,
            "router_probs": seq(routing.probs),
            "router_logits": seq(logits),
            "expert_ids": seq(routing.expert_ids),
            "gates": seq(routing.gates),
            "dropped": seq(res.dropped),
        }
        return out, aux


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm1(x)), then + ffn(norm2(.))."""

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(config, rngs)
        self.attn = CausalSelfAttention(config.d_model, config.num_heads, rngs=rngs)
        self.norm2 = _norm(config, rngs)
        self.ffn = MoEFeedForward(config, rngs=rngs)

    def __call__(self, x, expert_mask):
        x = x + self.attn(self.norm1(x))
        y, aux = self.ffn(self.norm2(x), expert_mask)
        return x + y, aux


class MoETransformer(nnx.Module):
    """The MoE language model (and optional classifier); see the module docstring."""

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        _validate_config(config)
        self.config = config
        self.embedding = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.pos_embedding = nnx.Embed(config.max_len, config.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = _norm(config, rngs)
        self.lm_head = nnx.Linear(config.d_model, config.vocab_size, rngs=rngs)
        self.cls_head = (
            nnx.Linear(config.d_model, config.num_classes, rngs=rngs)
            if config.num_classes
            else None
        )

    def __call__(self, tokens: jax.Array, *, expert_mask: jax.Array | None = None) -> MoEOutput:
        """tokens: (B, L) int, L <= max_len; expert_mask: (E,) bool (False prunes) or None.

        A pruned expert's router logit is -inf before top-k, so it receives no token; keep at
        least one expert enabled.

        Raises:
            ValueError: ``tokens`` is not (B, L) integer with L <= max_len, or ``expert_mask``
                is not (E,).
        """
        cfg = self.config
        if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise ValueError(
                f"tokens must be (B, L) integers, got {jnp.shape(tokens)} {jnp.result_type(tokens)}"
            )
        length = tokens.shape[1]
        if not 1 <= length <= cfg.max_len:
            raise ValueError(f"tokens length L={length} must be in [1, max_len={cfg.max_len}]")
        if expert_mask is not None:
            if jnp.shape(expert_mask) != (cfg.num_experts,):
                raise ValueError(
                    f"expert_mask must have shape (E,) = ({cfg.num_experts},), "
                    f"got {jnp.shape(expert_mask)}"
                )
            expert_mask = jnp.asarray(expert_mask).astype(bool)
        x = self.embedding(tokens) + self.pos_embedding(jnp.arange(length))[None]
        layer_aux = []
        for block in self.blocks:
            x, aux = block(x, expert_mask)
            layer_aux.append(aux)
        x = self.final_norm(x)
        logits = self.lm_head(x)
        class_logits = self.cls_head(jnp.mean(x, axis=1)) if self.cls_head is not None else None
        stacked = {k: jnp.stack([a[k] for a in layer_aux]) for k in layer_aux[0]}
        stacked["load_balance_loss"] = jnp.mean(stacked["load_balance_loss"])
        stacked["router_z_loss"] = jnp.mean(stacked["router_z_loss"])
        return MoEOutput(logits, class_logits, stacked)


def init_moe(config: MoEConfig, seed: int = 0) -> Functional:
    """A functionalised :class:`MoETransformer`: ``apply(params, tokens, *, expert_mask=None)``.

    Example:
        >>> apply, params = init_moe(MoEConfig(vocab_size=64), seed=0)
        >>> out = apply(params, tokens)             # MoEOutput(logits, class_logits, aux)
        >>> out = apply(params, tokens, expert_mask=jnp.array([True, True, False, True]))
    """
    return functionalize(MoETransformer(config, rngs=nnx.Rngs(seed)))


# --- routing losses ---------------------------------------------------------------------------


def load_balancing_loss(probs: jax.Array, expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """Switch load-balancing loss E · Σ_e f_e · P_e (1 for a perfectly uniform routing).

    Shapes: probs (T, E) router softmax; expert_ids (T, K) chosen experts -> scalar.
    f_e = (1 / (T·K)) · #{(t, k): expert_ids[t, k] = e} carries no gradient; P_e = mean_t
    probs[t, e] carries it.
    """
    num_tokens, top_k = expert_ids.shape
    counts = jnp.zeros((num_experts,), jnp.float32).at[expert_ids.reshape(-1)].add(1.0)
    share = counts / (num_tokens * top_k)
    mean_prob = jnp.mean(probs.astype(jnp.float32), axis=0)
    return num_experts * jnp.sum(share * mean_prob)


def router_z_loss(router_logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss mean_t (logsumexp_e logits_t,e)². Shapes: (T, E) -> scalar."""
    lse = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.square(lse))


# --- profiling hooks --------------------------------------------------------------------------


class ExpertWork(NamedTuple):
    """FLOPs and bytes moved per expert in one forward pass. Both (..., E) float32."""

    flops: jax.Array
    bytes: jax.Array


def expert_flops_per_token(d_model: int, d_ff: int) -> int:
    """FLOP proxy of one token through one SwiGLU expert.

    6·D·F for the three matmuls, 5·F for silu(g)·u (neg, exp, add, divide, multiply; an exp
    counts as one FLOP) and 2·D for the gate scaling and the combine add.
    """
    return 6 * d_model * d_ff + 5 * d_ff + 2 * d_model


def expert_bytes_per_token(d_model: int, d_ff: int, itemsize: int = 4) -> int:
    """Activation bytes of one token through one expert: token in and out (2·D), hidden
    written and read once (2·F). Weight reads are a per-forward cost, see :func:`expert_work`."""
    return (2 * d_model + 2 * d_ff) * itemsize


#: How expert weights are stored, for :func:`expert_work`: ``"float"`` at the activations'
#: ``itemsize``; ``"int8"`` weight-only int8 with float32 per-output-channel scales
#: (:mod:`metattt.models.quantize`).
WEIGHT_FORMATS = ("float", "int8")


def expert_weight_work(
    d_model: int, width: int, *, itemsize: int = 4, weights: str = "float"
) -> tuple[int, int]:
    """(FLOPs, bytes) of reading one expert's three weight matrices once in a forward pass.

    ``"float"``: 3·D·F_e weights of ``itemsize`` bytes, no FLOPs. ``"int8"``: 3·D·F_e bytes of
    codes plus the float32 scales of the 2·F_e + D output channels (gate, up: F_e each; down:
    D), and one multiply per weight to dequantize it (the int8-to-float conversion on load is
    not counted). The matmuls themselves run in float, so the per-token FLOPs do not change.

    Raises:
        ValueError: ``weights`` not in :data:`WEIGHT_FORMATS`.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    n = 3 * d_model * width
    if weights == "float":
        return 0, n * itemsize
    return n, n + (2 * width + d_model) * 4


def expert_work(
    expert_counts: jax.Array,
    config: MoEConfig,
    *,
    itemsize: int = 4,
    weights: str = "float",
    lora_ranks: jax.Array | None = None,
    fast_groups: int | None = None,
) -> ExpertWork:
    """FLOPs and bytes of each expert from the token counts of a forward pass (pure, jittable).

    flops_e = n_e · flops_per_token + [n_e > 0] · weight_flops_e + merge_e;  bytes_e = n_e ·
    bytes_per_token + [n_e > 0] · weight_bytes_e + lora_bytes_e, where n_e are the processed
    assignments (``aux["expert_counts"]``), each used expert's weights are read once
    (:func:`expert_weight_work`: 3·D·F·itemsize bytes for float weights, about a quarter of
    that for ``weights="int8"``, which also pays 3·D·F dequantizing multiplies), and with LoRA
    every expert with rank r_e > 0 pays the merge W + A·B each forward: merge_e = 3 ·
    (2·I·r_e·O + I·O) FLOPs (the product and one add per entry) and lora_bytes_e =
    3·(I·r_e + r_e·O)·itemsize. r_e is ``lora_ranks`` (the active ranks of a
    :func:`lora_realloc` buffer: what a real rank-r_e allocation costs, not the R-wide masked
    buffer the CPU computes) or, when None, ``config.lora_rank`` for every expert.

    With heterogeneous experts (``config.expert_widths``) expert e is priced at its width F_e
    (flops/bytes per token and weight reads); the LoRA merge runs over the whole F buffer.
    Fast-weight experts (``config.fast_rank``) add their projections, reads and inner steps
    (:func:`metattt.models.fast_weights.fast_work`; ``fast_groups``: the pass's sequences ×
    chunks, which bounds its per-chunk updates; None charges one per token).

    Shapes: expert_counts (..., E) (e.g. (layers, E)), lora_ranks broadcastable to it ->
    ExpertWork of (..., E).
    """
    d, f = config.d_model, config.d_ff
    n = jnp.asarray(expert_counts, jnp.float32)
    # the SwiGLU experts' own per-token costs; the fast-weight work is priced below per chunk
    per_flops, per_bytes = expert_token_costs(config._replace(fast_rank=0), itemsize=itemsize)
    read = [
        expert_weight_work(d, w, itemsize=itemsize, weights=weights) for w in expert_widths(config)
    ]
    weight_flops, weight_bytes = (np.asarray(v, np.float32) for v in zip(*read, strict=True))
    used = (n > 0).astype(jnp.float32)
    flops = n * jnp.asarray(per_flops, jnp.float32) + used * weight_flops
    nbytes = n * jnp.asarray(per_bytes, jnp.float32) + used * weight_bytes
    r = config.lora_rank if lora_ranks is None else jnp.asarray(lora_ranks, jnp.float32)
    if lora_ranks is not None or r:
        on = (jnp.asarray(r) > 0).astype(jnp.float32)
        flops = flops + 3 * (2 * d * r * f + on * d * f)
        nbytes = nbytes + 3 * (d * r + r * f) * itemsize
    if config.fast_rank:
        fast = fast_weights.fast_work(
            n, d, config.fast_rank, config.fast_steps, itemsize, groups=fast_groups
        )
        flops, nbytes = flops + fast[0], nbytes + fast[1]
    return ExpertWork(flops, nbytes)


def expert_token_costs(config: MoEConfig, *, itemsize: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (flops, bytes) of each expert at its width: two (E,) float64 arrays.

    The input of :func:`metattt.energy.costs.proxy_costs`:
    ``proxy_costs(E, *expert_token_costs(config))``. Fast-weight experts (``config.fast_rank``)
    add their fast-weight work per token (:func:`metattt.models.fast_weights.fast_work`) with
    each chunk's updates shared by its ``fast_chunk`` tokens, all routed to the expert (the
    setting of :func:`expert_forward`); like the experts' own, the slow weights' reads are a
    per-forward cost, not counted here.
    """
    widths = expert_widths(config)
    flops = np.array([expert_flops_per_token(config.d_model, w) for w in widths], np.float64)
    nbytes = np.array(
        [expert_bytes_per_token(config.d_model, w, itemsize) for w in widths], np.float64
    )
    if config.fast_rank:
        d, r, c = config.d_model, config.fast_rank, config.fast_chunk
        f, b = fast_weights.fast_work(float(c), d, r, config.fast_steps, itemsize, groups=1)
        flops = flops + float(f) / c
        nbytes = nbytes + (float(b) - 4 * d * r * itemsize) / c
    return flops, nbytes


def expert_forward(
    params: PyTree, config: MoEConfig, layer: int, expert: int, x: jax.Array
) -> jax.Array:
    """Run one expert of one layer on tokens, from the functional ``params`` (for timing).

    Shapes: x (N, D) -> (N, D). LoRA, if configured, is merged in as in the model, and the
    expert runs at its width F_e (a genuinely smaller matmul, so timing reflects the width).
    A fast-weight expert (``config.fast_rank``) adds its fast-weight term as the model does,
    the N tokens read as one sequence routed wholly to the expert with gate 1
    (:func:`metattt.models.fast_weights.fast_modulation`: chunk by chunk, its inner steps
    included), so a measured cost profile (:func:`metattt.energy.measure_costs`) times that
    work too.
    """
    p = params["blocks"][str(layer)]["ffn"]["experts"]
    names = ("gate", "up", "down")
    w = [p[name][expert] for name in names]
    if config.lora_rank:
        scale = config.lora_alpha / config.lora_rank
        mask = p["rank_mask"][expert]
        w = [
            m + scale * (p[f"lora_{name}_a"][expert] * mask) @ p[f"lora_{name}_b"][expert]
            for m, name in zip(w, names, strict=True)
        ]
    width = expert_widths(config)[expert]
    gate, up = x @ w[0][:, :width], x @ w[1][:, :width]
    out = (jax.nn.silu(gate) * up) @ w[2][:width]
    if not config.fast_rank:
        return out
    f = params["blocks"][str(layer)]["ffn"]["fast"]
    theta = [f[name][expert][None] for name in ("key", "query", "value", "out")]
    routed = jnp.ones((1, x.shape[0], 1), x.dtype)  # one sequence, every token, gate 1
    term = fast_weights.fast_modulation(
        x[None], *theta, routed, routed,
        chunk=config.fast_chunk, lr=config.fast_lr, steps=config.fast_steps,
    )  # fmt: skip
    return out + term[0]


# --- dynamic-rank expert LoRA ----------------------------------------------------------------

LORA_MATRICES = ("gate", "up", "down")


def with_lora(params: PyTree, config: MoEConfig) -> PyTree:
    """The parameters of a model without LoRA inside ``config``'s LoRA model, at rank 0.

    Every leaf ``params`` has is kept; the LoRA factors and the rank mask are zero, so the
    function is exactly the one of ``params`` (then :func:`lora_realloc` sets ranks).

    Raises:
        ValueError: ``config.lora_rank`` is 0.
    """
    if config.lora_rank < 1:
        raise ValueError(f"config.lora_rank must be >= 1, got {config.lora_rank}")
    template = jax.eval_shape(lambda: init_moe(config).params)
    return _graft(template, params, lambda leaf: jnp.zeros(leaf.shape, leaf.dtype))


def _graft(template: PyTree, params: PyTree, new: Callable[[Any], Any]) -> PyTree:
    """``template``'s tree of nested dicts: each leaf that ``params`` has at the same path is
    taken from ``params``, every other leaf is ``new(template's leaf)``."""
    if isinstance(template, dict):
        return {
            k: _graft(v, None if params is None else params.get(k), new)
            for k, v in template.items()
        }
    return new(template) if params is None else params


def lora_ranks(params: PyTree, config: MoEConfig) -> jax.Array:
    """(layers, E) int32 active ranks of the expert adapters (sums of the rank masks)."""
    return jnp.stack(
        [
            jnp.sum(params["blocks"][str(i)]["ffn"]["experts"]["rank_mask"] > 0, -1)
            for i in range(config.num_layers)
        ]
    ).astype(jnp.int32)


def lora_realloc(params: PyTree, config: MoEConfig, ranks: Any, key: jax.Array) -> PyTree:
    """Grow or shrink every expert adapter to ``ranks`` active components, at fixed shapes.

    Each expert matrix's (A_e, B_e, m_e) is a :class:`metattt.adapters.LoRA` and goes through
    :func:`metattt.adapters.realloc` (vmapped over experts): kept components unchanged, new A
    columns random and B rows zero (the function does not jump), dropped components zeroed.
    Rank 0 frees an expert's adapter. ``ranks`` may be traced, so one compiled function serves
    every allocation. The adaptation's optimizer state is rebuilt per adaptation call, so none
    is carried here.

    Args:
        params: parameters of ``config`` (which has ``lora_rank`` = R_max >= 1).
        config: the LoRA model's config.
        ranks: an int or (layers, E) ints in [0, R_max] (a concrete one out of range raises;
            a traced one is clipped).
        key: PRNG key for the new A columns.

    Returns:
        The parameters with new factors and rank masks.
    """
    r_max = config.lora_rank
    shape = (config.num_layers, config.num_experts)
    if not isinstance(ranks, jax.core.Tracer):
        concrete = np.asarray(ranks)
        if concrete.shape not in ((), shape) or not np.all((concrete >= 0) & (concrete <= r_max)):
            raise ValueError(
                f"ranks must be an int or {shape} ints in [0, R_max={r_max}], got {ranks!r}"
            )
    ranks = jnp.broadcast_to(jnp.asarray(ranks, jnp.int32), shape)
    grow = jax.vmap(lambda lora, rank, k: realloc(lora, None, rank, k)[0])
    blocks = dict(params["blocks"])
    keys = jax.random.split(key, (config.num_layers, len(LORA_MATRICES)))
    for i in range(config.num_layers):
        ex = dict(blocks[str(i)]["ffn"]["experts"])
        new_mask = None
        for j, name in enumerate(LORA_MATRICES):
            a, b = ex[f"lora_{name}_a"], ex[f"lora_{name}_b"]
            lora = LoRA(LoRAFactors(a, b), ex["rank_mask"], jnp.ones((a.shape[0],), a.dtype))
            out = grow(lora, ranks[i], jax.random.split(keys[i, j], a.shape[0]))
            ex[f"lora_{name}_a"], ex[f"lora_{name}_b"] = out.factors
            new_mask = out.mask
        ex["rank_mask"] = new_mask
        blocks[str(i)] = {**blocks[str(i)], "ffn": {**blocks[str(i)]["ffn"], "experts": ex}}
    return {**params, "blocks": blocks}


# --- fast-weight experts ----------------------------------------------------------------------


def with_fast(params: PyTree, config: MoEConfig, seed: int = 0) -> PyTree:
    """The parameters of a model without fast weights inside ``config``'s fast-weight model.

    Every leaf ``params`` has is kept; the new ``fast`` projections come from
    ``init_moe(config, seed)`` (θ_K, θ_Q, θ_V random, θ_O zero), so the function is exactly
    the one of ``params`` and the projections get a gradient once θ_O moves.

    Raises:
        ValueError: ``config.fast_rank`` is 0.
    """
    if config.fast_rank < 1:
        raise ValueError(f"config.fast_rank must be >= 1, got {config.fast_rank}")
    return _graft(init_moe(config, seed).params, params, lambda leaf: leaf)
