"""Weight-only int8 experts: quantize / dequantize an expert's weights, and forwards that use them.

Scheme (static, post-training, weight-only): each (I, O) weight matrix W is stored as int8
codes q and one float32 scale per output channel o (symmetric, no zero point)::

    s_o = max_i |W_io| / 127,   q_io = clip(round(W_io / s_o), -127, 127),   Ŵ_io = q_io · s_o

(a channel that is all zero gets s_o = 1 and q = 0, so it dequantizes to zeros exactly).
Rounding is to nearest (half to even), so ``|W_io - Ŵ_io| <= s_o / 2``. Activations stay float:
y = x @ Ŵ = (x @ q) · s, the scale factoring out of the sum over i because it depends on o only
-- which is how a weight-only int8 kernel computes it (:func:`int8_matmul`). Stored bytes per
weight drop from 4 (float32) to 1, plus 4 bytes per output channel for the scales; the energy
accounting prices this in :func:`metattt.models.moe.expert_work` (``weights="int8"``).

In the MoE the expert stacks ``gate``, ``up`` (E, D, F) and ``down`` (E, F, D) become
:class:`Int8Tensor` nodes of the parameter tree (:func:`quantize_experts`); everything else
stays float, so the router (and norms) can still be adapted at test time on top of the frozen
int8 experts. :func:`int8_apply` wraps a model's ``apply`` so that it takes such a tree: the
int8 codes are what the jitted program receives, and it dequantizes them inside (dispatch
backends take float weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
QMAX = 127  # symmetric int8 range [-127, 127] (-128 unused, so negation never overflows)
EXPERT_MATRICES = ("gate", "up", "down")


class Int8Tensor(NamedTuple):
    """Int8 codes and per-output-channel scales of a (..., I, O) weight.

    Attributes:
        q: (..., I, O) int8 codes.
        scale: (..., 1, O) float32 scales (broadcast against ``q``).
    """

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        """Stored bytes: one per code plus the float32 scales."""
        return int(self.q.size * self.q.dtype.itemsize + self.scale.size * 4)


def quantize_int8(w: jax.Array) -> Int8Tensor:
    """Symmetric per-output-channel int8 quantization of ``w`` (the module docstring's s, q).

    Shapes: w (..., I, O) float -> Int8Tensor(q (..., I, O) int8, scale (..., 1, O) float32);
    the reduction for each scale runs over the input axis I (axis -2).

    Raises:
        ValueError: ``w`` has fewer than 2 axes or is not floating point.
    """
    if jnp.ndim(w) < 2 or not jnp.issubdtype(jnp.result_type(w), jnp.floating):
        raise ValueError(f"w must be a float array of shape (..., I, O), got {jnp.shape(w)} "
                         f"{jnp.result_type(w)}")  # fmt: skip
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-2, keepdims=True)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)
    q = jnp.clip(jnp.round(w / scale), -QMAX, QMAX).astype(jnp.int8)
    return Int8Tensor(q, scale)


def dequantize(t: Int8Tensor, dtype: Any = jnp.float32) -> jax.Array:
    """Ŵ = q · s as ``dtype``. Shapes: (..., I, O)."""
    return (t.q.astype(jnp.float32) * t.scale).astype(dtype)


def int8_matmul(x: jax.Array, t: Int8Tensor) -> jax.Array:
    """x @ Ŵ computed as (x @ q) · s: the int8 codes enter the matmul, the scales after it.

    Shapes: x (N, I), t of a (I, O) weight -> (N, O) in x's float dtype.
    """
    if t.q.ndim != 2 or jnp.shape(x)[-1] != t.q.shape[0]:
        raise ValueError(f"x (N, I) and a (I, O) weight needed, got {jnp.shape(x)} and {t.shape}")
    return (x @ t.q.astype(x.dtype)) * t.scale[0].astype(x.dtype)


def swiglu_int8(
    x: jax.Array, gate: Int8Tensor, up: Int8Tensor, down: Int8Tensor, width: int | None = None
) -> jax.Array:
    """One SwiGLU expert with int8 weights: (silu(x Ŵ_g) · (x Ŵ_u)) Ŵ_d, at hidden width F_e.

    Shapes: x (N, D), gate/up of (D, F), down of (F, D) -> (N, D). ``width`` F_e <= F keeps the
    first F_e hidden units (as the model's heterogeneous experts do); None keeps all F.
    """
    f = gate.shape[-1] if width is None else width
    cut = lambda t, axis: Int8Tensor(*(jax.lax.slice_in_dim(a, 0, f, axis=axis) for a in t))
    h = jax.nn.silu(int8_matmul(x, cut(gate, 1))) * int8_matmul(x, cut(up, 1))
    return int8_matmul(h, Int8Tensor(down.q[:f], down.scale))


def _is_int8(node: Any) -> bool:
    return isinstance(node, Int8Tensor)


def quantize_experts(params: PyTree, names: Sequence[str] = EXPERT_MATRICES) -> PyTree:
    """The MoE parameter tree with every ``.../experts/<name>`` weight stack an :class:`Int8Tensor`.

    ``params`` is a nested dict as :func:`metattt.models.moe.init_moe` gives (``blocks/<i>/ffn/
    experts/{gate,up,down}``, stacks (E, I, O): one scale per expert and output channel). LoRA
    factors, the router and every other leaf are kept as they are.

    Raises:
        ValueError: the tree holds no expert weight of those names.
    """
    found = []

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*path, str(k))) for k, v in node.items()}
        if len(path) >= 2 and path[-2] == "experts" and path[-1] in names and not _is_int8(node):
            found.append("/".join(path))
            return quantize_int8(node)
        return node

    out = walk(params, ())
    if not found:
        raise ValueError(f"params holds no '.../experts/{{{','.join(names)}}}' weight to quantize")
    return out


def dequantize_tree(params: PyTree) -> PyTree:
    """Every :class:`Int8Tensor` of ``params`` replaced by its float32 Ŵ (others unchanged)."""
    return jax.tree.map(lambda n: dequantize(n) if _is_int8(n) else n, params, is_leaf=_is_int8)


def int8_apply(apply: Callable[..., Any]) -> Callable[..., Any]:
    """``apply(params, *args, **kw)`` that also takes trees holding :class:`Int8Tensor` nodes.

    A float tree passes through unchanged (the same computation as ``apply``); a quantized tree
    is dequantized inside the caller's ``jit``, so the int8 codes are what the program reads.
    """

    def wrapped(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        return apply(dequantize_tree(params), *args, **kwargs)

    return wrapped
