"""Clip-wise test-time adaptation: adapt on each clip, record how much it helped.

For a sequence of clips (a pytree with a leading clip axis C) the runner, inside one
``lax.scan``, evaluates each clip before adapting (pre-adapt loss), takes N optimizer steps on
that clip, and evaluates again (post-adapt loss). With ``reset_per_clip`` every clip starts from
the source parameters and a fresh optimizer state; otherwise the adapted parameters and the
optimizer state carry forward (cumulative adaptation). Per clip it reports pre, post,
improvement = pre - post, and rolling means of post and improvement over the last W clips.

On top of the runner sits the configurable protocol practitioners tune: a frozen
:class:`TTAProtocol` (enabled, loss mode, steps, learning rate, gradient clipping, reset or
cumulative, which layers adapt, rolling window) that :func:`run_protocol` applies to a model's
parameters and a stream of clips, returning the per-clip metrics with the trainable parameter
count. :func:`write_protocol_metrics` logs every clip (no aggregation) through a
:class:`metattt.runlog.MetricWriter`, outside ``jit``; :func:`summarize` reduces a run to the
numbers of a summary table.

Example:
    >>> protocol = TTAProtocol(mode="rollout", num_adaptation_steps=5, lr=5e-4,
    ...                        clip_norm=5.0, reset_per_clip=True, adapt_layers="layernorm")
    >>> out = run_protocol(protocol, {"rollout": loss, "one_step": loss1}, params, clips,
    ...                    eval_fn=score)  # doctest: +SKIP
    >>> write_protocol_metrics(writer, out)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metattt.inner import adapt, check_clip_norm
from metattt.params import PRESETS, ParamCount, count, merge, select, selected_paths, split

PyTree = Any


class TTAResult(NamedTuple):
    """Per-clip metrics of :func:`run_clips`; arrays have shape (C,).

    Attributes:
        params: fast parameters after the last clip (the source ones when resetting).
        pre_loss: evaluation loss on clip c before adapting on it.
        post_loss: evaluation loss on clip c after adapting on it.
        improvement: pre_loss - post_loss.
        rolling_post: mean of post_loss over clips max(0, c-W+1)..c.
        rolling_improvement: the same for improvement.
        num_skipped: non-finite inner steps skipped on clip c.
    """

    params: PyTree
    pre_loss: jax.Array
    post_loss: jax.Array
    improvement: jax.Array
    rolling_post: jax.Array
    rolling_improvement: jax.Array
    num_skipped: jax.Array


def rolling_mean(values: jax.Array, window: int) -> jax.Array:
    """Trailing mean over the last ``window`` entries along axis 0, leaving out non-finite ones.

    Entry c is the mean of the finite values among entries max(0, c-W+1)..c (fewer at the
    start), so one bad clip (a NaN loss) is left out of the W windows it falls in instead of
    poisoning every later mean; NaN when none of the window's values is finite.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    values = jnp.asarray(values, jnp.float32)
    ok = jnp.isfinite(values)

    def trailing_sum(x):
        csum = jnp.cumsum(x, axis=0)
        lagged = jnp.concatenate([jnp.zeros((window,) + x.shape[1:], x.dtype), csum])
        return csum - lagged[: x.shape[0]]

    total = trailing_sum(jnp.where(ok, values, 0.0))
    count = trailing_sum(ok.astype(jnp.float32))
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


def run_clips(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    fast: PyTree,
    slow: PyTree,
    clips: Any,
    *,
    opt: optax.GradientTransformation,
    num_steps: int,
    clip_norm: float | None = None,
    reset_per_clip: bool = True,
    window: int = 50,
    eval_fn: Callable[[PyTree, Any], jax.Array] | None = None,
) -> TTAResult:
    """Adapt clip by clip and record pre/post/improvement/rolling metrics.

    Args:
        loss_fn: the adaptation loss ``loss_fn(params, clip) -> scalar``.
        fast, slow: adapted and frozen parameters (see :mod:`metattt.params`).
        clips: pytree with a leading clip axis C.
        opt: optax rule; its state resets with the parameters when ``reset_per_clip``.
        num_steps: N optimizer steps per clip (static; 0 gives the unadapted baseline).
        clip_norm: per-step gradient clipping.
        reset_per_clip: start every clip from the source parameters, or carry forward.
        window: W for the rolling means.
        eval_fn: the reported loss (default ``loss_fn``).

    Returns:
        A :class:`TTAResult`.
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}")
    sizes = {x.shape[0] for x in jax.tree.leaves(clips)}
    if len(sizes) != 1:
        raise ValueError(f"every leaf of clips needs the same leading clip axis, got {sizes}")
    evaluate = eval_fn or loss_fn
    source_state = opt.init(fast)

    def one_clip(carry, clip):
        params, state = carry
        start, start_state = (fast, source_state) if reset_per_clip else (params, state)
        pre = evaluate(merge(start, slow), clip)
        if jnp.ndim(pre) != 0:
            raise ValueError(
                f"eval_fn (or the loss) must return a scalar per clip, got shape {jnp.shape(pre)}"
            )
        result = adapt(
            loss_fn,
            start,
            slow,
            clip,
            opt=opt,
            max_steps=num_steps,
            clip_norm=clip_norm,
            opt_state=start_state,
        )
        post = evaluate(merge(result.params, slow), clip)
        return (result.params, result.opt_state), (pre, post, result.num_skipped)

    (last, _), (pre, post, skipped) = jax.lax.scan(one_clip, (fast, source_state), clips)
    improvement = pre - post
    return TTAResult(
        fast if reset_per_clip else last,
        pre,
        post,
        improvement,
        rolling_mean(post, window),
        rolling_mean(improvement, window),
        skipped,
    )


# ------------------------------------------------------------------------------------------------
# The configurable protocol
# ------------------------------------------------------------------------------------------------

#: The seed protocol's layer ladder (each a selector of :func:`metattt.params.select`).
ADAPT_PRESETS = ("layernorm", "layernorm+attn_proj", "layernorm+bias", "layernorm+mlp_out")
#: Shorthands for ``TTAProtocol.optimizer``; any callable ``lr -> optax rule`` works too.
OPTIMIZERS = {"sgd": optax.sgd, "adam": optax.adam}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_selector(selector: Any) -> Any:
    """A hashable form of an ``adapt_layers`` selector; unknown presets and bad patterns fail
    here, before anything runs (what a selector picks is known only with the params)."""
    if callable(selector):
        return selector
    if isinstance(selector, str):
        if selector == "none":
            return selector
        for term in (t.strip() for t in selector.split("+")):
            if term.startswith("re:"):
                try:
                    re.compile(term[3:])
                except re.error as error:
                    message = f"adapt_layers pattern {term!r} is not a regex: {error}"
                    raise ValueError(message) from None
            elif term not in PRESETS:
                raise ValueError(
                    f"unknown adapt_layers preset {term!r} in {selector!r}; use 'none', a "
                    f"'+'-joined combination of {sorted(PRESETS)} and 're:<regex>' terms, "
                    "a sequence of those, or a callable (path, leaf) -> bool"
                )
        return selector
    if isinstance(selector, (list, tuple)) and selector:
        return tuple(_check_selector(s) for s in selector)
    raise ValueError(
        f"adapt_layers must be a selector (string, sequence or callable), got {selector!r}"
    )


@dataclasses.dataclass(frozen=True)
class TTAProtocol:
    """What a practitioner tunes about clip-wise test-time adaptation; validated on creation.

    The defaults are the setting that made a visible difference on the project's own shifted
    dynamics task (BENCHMARKS.md, tta_protocol: post/pre loss 0.78 ± 0.04 with LayerNorm
    alone, where the former defaults, one step at 1e-4 clipped at 1, changed it by 1%): 5 Adam
    steps at 5e-4, gradients clipped at 5, every clip from the source parameters.

    Attributes:
        enabled: adapt at all (False: the unadapted baseline, post = pre).
        mode: the name of the adaptation loss in :func:`run_protocol`'s ``loss_fns`` (any
            name the caller registers: ``"entropy"``, ``"rollout"``, ...).
        num_adaptation_steps: N optimizer steps per clip (0 is the baseline).
        lr: the optimizer's learning rate, >= 0 (0 takes steps that change nothing: a check
            that the adapted model is the source one).
        clip_norm: clip each step's gradient to this global norm (None: no clipping).
        reset_per_clip: start every clip from the source parameters and a fresh optimizer
            state, or carry both forward (cumulative).
        adapt_layers: which parameters adapt: ``"none"`` (the baseline) or any selector of
            :func:`metattt.params.select`: a preset, a ``+``-joined combination, ``re:<regex>``,
            a sequence of those, or a callable ``(path, leaf) -> bool``
            (:data:`ADAPT_PRESETS` is the seed protocol's ladder).
        window: W, the number of clips of the rolling means.
        optimizer: ``"sgd"``, ``"adam"`` (optax defaults apart from the rate), or any callable
            ``lr -> optax.GradientTransformation`` (e.g. ``optax.adamw``,
            ``functools.partial(optax.sgd, momentum=0.9)``).

    Raises:
        ValueError: a field out of range, an unknown preset or optimizer name, a bad regex.
    """

    enabled: bool = True
    mode: str = "loss"
    num_adaptation_steps: int = 5
    lr: float = 5e-4
    clip_norm: float | None = 5.0
    reset_per_clip: bool = True
    adapt_layers: Any = "layernorm"
    window: int = 50
    optimizer: Any = "adam"

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be a bool, got {self.enabled!r}")
        if not isinstance(self.mode, str) or not self.mode:
            raise ValueError(f"mode must name a loss (a non-empty string), got {self.mode!r}")
        if not _is_int(self.num_adaptation_steps) or self.num_adaptation_steps < 0:
            raise ValueError(
                "num_adaptation_steps must be a non-negative int, "
                f"got {self.num_adaptation_steps!r}"
            )
        if not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr!r}")
        check_clip_norm(self.clip_norm)
        if not isinstance(self.reset_per_clip, bool):
            raise ValueError(f"reset_per_clip must be a bool, got {self.reset_per_clip!r}")
        object.__setattr__(self, "adapt_layers", _check_selector(self.adapt_layers))
        if not _is_int(self.window) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if not callable(self.optimizer) and self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; use one of {sorted(OPTIMIZERS)} or a "
                "callable lr -> optax rule"
            )

    @property
    def adapts(self) -> bool:
        """Whether any parameter changes (enabled, some layers, at least one step)."""
        return self.enabled and self.adapt_layers != "none" and self.num_adaptation_steps > 0

    def make_optimizer(self) -> optax.GradientTransformation:
        """The optax rule at ``lr`` (clipping is applied separately, per step)."""
        make = OPTIMIZERS.get(self.optimizer) if isinstance(self.optimizer, str) else None
        return (make or self.optimizer)(self.lr)


class ProtocolResult(NamedTuple):
    """What :func:`run_protocol` returns.

    Attributes:
        metrics: the per-clip :class:`TTAResult` (arrays of shape (C,)).
        count: trainable (adapted) and total parameter scalars; trainable is 0 for a baseline.
        adapted_paths: the adapted leaves' paths (empty for a baseline).
        protocol: the protocol that produced it.
        metric: what pre/post measure: ``"eval_fn"``, or ``"adaptation loss '<mode>'"`` when
            no evaluation function was given (then a falling loss says only that the
            adaptation objective fell, not that the model got better).
    """

    metrics: TTAResult
    count: ParamCount
    adapted_paths: tuple[str, ...]
    protocol: TTAProtocol
    metric: str


@functools.lru_cache(maxsize=256)
def _compiled_protocol(protocol: TTAProtocol, loss_fn: Callable, eval_fn: Callable | None):
    """One jitted ``(params, clips) -> TTAResult`` per (protocol, losses): seeds reuse it."""
    adapts = protocol.adapts
    opt = protocol.make_optimizer()

    def run(params, clips):
        # Paths are static, so the selection is resolved at trace time.
        if adapts:
            mask = select(params, protocol.adapt_layers)
        else:  # the baseline: everything "fast", zero steps
            mask = jax.tree.map(lambda _: True, params)
        fast, slow = split(params, mask)
        return run_clips(
            loss_fn,
            fast,
            slow,
            clips,
            opt=opt,
            num_steps=protocol.num_adaptation_steps if adapts else 0,
            clip_norm=protocol.clip_norm if adapts else None,
            reset_per_clip=protocol.reset_per_clip,
            window=protocol.window,
            eval_fn=eval_fn,
        )

    return jax.jit(run)


def run_protocol(
    protocol: TTAProtocol,
    loss_fns: Mapping[str, Callable[[PyTree, Any], jax.Array]] | Callable[[PyTree, Any], Any],
    params: PyTree,
    clips: Any,
    *,
    eval_fn: Callable[[PyTree, Any], jax.Array] | None = None,
) -> ProtocolResult:
    """Apply ``protocol`` to a stream of clips: select the adapted layers, adapt, measure.

    The adapted leaves are ``params.select(params, protocol.adapt_layers)``; the adaptation
    loss is ``loss_fns[protocol.mode]`` (or ``loss_fns`` itself when it is one function); the
    reported pre/post losses are ``eval_fn`` (default: the adaptation loss, which the result's
    ``metric`` then says). The whole stream runs as one jitted ``lax.scan``
    (:func:`run_clips`); the compiled function is cached per (protocol, loss, eval) so that
    further seeds or streams of the same shapes do not recompile.

    Args:
        protocol: a :class:`TTAProtocol`.
        loss_fns: ``{name: loss_fn(params, clip) -> scalar}`` holding ``protocol.mode``, or
            one loss function.
        params: the source parameters (a pytree named per :mod:`metattt.params`).
        clips: pytree with a leading clip axis C.
        eval_fn: ``eval_fn(params, clip) -> scalar``, the reported loss.

    Returns:
        A :class:`ProtocolResult`.

    Raises:
        ValueError: ``loss_fns`` lacks the protocol's mode, the selector selects nothing, or
            ``clips`` is not a pytree of arrays with one leading clip axis.
    """
    if not isinstance(protocol, TTAProtocol):
        raise TypeError(f"protocol must be a TTAProtocol, got {type(protocol).__name__}")
    if callable(loss_fns):
        loss_fn = loss_fns
    elif protocol.mode in loss_fns:
        loss_fn = loss_fns[protocol.mode]
    else:
        raise ValueError(
            f"loss_fns has no loss for mode {protocol.mode!r} (it has {sorted(loss_fns)})"
        )
    _check_clips(clips)
    if protocol.adapts:
        mask = select(params, protocol.adapt_layers)
        n = count(params, mask)
        paths = tuple(selected_paths(params, mask))
        key = protocol
    else:
        n = ParamCount(0, count(params).total)
        paths = ()
        # one program for every baseline; SGD carries no optimizer state through the scan
        key = TTAProtocol(
            enabled=False, mode=protocol.mode, window=protocol.window, optimizer="sgd"
        )
    metrics = _compiled_protocol(key, loss_fn, eval_fn)(params, clips)
    metric = "eval_fn" if eval_fn is not None else f"adaptation loss {protocol.mode!r}"
    return ProtocolResult(metrics, n, paths, protocol, metric)


def _check_clips(clips: Any) -> None:
    """One-line errors for the usual slips: a list of clips, or leaves without a clip axis
    (:func:`run_clips` checks that the axes agree)."""
    if isinstance(clips, list):
        raise ValueError(
            "clips is a list; stack it into arrays with a leading clip axis, e.g. "
            "jax.tree.map(lambda *c: jnp.stack(c), *clips)"
        )
    leaves = jax.tree.leaves(clips)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError("clips needs array leaves with a leading clip axis (C, ...)")


CLIP_METRICS = ("pre_loss", "post_loss", "improvement", "rolling_post", "rolling_improvement")


def write_protocol_metrics(writer: Any, result: ProtocolResult, *, prefix: str = "") -> None:
    """Log a run through a :class:`metattt.runlog.MetricWriter`, every clip, no aggregation.

    Step 0 first gets ``trainable_params``, ``total_params`` and ``trainable_share``; then
    clip c (0-based) is written at step c with ``pre_loss``, ``post_loss``, ``improvement``,
    ``rolling_post``, ``rolling_improvement`` and ``num_skipped``. Runs outside ``jit``: the
    per-clip arrays are copied to the host once.

    Args:
        writer: a metric writer (e.g. ``runlog.create_writer(workdir)``).
        result: what :func:`run_protocol` returned.
        prefix: prepended to every scalar's name (e.g. ``"layernorm/reset/"``).
    """
    n = result.count
    writer.write_scalars(
        0,
        {
            f"{prefix}trainable_params": n.trainable,
            f"{prefix}total_params": n.total,
            f"{prefix}trainable_share": n.share,
        },
    )
    m = result.metrics
    arrays = {name: jax.device_get(getattr(m, name)) for name in CLIP_METRICS}
    arrays["num_skipped"] = jax.device_get(m.num_skipped)
    for c in range(arrays["pre_loss"].shape[0]):
        writer.write_scalars(c, {f"{prefix}{k}": v[c] for k, v in arrays.items()})
    writer.flush()


def summarize(result: ProtocolResult) -> dict[str, float]:
    """The numbers of a summary-table row, as Python floats and ints (what pre and post
    measure is the result's ``metric``).

    ``mean_pre`` / ``mean_post`` / ``mean_improvement`` average over all clips;
    ``final_rolling_post`` is the rolling mean of the post-adapt loss after the last clip.
    """
    m = jax.device_get(result.metrics)
    return {
        "num_clips": int(m.pre_loss.shape[0]),
        "trainable_params": int(result.count.trainable),
        "total_params": int(result.count.total),
        "trainable_share": float(result.count.share),
        "mean_pre": float(m.pre_loss.mean()),
        "mean_post": float(m.post_loss.mean()),
        "mean_improvement": float(m.improvement.mean()),
        "final_rolling_post": float(m.rolling_post[-1]),
        "final_rolling_improvement": float(m.rolling_improvement[-1]),
        "num_skipped": int(m.num_skipped.sum()),
    }


def format_summary_table(rows: Mapping[str, Mapping[str, float]], metric: str = "") -> str:
    """A markdown table of :func:`summarize` outputs, one row per named run, and a line saying
    what pre and post measure (``metric``: a :class:`ProtocolResult`'s ``metric``)."""
    head = (
        "| run | trainable (share) | mean pre | mean post | mean improvement | final rolling post |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for name, s in rows.items():
        lines.append(
            f"| {name} | {s['trainable_params']} ({100 * s['trainable_share']:.2f}%) | "
            f"{s['mean_pre']:.4g} | {s['mean_post']:.4g} | {s['mean_improvement']:.3g} | "
            f"{s['final_rolling_post']:.4g} |"
        )
    if metric:
        lines.append(f"\npre/post: {metric}")
    return "\n".join(lines)
