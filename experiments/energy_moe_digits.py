"""Energy-aware TTT of a MoE classifier on digits-C: clean digits -> a corrupted stream.

The digits half of issue 5; the machinery (methods, serving and monitor accounting, budgets,
aggregation, Pareto front, matched-accuracy comparison, tables and plots) is
:mod:`experiments.energy_moe`'s, with the error rate as the metric. Per seed, a top-k MoE
transformer with experts of different widths reads each 8x8 digit as 64 pixel tokens
(intensities quantised to 0..16, vocabulary 17), classifies the mean-pooled final states, and
is trained on the clean digits of the train split (cross-entropy plus the Switch load-balancing
and router z-losses). It then serves a stream of test digits that cycles through corruptions
of :mod:`metattt.data.digits_c` at several severities, *prequentially*: each batch is scored
(error rate) before the method may adapt on it. Adaptation is label-free TENT: the entropy of
the class predictions (plus λ_energy · E for the energy-aware methods), of the parameters the
config names (router and norms by default).

Energy is the simulated monitor's, per token as in the LM half; one image is 64 tokens, so the
energy per example is 64 times the per-token figures. The accuracy target is absolute: an
energy-aware point counts when it saves >= 20% of the dynamic energy and loses < 5 accuracy
points (error change < 0.05) against no TTT.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import numpy as np

from experiments import energy_moe as em
from experiments import report
from metattt.data import digits_c
from metattt.models import moe

LEVELS = 17  # digits pixels are integers 0..16: one token per intensity
PIXELS = 64  # 8 x 8 tokens per image
NUM_CLASSES = 10
ERROR = em.Metric("error", "error", 1.0, False, "prediction entropy of the adapted images (nats)")


def model_config(cfg, top_k: int | None = None) -> moe.MoEConfig:
    """The MoE classifier: pixel-token vocabulary, 64 positions, a 10-way head."""
    return em.model_config(cfg, top_k, vocab_size=LEVELS, num_classes=NUM_CLASSES)


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    d = cfg.data
    if d.length != PIXELS:
        raise ValueError(f"data.length must be {PIXELS} (one token per pixel), got {d.length}")
    if d.batch < 1 or not 0 < d.test_fraction < 1:
        raise ValueError("need data.batch >= 1 and data.test_fraction in (0, 1)")
    if not d.corruptions or not d.severities:
        raise ValueError("data.corruptions and data.severities must be non-empty")
    for name in d.corruptions:
        if name not in digits_c.CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; known: {list(digits_c.CORRUPTIONS)}")
    if any(not 1 <= s <= 5 for s in d.severities):
        raise ValueError(f"data.severities must be in 1..5, got {tuple(d.severities)}")
    segments = len(d.corruptions) * len(d.severities)
    if d.stream_batches < segments or d.stream_batches % segments:
        raise ValueError(
            f"data.stream_batches must be a positive multiple of the {segments} "
            f"(corruption, severity) segments, got {d.stream_batches}"
        )
    em.validate_methods(cfg, model_config(cfg))


def tokens(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) images in [0, 1] -> (N, 64) int32 tokens ``round(16 x)`` (row-major)."""
    images = np.asarray(images)
    return (
        np.rint(np.clip(images, 0.0, 1.0) * (LEVELS - 1)).astype(np.int32).reshape(len(images), -1)
    )


class Examples(NamedTuple):
    """Images as token sequences: ``inputs`` (N, 64) int32, ``targets`` (N,) int32 labels."""

    inputs: np.ndarray
    targets: np.ndarray


def schedule(cfg) -> list[tuple[int, int, str, int]]:
    """Equal segments cycling through every (corruption, severity) pair, severity-major."""
    d = cfg.data
    pairs = [(c, s) for s in d.severities for c in d.corruptions]
    length = d.stream_batches // len(pairs)
    return [(i * length, (i + 1) * length, c, int(s)) for i, (c, s) in enumerate(pairs)]


def shifted_stream(cfg, x_test: np.ndarray, y_test: np.ndarray, seed: int) -> Examples:
    """(S·B,) corrupted test images as tokens, per :func:`schedule` (seeded)."""
    s = digits_c.make_stream(
        x_test,
        y_test,
        schedule(cfg),
        num_steps=cfg.data.stream_batches,
        batch_size=cfg.data.batch,
        seed=em.TEST_SEED + seed,
    )
    return Examples(tokens(s.x.reshape(-1, *s.x.shape[2:])), s.y.reshape(-1))


def digit_batches(cfg, seed: int, x: np.ndarray, y: np.ndarray):
    """``first -> stacked (tokens, labels)`` of clean digits for one call (with replacement).

    The draw of call ``c`` uses its own generator, seeded ``(seed, c)``, so a resumed run
    draws what an uninterrupted one would.
    """
    chunk, batch = cfg.train.steps_per_call, cfg.train.batch
    data = tokens(x)

    def batches(first: int):
        rng = np.random.default_rng((seed, first // chunk))
        idx = rng.integers(0, len(data), size=(chunk, batch))
        return data[idx], y[idx]

    return batches


def clean_error(cfg, rt: em.Runtime, params: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Error rate on clean images, in batches of the stream's shape (no new compilation)."""
    b = cfg.data.batch
    n = len(x) // b * b
    data, labels = tokens(x[:n]), y[:n]
    mask = np.ones((rt.mcfg.num_experts,), bool)
    errors = [
        float(rt.infer[rt.mcfg.top_k](params, data[i : i + b], labels[i : i + b], mask)[0])
        for i in range(0, n, b)
    ]
    return float(np.mean(errors))


def run(cfg, workdir: str) -> dict[str, Any]:
    """Train per seed on clean digits, serve the corrupted stream with every method, report."""
    validate(cfg)
    rt = em.build_runtime(cfg, model_config(cfg), head="class")

    def prepare(seed):
        x_tr, y_tr, x_te, y_te = digits_c.load_digits_split(seed, cfg.data.test_fraction)

        def fit():
            batches = digit_batches(cfg, seed, x_tr, y_tr)
            params, loss, seconds = em.pretrain(cfg, rt, seed, batches, em.train_dir(workdir, seed))
            info = {
                "train_loss_nats": loss,
                "train_seconds": seconds,
                "clean_test_error": clean_error(cfg, rt, params, x_te, y_te),
            }
            return params, info

        params, info = em.cached_params(rt, seed, workdir, fit)
        return params, shifted_stream(cfg, x_te, y_te, seed), info

    results, _ = em.run_methods(
        cfg, workdir, rt, prepare, summary_fn=summary, metric=ERROR, prefix="energy_moe_digits"
    )
    return results


def summary(results: dict[str, Any], cfg) -> str:
    """The energy_moe tables with the error rate as the metric."""
    del cfg
    return em.summary_tables(results, ERROR)


def write_report(results: dict[str, Any], cfg, workdir: str) -> None:
    """Put tables, plots and provenance into BENCHMARKS.md's energy_moe_digits section."""
    cells = em.load_cells(cfg, workdir)
    root = report.BENCHMARKS.parent
    em.plot_all(results, cells, str(root / "docs" / "figures"), metric=ERROR,
                prefix="energy_moe_digits")  # fmt: skip
    mcfg = model_config(cfg)
    info = results["seed_info"]
    n_params = sum(x.size for x in jax.tree.leaves(moe.init_moe(mcfg).params))
    monitor = results["monitor"] + (
        f" (fallback: {results['monitor_fallback']})" if results["monitor_fallback"] else ""
    )
    rows = results["methods"]
    per_image = ", ".join(
        f"{n} {PIXELS * rows[n]['uj_per_token']['mean']:.3f}"
        for n in rows
        if results["kinds"][n] in ("no_ttt", "ttt", "prune", "top_k")
    )
    segs = ", ".join(f"{c} s{s}" for _, _, c, s in schedule(cfg))
    body = "\n".join(
        [
            "## Energy-aware TTT for a mixture-of-experts classifier on digits-C (issue 5)",
            "",
            f"- Date: {report.today()}; machine: {report.machine()}.",
            "- Command: `python -m experiments.run --config configs/energy_moe_digits.py "
            "--workdir runs/energy_moe_digits`.",
            f"- **Energy is simulated** (monitor: {monitor}), with the accounting of the "
            "energy_moe section (dense layers + the experts actually used, adaptation steps "
            f"charged {1 + em.BACKWARD_FACTOR:g}x their forward work, idle "
            f"{results['idle_power_w']:.0f} W, fixed power {results['fixed_power_w']:.1f} W, "
            f"r = {results['serving_rate_tokens_s']:.3g} tokens/s at utilisation "
            f"{cfg.monitor.utilization}). One image is {PIXELS} tokens: µJ per image = "
            f"{PIXELS} x µJ/token (e.g. {per_image}).",
            f"- Model: {mcfg.num_layers} layers, D={mcfg.d_model}, {mcfg.num_heads} heads, "
            f"E={mcfg.num_experts} SwiGLU experts of widths {list(mcfg.expert_widths)}, "
            f"top-{mcfg.top_k}, dropless, 10-way head on the mean-pooled states, {n_params} "
            f"parameters; each image is 64 pixel tokens (intensity 0..16). Trained "
            f"{cfg.train.num_steps} Adam steps (lr {cfg.train.lr}, batch {cfg.train.batch}) on "
            "the clean train split of scikit-learn's digits; clean test error per seed: "
            + ", ".join(f"{i['clean_test_error']:.3f}" for i in info)
            + "; training took "
            + ", ".join(f"{i['train_seconds']:.0f}" for i in info)
            + " s per seed.",
            f"- Shifted stream: {cfg.data.stream_batches} batches of {cfg.data.batch} test "
            f"images ({cfg.data.test_fraction:.0%} split, drawn per batch), in equal segments: "
            f"{segs}; scored prequentially (error of each batch before any adaptation on it). "
            f"TTT: TENT (label-free prediction entropy) of {cfg.ttt.params}, Adam lr "
            f"{cfg.ttt.lr}, {cfg.ttt.steps} step(s) on {cfg.ttt.windows} images of every "
            f"{cfg.ttt.every}th batch, cumulative. Budget controller as in energy_moe "
            f"(patience {cfg.budget.patience}).",
            f"- Seeds {tuple(cfg.seeds)} (init, training batches, split, stream); means ± 95% "
            "t-interval over seeds; error changes are absolute (pp = accuracy points) per seed "
            "relative to no_ttt, then averaged.",
            "",
            summary(results, cfg),
            "",
            "**Reading (computed from the numbers above):**",
            "",
            *em.reading(results, ERROR),
            "",
            *(
                f"![{plot}](docs/figures/energy_moe_digits_{plot}.png)"
                for plot in em.PLOTS
                if plot != "budget" or "budget" in results["kinds"].values()
            ),
        ]
    )
    report.publish("energy_moe_digits", body, results)


def demo_rows(workdir: str) -> list[tuple[str, str, str, float, float, float]]:
    """``make demo``: no TTT vs energy-aware TENT on the demo config's corrupted digits.

    Returns rows ``(system, method, metric, before, after, seconds)``: the simulated dynamic
    energy per image (adaptation included) and the prequential error.
    """
    from configs import energy_moe_digits as digits_config  # configs are read by experiments

    cfg = digits_config.get_config("demo")
    cfg.budget.fractions = ()
    cfg.baselines.prune = ()
    cfg.baselines.top_k = ()
    start = time.perf_counter()
    results = run(cfg, f"{workdir}/energy_moe_digits")
    seconds = time.perf_counter() - start
    rows = results["methods"]
    base, aware = rows["no_ttt"], rows[f"energy_ttt/{cfg.ttt.lambdas[0]:g}"]
    system, method = "energy-aware MoE TTT", f"TENT+energy (λ={cfg.ttt.lambdas[0]:g})"
    return [
        (system, method, "sim. dyn. energy/image, digits-C (µJ)",
         PIXELS * base["uj_per_token"]["mean"], PIXELS * aware["uj_per_token"]["mean"], seconds),
        (system, method, "error, digits-C stream", base["error"]["mean"],
         aware["error"]["mean"], seconds),
    ]  # fmt: skip
