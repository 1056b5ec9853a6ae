"""One conformance suite for every adaptation method.

Each method is registered as a :class:`Case`: ``init(key, dtype) -> state`` and a pure
``run(state, task) -> (state, losses)`` whose ``losses`` trace the method's own objective from
first to last. For every case: it jits, it vmaps over a batch of tasks (and the batched result
equals the per-task one), the state keeps its tree structure and dtypes (float32 and bfloat16),
outputs are finite, and on a toy linear-regression task the last loss is at most half the
first. Later systems append their cases to ``CASES``.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from metattt import adapters, meta, online, tta
from metattt import params as P
from metattt.inner import InnerConfig, adapt

D = 4


class Case(NamedTuple):
    name: str
    init: Callable[[jax.Array, Any], Any]
    run: Callable[[Any, Any], tuple[Any, jax.Array]]
    make_task: Callable[[jax.Array], Any]


def linear_loss(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def init_linear(key, dtype):
    kw, kb = jax.random.split(key)
    return {
        "w": (0.1 * jax.random.normal(kw, (D, 1))).astype(dtype),
        "b": (0.1 * jax.random.normal(kb, (1,))).astype(dtype),
    }


def regression_batch(key, w_true, n=32):
    x = jax.random.normal(key, (n, D))
    return x, x @ w_true + 0.5


def make_regression_task(key):
    kw, kd = jax.random.split(key)
    return regression_batch(kd, jax.random.normal(kw, (D, 1)))


def make_meta_tasks(key, num_tasks=4):
    """A batch of tasks sharing most of their structure (what meta-learning can exploit)."""
    kw, ks, kq = jax.random.split(key, 3)
    w = jnp.ones((D, 1)) + 0.1 * jax.random.normal(kw, (num_tasks, D, 1))
    support = jax.vmap(regression_batch)(jax.random.split(ks, num_tasks), w)
    query = jax.vmap(regression_batch)(jax.random.split(kq, num_tasks), w)
    return meta.Task(support, query)


def make_stream(key, length=40):
    kw, kx = jax.random.split(key)
    w = jax.random.normal(kw, (D, 1))
    xs = jax.random.normal(kx, (length, 8, D))
    return xs, xs @ w + 0.5


def inner_case(name, opt):
    def run(params, task):
        fast, slow = P.split(params, P.select(params, "re:."))
        r = adapt(linear_loss, fast, slow, task, opt=opt, max_steps=25)
        final = linear_loss(P.merge(r.params, slow), task)
        return P.merge(r.params, slow), jnp.concatenate([r.losses, final[None]])

    return Case(name, init_linear, run, make_regression_task)


def meta_case(name, meta_loss_factory, *, meta_sgd=False):
    inner = InnerConfig(optax.sgd(0.05), max_steps=2)
    outer = optax.adam(0.05)

    def init(key, dtype):
        params = init_linear(key, dtype)
        mask = P.select(params, "re:.")
        meta_params = meta.meta_sgd_init(params, mask, 0.05) if meta_sgd else params
        return meta.TrainState(meta_params, outer.init(meta_params))

    def run(state, tasks):
        mask = P.select(init_linear(jax.random.key(0), jnp.float32), "re:.")
        learner = meta.make_meta_step(
            functools.partial(meta_loss_factory, linear_loss, mask=mask, inner=inner),
            outer,
            jit=False,
        )

        def one(state, _):
            state, metrics = learner.update(state, tasks)
            return state, metrics.meta_loss

        return jax.lax.scan(one, state, None, length=60)

    return Case(name, init, run, make_meta_tasks)


def online_run(params, stream):
    xs, ys = stream
    fast, slow = P.split(params, P.select(params, "re:."))
    predict = lambda p, x: x @ p["w"] + p["b"]
    r = online.online_adapt(
        linear_loss, predict, fast, slow, xs, ys, delay=2, opt=optax.sgd(0.1), steps_per_update=2
    )
    errors = jnp.mean((r.predictions - ys) ** 2, axis=(1, 2))
    return P.merge(r.params, slow), jnp.stack([errors[:5].mean(), errors[-5:].mean()])


def tta_run(params, clips):
    fast, slow = P.split(params, P.select(params, "re:."))
    r = tta.run_clips(
        linear_loss,
        fast,
        slow,
        clips,
        opt=optax.adam(0.05),
        num_steps=3,
        reset_per_clip=False,
        window=5,
    )
    return P.merge(r.params, slow), r.pre_loss


def make_clips(key):
    kw, kc = jax.random.split(key)
    w = jax.random.normal(kw, (D, 1))
    return jax.vmap(regression_batch, in_axes=(0, None))(jax.random.split(kc, 30), w)


LORA_OPT = optax.adam(0.05)


def init_lora(key, dtype):
    """A rank-4 slot (of 6) allocated on a random frozen base map D -> 1."""
    kb, ka = jax.random.split(key)
    lora = adapters.lora_init(D, 1, 6, dtype=dtype)
    lora, opt_state = adapters.alloc(lora, LORA_OPT.init(lora.factors), 4, ka)
    return lora, opt_state


def lora_run(state, task):
    x, y = task
    base = 0.1 * jax.random.normal(jax.random.key(0), (D, 1)).astype(x.dtype)
    loss_fn = lambda lora, b: jnp.mean((adapters.lora_apply(b[0], base, lora) + 0.5 - b[1]) ** 2)
    step = adapters.make_step(loss_fn, LORA_OPT)

    def one(carry, _):
        lora, opt_state, loss = step(*carry, (x, y))
        return (lora, opt_state), loss

    return jax.lax.scan(one, state, None, length=40)


# ATTD (attd/): the outer loop of adaptive test-time dynamics on a tiny Mamba. The state is
# (θ, ψ₀, thresholds) with its Adam state; each outer step adapts ψ per input for the
# controller's K steps (first order) and classifies; the losses are L_total (λ = 0).
ATTD_OPT = optax.adam(0.05)


@functools.cache
def attd_method():
    from attd.controller import threshold_controller
    from attd.mamba import MambaConfig, init_mamba
    from attd.method import make_attd

    cfg = MambaConfig(
        vocab_size=5, d_model=8, n_layers=1, d_state=4, expand=1, d_conv=2, num_classes=2,
        scan_chunk_size=4, lean_backward=False,
    )  # fmt: skip
    apply, theta = init_mamba(cfg, seed=0)
    method = make_attd(apply, cfg, threshold_controller(2), inner_lr=50.0, lam=0.0)
    return cfg, theta, method


def init_attd(key, dtype):
    from attd.dynamics import init_psi

    cfg, theta, method = attd_method()
    params = method.init(theta, init_psi(cfg, 2, key, 0.5))
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    return params, ATTD_OPT.init(params)


def attd_run(state, task):
    _, _, method = attd_method()

    def one(carry, _):
        params, opt_state = carry
        grads, metrics = jax.grad(method.loss, has_aux=True)(params, task)
        updates, opt_state = ATTD_OPT.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics.loss

    return jax.lax.scan(one, state, None, length=30)


def make_token_task(key):
    """8 random sequences over 4 tokens; the label is whether token 1 outnumbers token 2."""
    tokens = jax.random.randint(key, (8, 8), 1, 5)
    labels = (jnp.sum(tokens == 1, -1) > jnp.sum(tokens == 2, -1)).astype(jnp.int32)
    return tokens, jnp.ones_like(tokens), labels


CASES = [
    inner_case("inner_sgd", optax.sgd(0.1)),
    inner_case("inner_adam", optax.adam(0.1)),
    meta_case("fomaml", meta.fomaml_loss),
    meta_case("maml", meta.maml_loss),
    meta_case("e2e_ttt", meta.e2e_ttt_loss),
    meta_case("meta_sgd", meta.meta_sgd_loss, meta_sgd=True),
    Case("online", init_linear, online_run, make_stream),
    Case("tta_cumulative", init_linear, tta_run, make_clips),
    Case("dynamic_rank_lora", init_lora, lora_run, make_regression_task),
    Case("attd", init_attd, attd_run, make_token_task),
]


@functools.cache
def compiled(case: Case):
    """One jitted ``run`` per case, shared by the tests below."""
    return jax.jit(case.run)


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request):
    return request.param


def test_jit_finite_structure_and_loss_halves(case):
    state = case.init(jax.random.key(1), jnp.float32)
    new_state, losses = compiled(case)(state, case.make_task(jax.random.key(2)))
    chex.assert_tree_all_finite((new_state, losses))
    chex.assert_trees_all_equal_structs(new_state, state)
    chex.assert_trees_all_equal_dtypes(new_state, state)
    assert float(losses[-1]) <= 0.5 * float(losses[0]), (case.name, losses[0], losses[-1])


def test_vmap_over_tasks_matches_single_runs(case):
    state = case.init(jax.random.key(3), jnp.float32)
    tasks = jax.vmap(case.make_task)(jax.random.split(jax.random.key(4), 2))
    batched_state, batched_losses = jax.jit(jax.vmap(case.run, in_axes=(None, 0)))(state, tasks)
    single_state, single_losses = compiled(case)(state, jax.tree.map(lambda t: t[1], tasks))
    chex.assert_trees_all_close(
        jax.tree.map(lambda t: t[1], batched_state), single_state, rtol=2e-4, atol=1e-5
    )
    chex.assert_trees_all_close(batched_losses[1], single_losses, rtol=2e-4, atol=1e-5)


def test_bfloat16_state_keeps_structure_and_dtype(case):
    dtype = jnp.bfloat16
    state = case.init(jax.random.key(5), dtype)
    task = jax.tree.map(
        lambda t: t.astype(dtype) if jnp.issubdtype(t.dtype, jnp.floating) else t,
        case.make_task(jax.random.key(6)),
    )
    new_state, losses = compiled(case)(state, task)
    chex.assert_trees_all_equal_structs(new_state, state)
    chex.assert_trees_all_equal_dtypes(new_state, state)
    assert losses.ndim == 1
