"""The drift stream protocol: the schedule, the method names, the compiled stream runner and
the per-segment summary of a run (see the package docstring)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metattt import adapters, drift, objectives, stats
from metattt.data import digits_c


def schedule(corruption: str, cfg) -> list:
    """The stream's drift: clean, then severities 1..5 of ``corruption``, then clean."""
    return digits_c.ramp(corruption, cfg.stream.clean_steps, cfg.stream.steps_per_severity)


def num_stream_steps(cfg) -> int:
    return cfg.stream.clean_steps + 5 * cfg.stream.steps_per_severity + cfg.stream.after_steps


def segments(cfg) -> dict[str, tuple[int, int]]:
    """Named step ranges of the stream: clean, sev1..sev5, after; and post_drift = [T, end)."""
    t0, length = cfg.stream.clean_steps, cfg.stream.steps_per_severity
    end = num_stream_steps(cfg)
    out = {"clean": (0, t0)}
    for s in range(1, 6):
        out[f"sev{s}"] = (t0 + (s - 1) * length, t0 + s * length)
    out["after"] = (t0 + 5 * length, end)
    out["drift"] = (t0, t0 + 5 * length)
    out["post_drift"] = (t0, end)
    return out


OBJECTIVES = {"entropy": 0.0, "im": 1.0}  # diversity weight w of the adaptation loss


def parse_method(method: str) -> tuple[str, int]:
    """``"none"`` -> ("none", 0); ``"static:8"`` -> ("static", 8); ``"dynamic"`` -> ("dynamic", 0).

    Raises:
        ValueError: any other name, or a static rank that is not a positive int.
    """
    kind, _, rank = method.partition(":")
    if kind in ("none", "dynamic") and not rank:
        return kind, 0
    if kind == "static" and rank.isdigit() and int(rank) >= 1:
        return kind, int(rank)
    raise ValueError(
        f"unknown drift_adapters method {method!r}; known: none, dynamic, static:R (R >= 1)"
    )


class StreamRunner:
    """The compiled pieces of the stream protocol, shared by every method, seed and stream.

    ``step(lora, opt_state, params, norm, x, y, w) -> (lora, opt_state, entropy, correct)``:
    predictions of the batch (their mean entropy and number correct), then one step of
    ``adapters.make_step`` on the adapter with the loss ``H(p) - w * H(mean p)`` (w = 0: TENT's
    entropy; w = 1: SHOT's information maximisation, which resists collapse onto few classes).
    ``w`` is an argument, so both objectives share the compiled step. ``alloc``, ``realloc``
    and ``free`` are the jitted adapter surgeries with a traced rank. ``traces`` counts how
    often the step was traced (1 if nothing ever recompiles).
    """

    def __init__(self, net, cfg):
        self.net = net
        self.cfg = cfg
        self.opt = optax.adam(cfg.adapter.lr)
        self.traces = 0
        hidden = cfg.backbone.hidden
        self.lora0 = adapters.lora_init(
            hidden, 10, cfg.adapter.max_rank, scale=cfg.adapter.alpha / cfg.adapter.max_rank
        )

        def logits_fn(lora, params, norm, x):
            h, _ = net.features(params, norm, x, batch_stats=False)
            k, b = params["head"]["kernel"], params["head"]["bias"]
            return adapters.lora_apply(h, k, lora, b)

        def loss_fn(lora, batch):
            self.traces += 1  # runs only while tracing
            params, norm, x, weight = batch
            logits = logits_fn(lora, params, norm, x)
            mean_p = jnp.mean(jax.nn.softmax(logits, -1), axis=0)
            diversity = -jnp.sum(mean_p * jnp.log(mean_p + 1e-8))
            return objectives.entropy(logits) - weight * diversity

        adapt_step = adapters.make_step(loss_fn, self.opt)

        def step(lora, opt_state, params, norm, x, y, weight):
            logits = logits_fn(lora, params, norm, x)
            correct = jnp.sum(jnp.argmax(logits, -1) == y)
            lora, opt_state, _ = adapt_step(lora, opt_state, (params, norm, x, weight))
            return lora, opt_state, objectives.entropy(logits), correct

        def source_entropy(params, norm, xs):
            def one(x):
                logits, _ = net.apply(params, norm, x, batch_stats=False)
                return objectives.entropy(logits)

            return jax.lax.map(one, xs)

        self.step = jax.jit(step)
        self.alloc = jax.jit(adapters.alloc)
        self.realloc = jax.jit(adapters.realloc)
        self.free = jax.jit(adapters.free)
        self.source_entropy = jax.jit(source_entropy)
        self.monitor = drift.stream_monitor(
            drift.page_hinkley(
                warmup=cfg.detector.warmup,
                delta=cfg.detector.delta,
                threshold=cfg.detector.threshold,
            ),
            drift.recovery_rule(
                k=cfg.recovery.k, patience=cfg.recovery.patience, smoothing=cfg.recovery.smoothing
            ),
        )
        self.run_monitor = jax.jit(lambda s: drift.run_stream(self.monitor, s))

    def run(self, method: str, objective: str, params, norm, stream, key) -> dict[str, Any]:
        """One method with one objective on one stream: per-step arrays and the event log."""
        kind, static_rank = parse_method(method)
        cfg = self.cfg.adapter
        weight = jnp.float32(OBJECTIVES[objective])
        xs = stream.x.reshape(stream.x.shape[0], stream.x.shape[1], -1)
        ys = stream.y
        signal = self.source_entropy(params, norm, xs)
        flags = jax.device_get(self.run_monitor(signal))
        warm = np.asarray(signal[: self.cfg.detector.warmup])
        grow_level = float(warm.mean() + cfg.grow_k * warm.std(ddof=1))
        lora, opt_state = self.lora0, self.opt.init(self.lora0.factors)
        rank, smoothed, above, events = 0, None, 0, []

        def change(op, t, new_rank):
            nonlocal lora, opt_state, rank, key
            key, sub = jax.random.split(key)
            if op == "free":
                lora, opt_state = self.free(lora, opt_state)
            elif op == "alloc":
                lora, opt_state = self.alloc(lora, opt_state, jnp.int32(new_rank), sub)
            else:
                lora, opt_state = self.realloc(lora, opt_state, jnp.int32(new_rank), sub)
            events.append((op, int(t), int(rank), int(new_rank)))
            rank = new_rank

        if kind == "static":
            change("alloc", 0, static_rank)
        num_steps = xs.shape[0]
        ranks = np.zeros(num_steps, np.int32)
        outputs = []  # device scalars; only the dynamic scheme reads them step by step
        for t in range(num_steps):
            if kind == "dynamic":
                if flags.recovered[t] and rank > 0:
                    change("free", t, 0)
                elif flags.alarm[t] and rank == 0:
                    change("alloc", t, cfg.init_rank)
                    smoothed, above = None, 0
            ranks[t] = rank
            lora, opt_state, ent, c = self.step(lora, opt_state, params, norm, xs[t], ys[t], weight)
            outputs.append((ent, c))
            if kind == "dynamic" and rank > 0:
                # Grow while the adapted model's own (smoothed) entropy stays high.
                ent, beta = float(ent), cfg.loss_smoothing
                smoothed = ent if smoothed is None else (1 - beta) * smoothed + beta * ent
                above = above + 1 if smoothed > grow_level else 0
                if above >= cfg.grow_patience and rank < cfg.max_rank:
                    change("realloc", t + 1, min(2 * rank, cfg.max_rank))
                    above = 0
        entropies, correct = (np.asarray(v) for v in zip(*jax.device_get(outputs), strict=True))
        batch = xs.shape[1]
        return {
            "accuracy": (correct / batch).tolist(),
            "rank": ranks.tolist(),
            "active_params": (ranks * (self.cfg.backbone.hidden + 10)).tolist(),
            "adapted_entropy": entropies.astype(np.float64).tolist(),
            "source_entropy": np.asarray(signal).tolist(),
            "alarms": np.flatnonzero(flags.alarm).tolist(),
            "recoveries": np.flatnonzero(flags.recovered).tolist(),
            "grow_level": grow_level,
            "events": events,
        }


def summarize_stream(run: dict[str, Any], cfg) -> dict[str, float]:
    """Per-segment accuracy, mean active parameters and the number of reallocations."""
    acc = np.asarray(run["accuracy"])
    out = {f"acc_{name}": float(acc[a:b].mean()) for name, (a, b) in segments(cfg).items()}
    out["mean_active_params"] = float(np.mean(run["active_params"]))
    out["reallocations"] = float(len(run["events"]))
    out["grows"] = float(sum(e[0] == "realloc" for e in run["events"]))
    out["max_rank"] = float(np.max(run["rank"]))
    return out


def summarize(streams: dict[str, dict[str, list]], cfg) -> dict[str, Any]:
    """Per method: every metric of :func:`summarize_stream` as a mean and 95% CI.

    Each metric first averages a seed's runs over the corruptions, so its CI is over seeds
    (``seeds`` holds the per-seed values); ``per_corruption`` keeps the corruptions apart
    (mean over seeds).
    """
    out: dict[str, Any] = {}
    for method, by_corruption in streams.items():
        per_run = {c: [summarize_stream(r, cfg) for r in runs] for c, runs in by_corruption.items()}
        keys = next(iter(per_run.values()))[0].keys()
        num_seeds = len(next(iter(per_run.values())))
        entry: dict[str, Any] = {}
        for k in keys:
            seed_means = [
                float(np.mean([per_run[c][s][k] for c in per_run])) for s in range(num_seeds)
            ]
            ci = stats.mean_ci(seed_means)
            entry[k] = {"mean": ci.mean, "ci": ci.half_width, "seeds": seed_means}
        entry["per_corruption"] = {
            c: {k: float(np.mean([r[k] for r in runs])) for k in keys}
            for c, runs in per_run.items()
        }
        out[method] = entry
    return out
