"""energy_moe's issue-15 items 6-8 on stub models (no training): memory-pressure serving, the
adaptation schedules' calibration, and the routing explanations."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import energy_moe as energy_config
from experiments.energy_moe import explanations, pressure, registry, schedules
from metattt.energy import Work


def _stub_infer(k: int):
    """A jitted (params, x, y, mask) -> (score, counts) whose activations grow with the rows and
    whose counts give each of the first k experts one assignment per row."""

    @jax.jit
    def infer(p, x, y, mask):
        h = jnp.tanh(x[..., None].astype(jnp.float32) * p)  # (rows, L, 64)
        score = jnp.mean((h.sum(-1) - y) ** 2)
        counts = jnp.zeros((1, 4), jnp.int32).at[0, :k].add(x.shape[0])
        return score, counts

    return infer


def test_memory_pressure_steps_down_one_batch_late_and_prices_each_chunk(monkeypatch):
    """The level of each batch follows the simulated tenants' trace one reading late; a chunked
    batch scores and counts as the whole one and pays the weights once per chunk."""
    cfg = energy_config.get_config("tiny")
    cfg.data.stream_batches = 6
    cfg.memory.pressure = (0.0, 0.6, 0.0)  # two batches each
    cfg.memory.limit_x, cfg.memory.margin, cfg.memory.patience = 2.0, 0.0, 1
    rt = SimpleNamespace(
        mcfg=SimpleNamespace(top_k=2, num_experts=4), infer={1: _stub_infer(1), 2: _stub_infer(2)}
    )
    rng = np.random.default_rng(0)
    x = rng.integers(0, 9, (4, 16))
    y = rng.normal(size=(4, 16)).astype(np.float32)
    p = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
    work = lambda counts, rows: Work(1000.0 * rows + float(np.sum(counts)), 100.0 + rows)
    # levels priced by rows and top-k (XLA's own pricing is tested in tests/metattt)
    fake = lambda fn, params, xs, ys, mask: 1000 * len(xs) + (50 if fn is rt.infer[2] else 0)
    monkeypatch.setattr(pressure, "peak_bytes", fake)
    mp = pressure.MemoryPressure(cfg, rt, p, x, y, work)
    assert [tuple(level)[1:] for level in mp.ladder] == [(2, 1), (2, 2), (1, 1), (1, 2)]
    assert mp.need == [4050, 2050, 4000, 2000] and mp.limit == 8100
    high = round(0.6 * mp.limit)
    assert mp.others == [0, 0, high, high, 0, 0]
    low = 1  # the first level within the 40% the tenants leave: 2 chunks, top-2
    whole = _stub_infer(2)(p, x, y, jnp.ones(4, bool))
    for _ in range(6):
        score, counts = mp.infer(p, x, y, 2, np.ones(4, bool))
        level = mp.ladder[mp.levels[-1]]
        assert float(score) == pytest.approx(float(whole[0]), rel=1e-5)  # chunks: same score
        np.testing.assert_array_equal(counts, [[4] * level.top_k + [0] * (4 - level.top_k)])
        # each chunk pays the weights once: 100 bytes per chunk plus the rows
        assert mp.work(counts, 4) == Work(4000.0 + 4 * level.top_k, 100.0 * level.chunks + 4)
        mp.on_window(None, None)
    # the rise at batch 2 is read after it: served at full level, over; then down; back up at 5
    assert mp.levels == [0, 0, 0, low, low, 0]
    summary = mp.summary()
    assert summary["memory_over"] == 1 and summary["memory_over_full"] == 2
    assert summary["memory_degraded_share"] == pytest.approx(2 / 6)


def test_schedule_threshold_is_the_in_distribution_quantile():
    cfg = energy_config.get_config("tiny")
    values = np.random.default_rng(1).normal(size=(5, 2))  # (batches, [entropy, margin])
    table = {i: v for i, v in enumerate(values)}
    signals = lambda p, x, y, mask: (0.0, None, table[int(x)][0], table[int(x)][1])
    reference = (np.arange(5), np.zeros(5))
    for name, col, q in (("energy_ttt/3@entropy", 0, 0.9), ("ttt@margin", 1, 0.1)):
        method = registry.parse_method(name)
        got = schedules.calibrate(cfg, method, signals, None, reference, None)
        assert got == pytest.approx(np.quantile(values[:, col], q))
    adaptive = schedules.make_schedule(cfg, registry.parse_method("ttt@adaptive"), 0.5)
    assert adaptive.init().every == cfg.ttt.every
    infer = schedules.scheduled_infer(signals, registry.parse_method("ttt@margin"))
    assert infer(None, 3, None, 2, np.ones(2, bool))[2] == values[3, 1]


def test_explanations_keep_mid_and_final_params_and_find_the_largest_saving():
    rng = np.random.default_rng(2)
    probs = {i: rng.dirichlet(np.ones(4), size=(1, 2, 3)) for i in range(3)}  # (layers, B, L, E)
    joules = np.array([1.0, 2.0, 4.0, 8.0]) * 1e-6
    rt = SimpleNamespace(
        mcfg=SimpleNamespace(top_k=2, num_experts=4),
        joules=joules,
        probe=lambda p, x, mask: probs[p],
    )
    snaps = explanations.Snapshots(lambda p, *a: p, lambda p, *a: (p + 1, None), half=1)
    p = 0
    for _ in range(2):  # infer, then adapt: params 0 -> 1 -> 2
        snaps.infer(p)
        p = snaps.adapt(p)[0]
    assert (snaps.mid, snaps.last) == (1, 2)
    ex = explanations.explain(rt, rt.probe, 0, snaps, None)
    # an independent loop over tokens: top-2 sets, their costs and the net saving
    top = lambda v: set(np.argsort(-v, kind="stable")[:2])
    saved = []
    for a, b in zip(probs[0].reshape(-1, 4), probs[2].reshape(-1, 4), strict=True):
        saved.append(sum(joules[list(top(a))]) - sum(joules[list(top(b))]))
    assert ex["saved_uj_per_token"] == pytest.approx(1e6 * sum(saved) / 6)
    best = int(np.argmax(saved))
    assert ex["token_where"] == [0, best // 3, best % 3]
    same = [top(a) == top(b) for a, b in zip(probs[0].reshape(-1, 4), probs[1].reshape(-1, 4),
                                             strict=True)]  # fmt: skip
    assert ex["agreement_mid"] == pytest.approx(np.mean(same))
    explained = ("ttt", "energy_ttt/3@entropy", "energy_ttt/3:masked", "int8_ttt",
                 "int8_energy_ttt/3@margin", "lora_ttt/4", "lora_hw/4:masked", "norm_ttt",
                 "bias_ttt@margin", "fast_ttt/4", "int8_fast_ttt/4")  # fmt: skip
    assert all(explanations.explains(registry.parse_method(n)) for n in explained)
    for name in ("no_ttt", "budget/0.5", "prune/1", "top_k/1", "int8", "memory"):
        assert not explanations.explains(registry.parse_method(name))


def _entropy(logits):
    """Mean prediction entropy (nats) in float64 NumPy, independent of the served code."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(np.mean(-np.sum(np.exp(logp) * logp, -1)))


def _margin(probs):
    """Mean router top-2 margin in float64 NumPy."""
    top = np.sort(np.asarray(probs, np.float64), -1)
    return float(np.mean(top[..., -1] - top[..., -2]))


@pytest.mark.parametrize("name", ["lora_ttt/2@entropy", "int8_ttt@margin"])
def test_scheduled_methods_adapt_exactly_on_the_hard_batches_of_their_served_model(name):
    """A scheduled expert method (served through its LoRA Variant) and the scheduled router TTT
    of the int8 model: the threshold is the quantile of the served model's own signal over the
    reference batches (recomputed here in NumPy from the model's logits / router
    probabilities), the first batch's signal is the served model's, and the batches adapted on
    are exactly those whose recorded signal is past the threshold. The routing explanation is
    the served model's: a brute-force top-k over its router probabilities on the last batch at
    the start and final parameters gives the activation shares and the energy saved."""
    from experiments.energy_moe import expert, runtime, serving
    from experiments.energy_moe.tasks import BPC
    from metattt.models import moe, quantize

    cfg = energy_config.get_config("tiny")
    cfg.expert.methods = ()
    cfg.schedule.methods = (name,)
    cfg.schedule.quantile = 0.5
    cfg.ttt.steps = 1
    method = registry.methods(cfg)[name]
    rt = runtime.build_runtime(cfg, runtime.model_config(cfg))
    variant = expert.build_variants(cfg, rt, "lm").get(name)
    assert (variant is None) == method.int8  # int8_ttt: the router path; lora_ttt: a Variant
    b, length, steps = cfg.data.batch, cfg.data.length, 6
    rng = np.random.default_rng(3)
    ref_x = rng.integers(1, 120, (4, b, length)).astype(np.int32)
    ref = (ref_x, np.roll(ref_x, -1, -1))
    x = rng.integers(1, 257, (steps * b, length)).astype(np.int32)
    x[: 2 * b] = ref_x[:2].reshape(-1, length)  # two in-distribution-like batches first
    stream = SimpleNamespace(inputs=x, targets=np.roll(x, -1, -1))
    trained = rt.init(0)
    adapted_on, finals = [], []  # the batches adapted on (by their tokens), the parameters after
    inner = rt.adapt if variant is None else variant.adapt

    def record(p, tokens, *args):
        adapted_on.append(np.asarray(tokens))
        out = inner(p, tokens, *args)
        finals.append(out[0])
        return out

    if variant is None:
        rt = rt._replace(adapt=record)
    else:
        variant = variant._replace(adapt=record)
    rate = serving.stream_rate(rt, batch=b, length=length, utilization=0.5)
    cell = serving.serve(cfg, rt, trained, stream, method, rate=rate, seed=0, metric=BPC,
                         variant=variant, reference=ref)  # fmt: skip
    # the served model at the start: LoRA B = 0 or int8 experts
    start = expert.prepare(variant, trained, 0) if variant else quantize.quantize_experts(trained)
    model = variant.mcfg if variant else rt.mcfg
    apply = jax.jit(quantize.int8_apply(moe.init_moe(model).apply))  # one program, not op by op
    signal = lambda xs: (
        _entropy(apply(start, xs).logits) if method.schedule == "entropy"
        else _margin(apply(start, xs).aux["router_probs"])
    )  # fmt: skip
    high = method.schedule == "entropy"
    want = np.quantile([signal(r) for r in ref_x], 0.5)
    assert cell["threshold"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    trace = np.asarray(cell["signal_trace"])
    assert trace[0] == pytest.approx(signal(x[:b]), rel=1e-4, abs=1e-6)
    hard = [t for t in range(steps) if (trace[t] > want if high else trace[t] < want)]
    batches = x.reshape(steps, b, length)[:, : cfg.ttt.windows]
    got = [next(t for t in range(steps) if np.array_equal(a, batches[t])) for a in adapted_on]
    assert got == hard and cell["adapt_calls"] == len(hard)
    assert 0 < len(hard) < steps  # the threshold splits the stream
    assert cell["hard_share"] == pytest.approx(len(hard) / steps)
    last = x[-b:]
    k, probs = rt.mcfg.top_k, lambda p: np.asarray(apply(p, last).aux["router_probs"], np.float64)
    top = lambda v: list(np.argsort(-v, kind="stable")[:k])
    before = probs(start).reshape(-1, rt.mcfg.num_experts)  # one layer: (tokens, E)
    after = probs(finals[-1]).reshape(-1, rt.mcfg.num_experts)
    shares = np.zeros(rt.mcfg.num_experts)
    for v in before:
        shares[top(v)] += 1 / (len(before) * k)
    np.testing.assert_allclose(cell["explain"]["shares_before"], [shares], rtol=1e-6)
    saved = [
        sum(rt.joules[top(u)]) - sum(rt.joules[top(v)]) for u, v in zip(before, after, strict=True)
    ]
    assert cell["explain"]["saved_uj_per_token"] == pytest.approx(1e6 * np.mean(saved), abs=1e-9)
    assert np.count_nonzero(saved) > 0  # the adaptations moved some tokens' top-k sets


def test_fast_weight_reading_states_each_method_against_lora_at_equal_parameters():
    """One line for every fast-weight method: its change and energy against no TTT, LoRA's at
    the same adapted parameters when LoRA ran, and a verdict that follows the numbers (moves
    toward the target only when it saves energy, costs < 5% and saves more than LoRA)."""
    from experiments.energy_moe.readings import fast_reading
    from experiments.energy_moe.tasks import BPC

    def row(change, saved, overhead, meets):
        return {
            "bpc_change": {"mean": change, "ci": 0.01},
            "energy_reduction": {"mean": saved, "ci": 0.01},
            "overhead": {"mean": overhead, "ci": 0.0},
            "meets_energy_target": meets,
            "meets_overhead_target": overhead < 0.1,
        }

    results = {
        "methods": {
            "lora_ttt/4": row(0.062, 0.057, 0.06, False),
            "fast_ttt/4": row(0.078, -0.23, 0.03, False),
            "fast_ttt/2@margin": row(0.01, 0.25, 0.2, True),
        },
        "expert": {
            "lora_ttt/4": {"rank": 4, "adapted_params": 64},
            "fast_ttt/4": {"fast_rank": 15, "rank": 4, "adapted_params": 64},
            "fast_ttt/2@margin": {"fast_rank": 7, "rank": 2, "adapted_params": 32},
        },
    }
    (line,) = fast_reading(results, BPC)
    fast4, fast2 = line.split(": ", 1)[1].split("; fast_ttt/2")
    assert fast4.startswith("fast_ttt/4 7.8 ± 1.0% bits/char, -23.0% energy saved, overhead 3%")
    assert "(fast rank 15) vs lora_ttt/4 6.2 ± 1.0% bits/char, +5.7% energy saved" in fast4
    assert "at the same 64 adapted parameters: does not move" in fast4
    assert "(target not met; overhead < 10%: met)" in fast4
    # No lora_ttt/2 ran: the verdict needs only the target's two conditions.
    assert fast2.startswith("@margin 1.0 ± 1.0% bits/char, +25.0% energy saved, overhead 20%")
    assert (
        "(fast rank 7): moves toward" in fast2 and "(target met; overhead < 10%: not met)" in fast2
    )
    assert fast_reading({"methods": results["methods"], "expert": {}}, BPC) == []


def test_a_window_method_runs_from_its_name_to_a_served_cell():
    """``ttt~w4`` at tiny sizes: the registry names it, serving adapts after every 4-byte chunk
    of every batch, and the cell's score is a Python loop's that scores each chunk with the
    parameters adapted by hand (``rt.adapt``) on the chunks before it (float32, rtol 1e-5)."""
    from experiments.energy_moe import runtime, serving, windows
    from experiments.energy_moe.tasks import BPC
    from metattt.models import moe

    cfg = energy_config.get_config("tiny")
    cfg.window.methods = ("ttt~w4",)
    cfg.ttt.steps = 1
    method = registry.methods(cfg)["ttt~w4"]
    assert method == registry.Method("ttt", window=4)
    rt = runtime.build_runtime(cfg, runtime.model_config(cfg))
    b, length, steps, rows = cfg.data.batch, cfg.data.length, 2, cfg.ttt.windows
    x = np.random.default_rng(5).integers(1, 257, (steps * b, length + 1)).astype(np.int32)
    stream = SimpleNamespace(inputs=x[:, :-1], targets=x[:, 1:])
    params = rt.init(0)
    rate = serving.stream_rate(rt, batch=b, length=length, utilization=0.5)
    cell = serving.serve(cfg, rt, params, stream, method, rate=rate, seed=0, metric=BPC)
    assert cell["window"] == 4 and cell["adapt_calls"] == steps * length // 4
    apply = jax.jit(moe.init_moe(rt.mcfg).apply)
    mask, scores = jnp.ones((rt.mcfg.num_experts,), bool), []
    for t in range(steps):
        xs, ys = stream.inputs[t * b : (t + 1) * b], stream.targets[t * b : (t + 1) * b]
        for c in range(length // 4):
            logp = np.asarray(jax.nn.log_softmax(apply(params, xs, expert_mask=mask).logits))
            nll = -np.take_along_axis(logp, ys[..., None], -1)[..., 0]
            scores.append(nll[:, 4 * c : 4 * c + 4].mean())
            params = rt.adapt(params, xs[:rows, 4 * c : 4 * c + 4], jnp.float32(0), mask)[0]
    assert cell[BPC.key] == pytest.approx(np.mean(scores) * BPC.scale, rel=1e-5)
    assert cell["adapt_dynamic_j"] > 0
    cfg.window.methods = ("ttt~w5",)
    with pytest.raises(ValueError, match="W must divide data.length"):
        windows.validate(cfg, "lm")


def test_window_rows_join_the_when_to_adapt_table_and_reading():
    """A ``~w<W>`` row sits in the when-to-adapt table and the reading against its periodic
    reference (the name without ``~w``), with its differences computed from the two rows."""
    from experiments.energy_moe import readings, tables
    from experiments.energy_moe.tasks import BPC

    seed = lambda v: {"mean": v, "ci": float("nan")}
    row = lambda bpc, uj, calls, **extra: {
        "bpc": seed(bpc), "bpc_change": seed(bpc / 2.0 - 1), "uj_per_token": seed(uj),
        "adapt_calls": seed(calls), "energy_reduction": seed(0.25), "overhead": seed(0.5),
        "adapt_share_of_energy": seed(0.1), "meets_energy_target": False, **extra,
    }  # fmt: skip
    results = {"methods": {"ttt": row(1.9, 0.4, 8.0), "ttt~w16": row(1.7, 0.55, 512.0, window=16)}}
    table = tables.schedule_table(results, BPC)
    line = next(x for x in table if x.startswith("| ttt~w16 |"))
    assert "| - (W = 16) | all | 512.0 | 1.700 |" in line
    assert line.endswith("| 512.0 vs 8.0 | -0.200 | +0.1500 |")
    assert not any(x.startswith("| ttt |") for x in table)
    reading = readings.plan_reading(results, BPC)
    assert reading[0].startswith("- ttt~w16 adapted on 512.0 windows of 16 tokens: ")
    assert "vs ttt (8.0 adaptations) -0.200" in reading[0] and "+37.5% energy" in reading[0]


def test_memory_pressure_forces_the_capacity_rung_and_serves_the_model_at_that_factor(monkeypatch):
    """digits: a trace that leaves room for the capacity level only; the batches served there
    score and count as a direct call of the classifier at capacity factor 0.5 (assignments
    dropped), and the cell records the share of batches served at each level."""
    from configs import energy_moe_digits as digits_config
    from experiments.energy_moe import digits
    from metattt.models import moe

    cfg = digits_config.get_config("tiny")
    cfg.data.stream_batches = 3
    m = cfg.memory
    m.chunks, m.min_top_k, m.capacity_factors = (1,), 2, (None, 0.5)
    m.pressure, m.limit_x, m.margin, m.patience = (0.6,), 2.0, 0.0, 1
    pressure.validate(cfg, 2, "class")
    mcfg = digits.model_config(cfg)
    dropless = jax.jit(lambda p, x, y, mask: (jnp.float32(0.5), jnp.zeros((1, 4), jnp.int32)))
    rt = SimpleNamespace(mcfg=mcfg, infer={2: dropless})  # not under test here: a stub
    # levels priced by capacity (XLA's own pricing is tested in tests/metattt)
    monkeypatch.setattr(pressure, "peak_bytes", lambda fn, *a: 2000 if fn is rt.infer[2] else 1000)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 17, (cfg.data.batch, 64)).astype(np.int32)
    y = rng.integers(0, 10, cfg.data.batch).astype(np.int32)
    params = moe.init_moe(mcfg, seed=0).params
    mp = pressure.MemoryPressure(cfg, rt, params, x, y, lambda c, r: Work(1.0, 1.0))
    assert [tuple(level) for level in mp.ladder] == [(None, 2, 1), (0.5, 2, 1)]
    assert mp.need == [2000, 1000] and mp.others == [2400] * 3  # room 1600: level 1 only
    mask = np.ones(mcfg.num_experts, bool)
    apply = moe.init_moe(mcfg._replace(capacity_factor=0.5)).apply
    out = jax.jit(lambda p, x: apply(p, x, expert_mask=jnp.asarray(mask)))(params, x)
    want_error = float(np.mean(np.argmax(np.asarray(out.class_logits), -1) != y))
    want_counts = np.asarray(out.aux["expert_counts"])
    assert want_counts.sum() < mcfg.num_layers * x.size * 2  # the factor dropped assignments
    for _ in range(3):
        score, counts = mp.infer(params, x, y, 2, mask)
        if mp.levels[-1] == 1:
            assert float(score) == pytest.approx(want_error, abs=1e-6)
            np.testing.assert_array_equal(counts, want_counts)
        mp.on_window(None, None)
    assert mp.levels == [0, 1, 1]  # the first reading comes after the first batch
    assert mp.summary()["memory_level_shares"] == pytest.approx([1 / 3, 2 / 3])


def test_capacity_factors_are_checked_in_one_line_and_refused_for_the_lm():
    from configs import energy_moe_digits as digits_config
    from metattt.energy import serving_ladder

    cfg = energy_config.get_config("tiny")
    cfg.memory.capacity_factors = (None, 1.0)
    with pytest.raises(ValueError, match="for the LM.*not causal") as err:
        pressure.validate(cfg, 2, "lm")
    assert "\n" not in str(err.value)
    pressure.validate(cfg, 2, "class")
    for bad in ((1.0, None), (1.0, 1.25), (None, 0.0), (None, "1"), ()):
        cfg.memory.capacity_factors = bad
        with pytest.raises(ValueError, match="memory.capacity_factors must be None"):
            pressure.validate(cfg, 2, "class")
    full = digits_config.get_config()  # the digits ladder: chunks, then capacity, then top-k
    m = full.memory
    ladder = serving_ladder(2, capacity_factors=pressure.capacity_factors(full),
                            chunks=tuple(m.chunks), min_top_k=m.min_top_k)  # fmt: skip
    cfs = pressure.capacity_factors(full)
    assert cfs[0] is None and len(cfs) > 1
    assert [tuple(level) for level in ladder] == [
        (cf, k, c) for k in (2, 1) for cf in cfs for c in m.chunks
    ]


def test_digits_window_methods_are_windows_of_images_and_render_as_such():
    from configs import energy_moe_digits as digits_config
    from experiments.energy_moe import main, readings, tables, windows
    from experiments.energy_moe.tasks import ERROR

    cfg = digits_config.get_config()
    main.validate(cfg)
    table = registry.methods(cfg)
    assert [table[n] for n in cfg.window.methods] == [
        registry.Method("ttt", window=4),
        registry.Method("energy_ttt", lam=1.0, window=4),
    ]
    cfg.window.methods = ("ttt~w5",)
    with pytest.raises(ValueError, match=r"W \(images\) must divide data.batch=32"):
        windows.validate(cfg, "class")
    seed = lambda v: {"mean": v, "ci": float("nan")}
    row = {"error": seed(0.6), "error_change": seed(0.01), "uj_per_token": seed(0.9),
           "adapt_calls": seed(768.0), "energy_reduction": seed(-1.0), "overhead": seed(2.0),
           "adapt_share_of_energy": seed(0.5), "meets_energy_target": False, "window": 4,
           "window_unit": "images"}  # fmt: skip
    results = {"methods": {"ttt~w4": row}}
    assert "every W-image window" in tables.schedule_table(results, ERROR)[1]
    assert readings.plan_reading(results, ERROR)[0].startswith(
        "- ttt~w4 adapted on 768.0 windows of 4 images: "
    )
    memory = {"error": seed(0.6), "error_change": seed(0.0), "energy_reduction": seed(0.1),
              "memory_degraded_share": seed(0.5), "memory_over": [1], "memory_over_full": [2],
              "memory_levels": [[None, 2, 1], [1.0, 2, 1]], "memory_level_bytes": [2048, 1024],
              "memory_level_shares": [0.25, 0.75], "meets_energy_target": False}  # fmt: skip
    line = tables.memory_table({"methods": {"memory": memory}}, ERROR)[-1]
    assert line.startswith("| memory | 1x2 dropless (2): 25%, 1x2 c=1 (1): 75% |")
    reading = readings.plan_reading({"methods": {"memory": memory}}, ERROR)[0]
    assert "; 75% of the batches were served at a capacity-factor level; a memory" in reading
    memory["memory_level_bytes"] = [2048, 2176]  # the factor priced above dropless
    reading = readings.plan_reading({"methods": {"memory": memory}}, ERROR)[0]
    assert "(each priced 128 bytes above the dropless level" in reading
