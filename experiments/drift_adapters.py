"""Drift-triggered dynamic-rank adapters on digits-C, and TENT vs norm statistics (issue 6, A).

Backbone. :func:`metattt.models.digits_net.digits_net` (64 -> 128 -> 10, batch norm with
explicit statistics), trained with cross-entropy on the clean train split.

Drift stream. Test-split digits through :func:`metattt.data.digits_c.make_stream`: clean for
``stream.clean_steps`` steps (longer than the detector's warm-up), then a corruption that
switches on at severity 1, intensifies to 5 and switches off (:func:`~digits_c.ramp`), then
clean again for ``stream.after_steps`` steps. One stream per corruption in
``stream.corruptions`` and per seed.

Unsupervised signal. The *source* model's mean prediction entropy per batch. The source model
is frozen, so this signal measures the input distribution and not the adapter's own
confidence: entropy minimisation lowers the adapted model's entropy while the drift is still
there, and a monitor on that signal would free the adapter too early. Because the source model
never changes, the signal of the whole stream is computed in one batched call and the causal
monitor (:func:`metattt.drift.stream_monitor` of Page-Hinkley and the recovery rule) is
scanned over it with :func:`metattt.drift.run_stream`; step t's flags depend on steps <= t only.

Methods, all on a LoRA adapter of the classifier head (128 -> 10) in a max-rank buffer:

* ``none`` -- no adaptation (the adapter stays at rank 0, so its term is exactly zero);
* ``static:R`` -- rank R allocated at t = 0 and adapted on every batch (the issue's static
  adapter is ``static:8``; ``static:2`` is a static adapter of about the dynamic one's mean
  size);
* ``dynamic`` -- at an alarm :func:`~metattt.adapters.alloc` rank ``adapter.init_rank``; while
  the adapted model's smoothed prediction entropy stays above the clean baseline mean plus
  ``adapter.grow_k`` baseline standard deviations for ``adapter.grow_patience`` steps,
  :func:`~metattt.adapters.realloc` to twice the rank (2 -> 4 -> 8); at recovery,
  :func:`~metattt.adapters.free`.

Every method predicts a batch, then takes one Adam step on the adapter with that batch; the
reported accuracy is that of the predictions made before the step (online evaluation). The
unsupervised loss is one of ``OBJECTIVES``: ``entropy`` (TENT, Wang et al. 2021) or ``im``,
entropy minus the entropy of the batch's mean prediction (information maximisation, SHOT,
Liang et al. 2020), which keeps entropy minimisation from collapsing onto a few classes. One
jitted step serves every method, objective, seed and rank: ranks are masks and the objective's
weight is an argument; the number of traces is recorded (``step_traces``) and checked by the
tests.

TENT comparison. For each corruption and severity the whole test split, corrupted, is fed in
batches to: the source model (running statistics), normalisation-statistics adaptation (each
test batch normalised with its own statistics) and TENT (batch statistics plus one Adam step
of entropy minimisation on the normalisation layer's scale and bias per batch, reset for each
corruption and severity). Error rates over 3 seeds (backbone, split and corruption draws).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import harness, report
from metattt import adapters, drift, objectives, runlog, stats, train, tta
from metattt import params as P
from metattt.data import digits_c
from metattt.models.digits_net import digits_net

logger = logging.getLogger(__name__)

TENT_METHODS = ("source", "norm", "tent")


# ----------------------------------------------------------------------------------- backbone


BACKBONE_STEPS_PER_CALL = 100


@functools.lru_cache(maxsize=4)
def _backbone_program(hidden: int, momentum: float, lr: float, weight_decay: float):
    """``(net, step)``: the backbone and its AdamW cross-entropy step, the normalisation's
    running statistics carried as model state; cached so that the seeds share a compilation."""
    net = digits_net(hidden=hidden, momentum=momentum)

    def loss_fn(params, norm, batch):
        x, y = batch
        logits, norm = net.apply(params, norm, x, batch_stats=True)
        return objectives.cross_entropy(logits, y), norm

    opt = optax.adamw(lr, weight_decay=weight_decay)
    return net, train.supervised(loss_fn, opt, has_state=True, jit=False)


def train_backbone(x_train: np.ndarray, y_train: np.ndarray, seed: int, cfg, workdir: str):
    """Train the backbone with cross-entropy on clean images: ``(net, params, norm_stats)``.

    ``cfg.backbone.train_steps`` AdamW steps on batches drawn from ``(seed, 1)``, with the
    normalisation layer in training mode (batch statistics, running statistics updated);
    :func:`metattt.train.fit` checkpoints in ``workdir``, so a killed run resumes.
    """
    b = cfg.backbone
    net, step = _backbone_program(b.hidden, b.norm_momentum, b.lr, b.weight_decay)
    params, norm = net.init(jax.random.key(seed))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    idx = np.stack(
        [rng.choice(len(x_train), b.batch_size, replace=False) for _ in range(b.train_steps)]
    )
    flat = x_train.reshape(len(x_train), -1)
    chunk = BACKBONE_STEPS_PER_CALL

    def batches(first: int):
        rows = idx[first : first + chunk]
        return flat[rows], y_train[rows]

    memory = runlog.MemoryWriter()
    state = train.fit(
        step,
        step.init(params, norm),
        batches,
        stacked=True,
        num_steps=b.train_steps,
        steps_per_call=chunk,
        checkpoint_every=chunk,
        log_every=chunk,
        workdir=workdir,
        writer=memory,
        show_progress=False,
    )
    if memory.history:
        logger.info("backbone seed %d: last train loss %.4f", seed, memory.last("loss"))
    return net, state.params, state.model_state


# ------------------------------------------------------------------------------- drift stream


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


# ----------------------------------------------------------------------------- TENT vs norm


def make_tent_eval(net, cfg):
    """A jitted ``(params, norm, xs (N, B, D_in), ys (N, B)) -> {method: errors (N,)}``.

    The batches are a stream in order: TENT (:func:`metattt.tta.run_clips`, cumulative) carries
    its normalisation parameters over from batch to batch, and each batch's error is that of
    the predictions made before any update on it (prequential).
    """
    opt = optax.adam(cfg.tent.lr)

    def evaluate(params, norm, xs, ys):
        mask = P.select(params, "layernorm")
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


# ------------------------------------------------------------------------------------- run


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    if not cfg.seeds:
        raise ValueError("config.seeds is empty")
    for name in (*cfg.stream.corruptions, *cfg.tent.corruptions):
        if name not in digits_c.CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; known: {list(digits_c.CORRUPTIONS)}")
    a = cfg.adapter
    for method in cfg.methods:
        kind, rank = parse_method(method)
        if rank > a.max_rank:
            raise ValueError(f"method {method!r}: rank exceeds adapter.max_rank = {a.max_rank}")
    for objective in cfg.objectives:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {list(OBJECTIVES)}")
    if not 1 <= a.init_rank <= a.max_rank:
        raise ValueError(
            f"adapter.init_rank ({a.init_rank}) must be in [1, adapter.max_rank = {a.max_rank}]"
        )
    if cfg.stream.clean_steps <= cfg.detector.warmup:
        raise ValueError(
            f"stream.clean_steps ({cfg.stream.clean_steps}) must exceed detector.warmup "
            f"({cfg.detector.warmup})"
        )
    if cfg.tent.steps_per_batch < 1:
        raise ValueError(f"tent.steps_per_batch must be >= 1, got {cfg.tent.steps_per_batch}")


def run(cfg, workdir: str) -> dict[str, Any]:
    """Every seed: train, run the drift streams and the TENT comparison; write results."""
    validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    timing = {"backbone": 0.0, "streams": 0.0, "tent": 0.0}
    streams: dict[str, dict[str, dict[str, list]]] = {
        o: {m: {} for m in cfg.methods} for o in cfg.objectives
    }
    tent: list[dict[str, Any]] = []
    backbone_acc = []
    runner = None
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        x_tr, y_tr, x_te, y_te = digits_c.load_digits_split(seed, cfg.data.test_fraction)
        backbone_dir = os.path.join(workdir, "backbone", f"seed_{seed}")
        net, params, norm = train_backbone(x_tr, y_tr, seed, cfg, backbone_dir)
        logits, _ = net.apply(params, norm, x_te, batch_stats=False)
        backbone_acc.append(float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y_te))))
        t1 = time.perf_counter()
        runner = runner or StreamRunner(net, cfg)
        for i, corruption in enumerate(cfg.stream.corruptions):
            stream = digits_c.make_stream(
                x_te,
                y_te,
                schedule(corruption, cfg),
                num_steps=num_stream_steps(cfg),
                batch_size=cfg.stream.batch_size,
                seed=seed * 1000 + i,
            )
            for objective in cfg.objectives:
                for method in cfg.methods:
                    first = cfg.objectives[0]
                    if method == "none" and objective != first:  # the objective plays no part
                        one = streams[first][method][corruption][-1]
                    else:
                        key = jax.random.key(seed * 1000 + i)
                        cell = f"{objective}_{method.replace(':', '_')}_{corruption}.json"
                        one = harness.json_cell(
                            os.path.join(workdir, "streams", f"seed_{seed}", cell),
                            lambda m=method, o=objective, s=stream, k=key: runner.run(
                                m, o, params, norm, s, k
                            ),
                        )
                    streams[objective][method].setdefault(corruption, []).append(one)
        t2 = time.perf_counter()
        if cfg.tent.enabled:
            tent.append(tent_comparison(net, params, norm, x_te, y_te, seed, cfg))
        t3 = time.perf_counter()
        for name, dt in (("backbone", t1 - t0), ("streams", t2 - t1), ("tent", t3 - t2)):
            timing[name] += dt
    results = {
        "backbone_clean_accuracy": backbone_acc,
        "streams": streams,
        "summary": {o: summarize(by_method, cfg) for o, by_method in streams.items()},
        "tent": tent,
        "tent_summary": summarize_tent(tent) if tent else {},
        "step_traces": runner.traces,
        "seconds": time.perf_counter() - start,
        "timing": timing,
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot_stream(results, cfg, os.path.join(workdir, "drift_adapters_stream.png"))
    for objective, per_method in results["summary"].items():
        logger.info("objective %s:\n%s", objective, stream_table(per_method))
    return results


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


def summarize_tent(tent: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95% CI over seeds of each method's error for every corruption/severity key."""
    out: dict[str, Any] = {}
    for key in tent[0]:
        out[key] = {}
        for m in TENT_METHODS:
            ci = stats.mean_ci([t[key][m] for t in tent])
            out[key][m] = {"mean": ci.mean, "ci": ci.half_width}
    return out


# ------------------------------------------------------------------------------- reporting


def _cell(entry: dict[str, float], digits: int = 3, scale: float = 1.0) -> str:
    mean, ci = entry["mean"] * scale, entry["ci"] * scale
    if not np.isfinite(ci):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"


def summary(results: dict[str, Any], cfg) -> str:
    """The tables :mod:`experiments.run` prints at the end."""
    streams = [
        f"Objective `{name}`:\n\n{stream_table(table)}"
        for name, table in results["summary"].items()
    ]
    return "\n\n".join([*streams, tent_tables(results["tent_summary"], cfg)])


def stream_table(summary: dict[str, Any]) -> str:
    """Markdown: accuracy per segment, post-drift accuracy, active params, reallocations."""
    cols = ["clean", "sev1", "sev2", "sev3", "sev4", "sev5", "after", "post_drift"]
    head = ["method", *[f"acc {c}" for c in cols], "mean active params", "reallocations"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, s in summary.items():
        cells = [_cell(s[f"acc_{c}"]) for c in cols]
        cells += [_cell(s["mean_active_params"], 0), _cell(s["reallocations"], 1)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_corruption_table(summary: dict[str, Any]) -> str:
    """Markdown: post-drift accuracy and mean active params per corruption and method."""
    methods = list(summary)
    corruptions = list(summary[methods[0]]["per_corruption"])
    head = ["corruption", *[f"{m} post-drift acc" for m in methods]]
    head += [f"{m} active params" for m in methods if m != "none"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for c in corruptions:
        cells = [f"{summary[m]['per_corruption'][c]['acc_post_drift']:.3f}" for m in methods]
        cells += [
            f"{summary[m]['per_corruption'][c]['mean_active_params']:.0f}"
            for m in methods
            if m != "none"
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tent_tables(tent_summary: dict[str, Any], cfg) -> str:
    """Markdown: error (%) per corruption (mean over severities) and per severity."""
    lines = ["| corruption | " + " | ".join(f"{m} error %" for m in TENT_METHODS) + " |"]
    lines.append("|---" * (len(TENT_METHODS) + 1) + "|")
    clean = tent_summary["clean"]
    lines.append("| clean | " + " | ".join(_cell(clean[m], 1, 100) for m in TENT_METHODS) + " |")
    for c in cfg.tent.corruptions:
        keys = [f"{c}/{s}" for s in cfg.tent.severities]
        cells = [
            f"{100 * np.mean([tent_summary[k][m]['mean'] for k in keys]):.1f}" for m in TENT_METHODS
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "| severity | " + " | ".join(f"{m} error %" for m in TENT_METHODS) + " |"]
    lines.append("|---" * (len(TENT_METHODS) + 1) + "|")
    for s in cfg.tent.severities:
        keys = [f"{c}/{s}" for c in cfg.tent.corruptions]
        cells = [
            f"{100 * np.mean([tent_summary[k][m]['mean'] for k in keys]):.1f}" for m in TENT_METHODS
        ]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    kernel = np.ones(width) / width
    return np.convolve(
        np.pad(x, (width // 2, width - 1 - width // 2), mode="edge"), kernel, "valid"
    )


def plot_stream(results: dict[str, Any], cfg, path: str) -> None:
    """Accuracy over time per objective (smoothed; mean over seeds and corruptions) and the
    active adapter parameters over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives_ = list(results["streams"])
    fig, axes = plt.subplots(
        len(objectives_) + 1, 1, figsize=(7.5, 2.6 * (len(objectives_) + 1)), sharex=True
    )
    ax_par = axes[-1]
    for ax_acc, objective in zip(axes, objectives_, strict=False):
        for method, by_corruption in results["streams"][objective].items():
            runs = [r for rs in by_corruption.values() for r in rs]
            acc = np.mean([r["accuracy"] for r in runs], axis=0)
            (line,) = ax_acc.plot(_smooth(acc, cfg.plot.smooth), lw=1.2, label=method)
            if method != "none":
                active = np.mean([r["active_params"] for r in runs], axis=0)
                ax_par.plot(
                    active,
                    lw=1.2,
                    color=line.get_color(),
                    ls="-" if objective == objectives_[0] else "--",
                    label=f"{method} ({objective})",
                )
        ax_acc.set_ylabel(f"accuracy ({objective})")
        ax_acc.set_ylim(0, 1)
        ax_acc.legend(loc="lower left", fontsize=7)
    for name, (a, _) in segments(cfg).items():
        if name.startswith("sev") or name == "after":
            for ax in axes:
                ax.axvline(a, color="grey", lw=0.6, ls=":")
            axes[0].text(a + 2, 0.03, name, fontsize=7, color="grey")
    ax_par.set_ylabel("active adapter params")
    ax_par.set_xlabel("stream step")
    ax_par.legend(loc="upper left", fontsize=7)
    axes[0].set_title(
        f"digits-C drift streams ({', '.join(cfg.stream.corruptions)}); "
        f"moving mean over {cfg.plot.smooth} steps",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """The tables, the plot and the provenance into BENCHMARKS.md's drift_adapters section."""
    root = report.BENCHMARKS.parent
    figure = root / "docs" / "figures" / "drift_adapters_stream.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_stream(results, cfg, str(figure))
    s, a = cfg.stream, cfg.adapter
    acc = stats.mean_ci(results["backbone_clean_accuracy"])
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in results["timing"].items())
    lines = [
        "## Dynamic-rank adapters under drift, and TENT on digits-C (issue 6, part A)",
        "",
        f"- Date: {report.today()}; machine: {report.machine()}.",
        "- Command: `python -m experiments.run --config configs/drift_adapters.py "
        f"--workdir runs/drift_adapters` ({results['seconds']:.0f} s: {timing}).",
        f"- Backbone: MLP 64-{cfg.backbone.hidden}-10 with batch norm, "
        f"{cfg.backbone.train_steps} AdamW steps (batch {cfg.backbone.batch_size}) on the "
        f"clean train split; clean test accuracy {stats.format_ci(acc)} "
        f"(seeds {tuple(cfg.seeds)}; split, backbone and corruption draws vary with the seed).",
        f"- Stream: test-split digits, batch {s.batch_size}; {s.clean_steps} clean steps, "
        f"then severities 1-5 of one corruption for {s.steps_per_severity} steps each, then "
        f"{s.after_steps} clean steps; corruptions {', '.join(s.corruptions)}, one stream "
        "each per seed. Monitor: Page-Hinkley "
        f"(warm-up {cfg.detector.warmup}, threshold {cfg.detector.threshold}) + recovery "
        f"rule (k {cfg.recovery.k}, patience {cfg.recovery.patience}) on the frozen source "
        "model's batch entropy.",
        f"- Adapter: LoRA on the head (128 -> 10, {cfg.backbone.hidden + 10} parameters per "
        f"rank), max rank {a.max_rank}, scale {a.alpha}/{a.max_rank}, one Adam (lr {a.lr}) "
        "step per batch; `static:R` = rank R from t = 0; `dynamic` = rank "
        f"{a.init_rank} at an alarm, doubled while the adapted model's smoothed entropy "
        f"exceeds the clean mean + {a.grow_k} sd for {a.grow_patience} steps, freed at "
        f"recovery. The jitted step was traced {results['step_traces']} time(s) in the whole "
        "run (every method, objective, seed and rank change).",
        "- Objectives: `entropy` = TENT's mean prediction entropy; `im` = entropy minus the "
        "entropy of the batch's mean prediction (SHOT's information maximisation).",
        "- Accuracy is online (predictions before each batch's step); post_drift = every step "
        "from the drift's onset to the end; mean ± 95% CI over seeds (each seed averaged "
        "over the corruptions). Reallocations count alloc, grow and free events.",
    ]
    for objective, summary in results["summary"].items():
        lines += [
            "",
            f"Objective `{objective}`:",
            "",
            stream_table(summary),
            "",
            f"Objective `{objective}`, post-drift accuracy and mean active parameters per "
            "corruption (mean over seeds):",
            "",
            per_corruption_table(summary),
        ]
    lines += [
        "",
        "![accuracy and active adapter parameters over the stream]"
        "(docs/figures/drift_adapters_stream.png)",
    ]
    if results["tent_summary"]:
        lines += [
            "",
            "### Source vs normalisation statistics vs TENT on digits-C",
            "",
            f"Test split in batches of {cfg.tent.batch_size}, each corruption and severity "
            "a separate online pass (TENT reset in between): source = running statistics; "
            "norm = each batch normalised with its own statistics; TENT = batch statistics "
            f"+ {cfg.tent.steps_per_batch} Adam step(s) (lr {cfg.tent.lr}) of entropy "
            "minimisation on the norm layer's scale and bias per batch. Error in %, mean "
            f"over {len(cfg.seeds)} seeds (per corruption also over severities "
            f"{tuple(cfg.tent.severities)}; per severity over the corruptions); clean with "
            "95% CI over seeds; the per-(corruption, severity) numbers with CIs are in "
            "results.json.",
            "",
            tent_tables(results["tent_summary"], cfg),
        ]
    report.publish("drift_adapters", "\n".join(lines), results)


# ------------------------------------------------------------------------------------ demo


def demo_rows(workdir: str) -> list[tuple[str, str, str, float, float, float]]:
    """A seconds-long run for ``make demo``: one seed, one short stream, a small TENT table.

    Rows are ``(system, method, metric, before, after, seconds)``: post-drift accuracy
    without adaptation -> with each adapter (entropy objective), and digits-C error of the
    source model -> norm statistics / TENT (mean over the demo's corruptions and severities).
    """
    from configs import drift_adapters as config

    cfg = config.get_config("demo")
    results = run(cfg, os.path.join(workdir, "drift_adapters"))
    timing = results["timing"]
    per_method = (timing["backbone"] + timing["streams"]) / len(cfg.methods)
    by_method = results["summary"][cfg.objectives[0]]
    before = by_method["none"]["acc_post_drift"]["mean"]
    rows = [
        (
            "digits-C drift (dynamic LoRA)",
            method,
            "post-drift accuracy",
            before,
            by_method[method]["acc_post_drift"]["mean"],
            per_method,
        )
        for method in cfg.methods
        if method != "none"
    ]
    t = results["tent_summary"]
    keys = [k for k in t if k != "clean"]
    source = float(np.mean([t[k]["source"]["mean"] for k in keys]))
    for method in ("norm", "tent"):
        after = float(np.mean([t[k][method]["mean"] for k in keys]))
        rows.append(("digits-C (TENT 2021)", method, "error", source, after, timing["tent"] / 2))
    return rows
