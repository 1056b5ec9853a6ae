"""Does the measured cost model pick the fastest MoE dispatch backend on shapes it never saw?

    python -m experiments.bench.kernel_choice [--train 36] [--held 16] [--repeats 5] [--write]

(about 12 min on the shared 2-core CPU, mostly compiling two programs per shape.)

Draws distinct dispatch shapes (seeded) from a grid -- T tokens in 32..1024, D in 16..128, F in
32..256, E in 2..16, top-1 or top-2, dropless or capacity factor 1, 1.25 or 2 -- leaving out
shapes whose capacity einsum would build a one-hot slot tensor over 2M elements (memory), and
splits them into a training and a held-out set. Every candidate backend of this device
(:func:`metattt.energy.kernel_costs.candidate_backends`: the capacity einsum ``reference`` and
``ragged``; the Pallas kernel is no candidate on the CPU, where it runs in the interpreter) is
timed on every shape (forward dispatch, float32, medians of interleaved calls), the timings are
stored in a JSON file keyed by device and JAX version, a cost model is fitted to the *training*
shapes only, and on each held-out shape its choice is compared with the backend that measured
fastest there. Reported: the hit rate, the time lost on misses (chosen minus fastest, summed
over the held-out shapes, as a share of the fastest's total), and the same loss for the two
fixed choices (always ``reference``; always ``ragged``, what ``backend="auto"`` resolves to on
this JAX without a proven kernel).

``--write`` replaces the section ``bench_kernel_choice`` of BENCHMARKS.md; ``--out`` is where
the timings are stored (default ``runs/bench_kernel_choice/kernel_costs.json``).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from experiments import report
from metattt.energy import kernel_costs as kc

SECTION = "bench_kernel_choice"
GRID = {
    "tokens": (32, 64, 128, 256, 512, 1024),
    "d_model": (16, 32, 64, 128),
    "d_ff": (32, 64, 128, 256),
    "experts": (2, 4, 8, 16),
    "top_k": (1, 2),
    "capacity_factor": (None, 1.0, 1.25, 2.0),
}
MAX_ONE_HOT = 2_000_000  # T·K·E·C elements of the einsum's slot tensor


def draw_shapes(count: int, seed: int = 0) -> list[kc.DispatchShape]:
    """``count`` distinct shapes from :data:`GRID` (K <= E, one-hot within MAX_ONE_HOT)."""
    rng = np.random.default_rng(seed)
    shapes: dict[str, kc.DispatchShape] = {}
    while len(shapes) < count:
        values = {name: options[rng.integers(len(options))] for name, options in GRID.items()}
        shape = kc.DispatchShape(**values)
        if shape.top_k > shape.experts:
            continue
        if shape.tokens * shape.top_k * shape.experts * shape.capacity > MAX_ONE_HOT:
            continue
        shapes.setdefault(shape.key(), shape)
    return list(shapes.values())


def evaluate(model: kc.KernelCostModel, held: list[kc.KernelTiming]) -> dict:
    """Per held-out shape: the measured times, the model's choice and the fastest; totals."""
    by_shape: dict[str, dict[str, float]] = {}
    shapes = {}
    order = {b: i for i, b in enumerate(kc.candidate_backends())}
    for t in sorted(held, key=lambda t: order.get(t.backend, len(order))):
        by_shape.setdefault(t.shape.key(), {})[t.backend] = t.seconds
        shapes[t.shape.key()] = t.shape
    rows = []
    for key, times in by_shape.items():
        chosen = kc.choose_backend(model, shapes[key])
        fastest = min(times, key=times.get)
        predicted = {b: model.predict(b, shapes[key]) for b in times}
        rows.append({"shape": key, "times": times, "predicted": predicted, "chosen": chosen,
                     "fastest": fastest})  # fmt: skip
    best = sum(r["times"][r["fastest"]] for r in rows)
    lost = lambda pick: sum(r["times"][pick(r)] - r["times"][r["fastest"]] for r in rows) / best
    fixed = {b: lost(lambda r, b=b: b) for b in rows[0]["times"]}
    errors = [abs(r["predicted"][b] / r["times"][b] - 1) for r in rows for b in r["times"]]
    return {
        "rows": rows,
        "hits": sum(r["chosen"] == r["fastest"] for r in rows),
        "lost": lost(lambda r: r["chosen"]),
        "fixed_lost": fixed,
        "median_rel_error": statistics.median(errors),
    }


#: Whether this lever moves energy-aware TTT toward issue 15's targets (≥ 20% energy saved at
#: < 5% accuracy loss; adaptation overhead < 10%), as far as the CPU runs can tell.
VERDICT = (
    "Toward issue 15's targets: the backend choice moves time, not the energy_moe runs' "
    "reported energy. Their simulated monitor prices a token by the FLOPs and bytes of the "
    "experts it used, whichever backend runs them (dropless: every backend computes the same "
    "assignments); a faster backend changes only the wall-clock times, and so the measured TTT "
    "overhead. Its energy effect needs the NVML monitor on a GPU (owed), where "
    '`choose_backend(..., objective="joules")` fits measured joules. The energy_moe configs '
    'choose their backend with this model at run start (`model.backend = "cost_model"`, '
    "experiments/energy_moe/backend.py: every candidate timed at the run's serving and "
    "training shapes and two smaller neighbours, stored in the workdir, reused on a rerun); on "
    'this CPU it picks ragged at both full configs\' serving shapes, what `backend="auto"` '
    "resolves to (ragged where `jax.lax.ragged_dot` exists), so the kept energy_moe results, "
    'run with "auto", come from the same programs.'
)


def render(result: dict, args, train: int) -> str:
    """The BENCHMARKS.md section."""
    rows, backends = result["rows"], list(result["rows"][0]["times"])
    cmd = (f"python -m experiments.bench.kernel_choice --train {args.train} --held {args.held} "
           f"--repeats {args.repeats} --seed {args.seed}")  # fmt: skip
    cmd += " --write" if args.write else ""
    lines = [
        "## Cost-model kernel choice: measured MoE dispatch backends (CPU)",
        "",
        f"- Date: {report.today()}; machine: {report.machine()}.",
        f"- Command: `{cmd}`.",
        f"- Candidates on this device: {', '.join(backends)} (the Pallas grouped matmul is "
        "excluded on the CPU: it runs in the Pallas interpreter, 2-40x slower than jnp, not a "
        "kernel). Forward dispatch, float32, medians of interleaved calls.",
        f"- {train} training and {len(rows)} held-out shapes drawn from T in "
        f"{list(GRID['tokens'])}, D in {list(GRID['d_model'])}, F in {list(GRID['d_ff'])}, "
        f"E in {list(GRID['experts'])}, K in {list(GRID['top_k'])}, capacity factor in "
        "[dropless, 1, 1.25, 2]; a non-negative relative-error fit per backend in the features "
        f"{', '.join(kc.FEATURES)} (metattt.energy.kernel_costs), fitted on the training "
        "shapes only.",
        "",
        f"**Held-out: the model picks the fastest backend on {result['hits']} of {len(rows)} "
        f"shapes; time lost on the misses: {100 * result['lost']:.1f}% of the fastest "
        "choices' total** (always "
        + ", always ".join(f"{b}: {100 * v:.1f}%" for b, v in result["fixed_lost"].items())
        + f"). Median |predicted / measured - 1|: {100 * result['median_rel_error']:.0f}%.",
        "",
        VERDICT,
        "",
        "| held-out shape | "
        + " | ".join(f"{b} (ms)" for b in backends)
        + " | predicted (ms) | chosen | fastest | hit |",
        "|---|" + "---|" * len(backends) + "---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | "
            + " | ".join(f"{1e3 * r['times'][b]:.3f}" for b in backends)
            + " | "
            + " / ".join(f"{1e3 * r['predicted'][b]:.3f}" for b in backends)
            + f" | {r['chosen']} | {r['fastest']} | "
            + ("yes |" if r["chosen"] == r["fastest"] else "no |")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=36)
    parser.add_argument("--held", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_kernel_choice/kernel_costs.json")
    parser.add_argument("--write", action="store_true", help="write into BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.train < 2 or args.held < 1:
        raise SystemExit("need --train >= 2 and --held >= 1")
    shapes = draw_shapes(args.train + args.held, args.seed)
    timings = kc.measure_dispatch(shapes, repeats=args.repeats, seed=args.seed)
    kc.save_timings(args.out, timings)
    stored = kc.load_timings(args.out)  # this device and JAX version's entries
    train_keys = {s.key() for s in shapes[: args.train]}
    held_keys = {s.key() for s in shapes[args.train :]}
    model = kc.fit_cost_model([t for t in stored if t.shape.key() in train_keys])
    result = evaluate(model, [t for t in stored if t.shape.key() in held_keys])
    text = render(result, args, args.train)
    if args.write:
        report.update_section(SECTION, text)
    print(text)
    return text


if __name__ == "__main__":
    main()
