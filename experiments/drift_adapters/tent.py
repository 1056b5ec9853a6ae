"""Source model vs normalisation statistics vs TENT on the corrupted test split."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metattt import objectives, stats, tta
from metattt import params as P
from metattt.data import digits_c

TENT_METHODS = ("source", "norm", "tent")


def make_tent_eval(net, cfg):
    """A jitted ``(params, norm, xs (N, B, D_in), ys (N, B)) -> {method: errors (N,)}``.

    The batches are a stream in order: TENT (:func:`metattt.tta.run_clips`, cumulative) carries
    its normalisation parameters over from batch to batch, and each batch's error is that of
    the predictions made before any update on it (prequential).
    """
    opt = optax.adam(cfg.tent.lr)

    def evaluate(params, norm, xs, ys):
        mask = P.select(params, "norm")  # the batch norm's scale and bias
        fast, slow = P.split(params, mask)

        def logits(p, x, batch_stats):
            return net.apply(p, norm, x, batch_stats=batch_stats)[0]

        def err(p, batch, batch_stats=True):
            x, y = batch
            return jnp.mean(jnp.argmax(logits(p, x, batch_stats), -1) != y)

        def entropy(p, batch):
            return objectives.entropy(logits(p, batch[0], True))

        tent = tta.run_clips(
            entropy,
            fast,
            slow,
            (xs, ys),
            opt=opt,
            num_steps=cfg.tent.steps_per_batch,
            reset_per_clip=False,
            eval_fn=err,
        )
        return {
            "source": jax.vmap(lambda x, y: err(params, (x, y), batch_stats=False))(xs, ys),
            "norm": jax.vmap(lambda x, y: err(params, (x, y)))(xs, ys),
            "tent": tent.pre_loss,
        }

    return jax.jit(evaluate)


def tent_comparison(net, params, norm, x_test, y_test, seed: int, cfg) -> dict[str, Any]:
    """Error of each TENT_METHODS per corruption and severity (0 = clean) on the test split."""
    batch = cfg.tent.batch_size
    num_batches = len(x_test) // batch
    evaluate = make_tent_eval(net, cfg)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    order = rng.permutation(len(x_test))[: num_batches * batch]
    ys = jnp.asarray(y_test[order].reshape(num_batches, batch))

    def errors(images):
        xs = jnp.asarray(images[order].reshape(num_batches, batch, -1))
        return {m: float(v.mean()) for m, v in evaluate(params, norm, xs, ys).items()}

    out = {"clean": errors(x_test)}
    for corruption in cfg.tent.corruptions:
        for severity in cfg.tent.severities:
            images = digits_c.corrupt(x_test, corruption, severity, seed=seed)
            out[f"{corruption}/{severity}"] = errors(images)
    return out


def summarize_tent(tent: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95% CI over seeds of each method's error for every corruption/severity key."""
    out: dict[str, Any] = {}
    for key in tent[0]:
        out[key] = {}
        for m in TENT_METHODS:
            ci = stats.mean_ci([t[key][m] for t in tent])
            out[key][m] = {"mean": ci.mean, "ci": ci.half_width}
    return out
