"""FSDP-style state sharding and data-parallel batches (metattt.sharding) on 8 simulated devices,
against the same steps on one device."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from metattt import meta, sharding, train
from metattt.data import sinusoid
from metattt.inner import InnerConfig
from metattt.params import select

D_IN, HIDDEN, D_OUT, BATCH = 12, 64, 8, 16


def _mesh():
    assert jax.device_count() >= 8, "tests/conftest.py asks for 8 simulated CPU devices"
    return jax.make_mesh((8,), ("data",))


def _mlp_params(seed):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "w1": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN),
        "b1": 0.1 * jax.random.normal(k2, (HIDDEN,)),
        "w2": jax.random.normal(k3, (HIDDEN, D_OUT)) / np.sqrt(HIDDEN),
        "b2": jnp.zeros((D_OUT,)) + 0.05,
    }


def _mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def _batch(i):
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(7), i))
    return jax.random.normal(kx, (BATCH, D_IN)), jax.random.normal(ky, (BATCH, D_OUT))


@pytest.mark.parametrize(
    "shape, size, min_size, expected",
    [
        ((12, 64), 8, 1, P(None, "d")),  # the largest divisible dimension
        ((64, 8), 8, 1, P("d", None)),
        ((64, 64), 8, 1, P("d", None)),  # equal sizes: the first
        ((12, 6), 8, 1, P()),  # nothing divisible: replicated
        ((), 8, 1, P()),  # a scalar (e.g. Adam's count)
        ((64, 8), 8, 1024, P()),  # 512 entries < min_size
        ((3, 40, 16), 8, 1, P(None, "d", None)),
    ],
)
def test_leaf_spec_splits_the_largest_divisible_dimension(shape, size, min_size, expected):
    assert sharding.leaf_spec(shape, "d", size, min_size) == expected


def test_fsdp_supervised_adam_steps_equal_one_device_and_keep_the_state_split():
    mesh, params = _mesh(), _mlp_params(0)
    single = train.supervised(_mlp_loss, optax.adam(1e-2))
    fsdp = sharding.shard_step(single, mesh, shard_params=True, min_size=64)
    s1, s8 = single.init(params), fsdp.init(params)
    for i in range(3):
        s1, m1 = single.update(s1, _batch(i))
        s8, m8 = fsdp.update(s8, _batch(i))
    chex.assert_trees_all_close(s1.params, s8.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s1.opt_state, s8.opt_state, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    # Each device holds 1/8 of every large array, parameters and Adam's moments alike.
    assert s8.params["w1"].sharding.shard_shape((D_IN, HIDDEN)) == (D_IN, HIDDEN // 8)
    assert s8.params["w2"].sharding.shard_shape((HIDDEN, D_OUT)) == (HIDDEN // 8, D_OUT)
    mu = s8.opt_state[0].mu
    assert mu["w1"].sharding.shard_shape((D_IN, HIDDEN)) == (D_IN, HIDDEN // 8)
    assert s8.params["b2"].sharding.is_fully_replicated  # 8 entries < min_size
    # Data parallel only: the state stays whole on every device, the result is the same.
    dp = sharding.shard_step(single, mesh)
    s = dp.update(dp.init(params), _batch(0))[0]
    assert s.params["w1"].sharding.is_fully_replicated
    first = single.update(single.init(params), _batch(0))[0]
    chex.assert_trees_all_close(first.params, s.params, rtol=1e-5, atol=1e-6)


def test_fsdp_meta_step_equals_one_device():
    """The sinusoid MAML meta-step (second order, Adam) with meta-parameters and Adam state
    sharded over 8 devices, against one device."""
    params = {
        "w1": jax.random.normal(jax.random.key(1), (1, 40)),
        "b1": jnp.zeros(40) + 0.1,
        "w2": jax.random.normal(jax.random.key(2), (40, 40)) / np.sqrt(40),
        "b2": jnp.zeros(40) - 0.1,
        "w3": jax.random.normal(jax.random.key(3), (40, 1)) / np.sqrt(40),
    }

    def loss_fn(p, batch):
        x, y = batch
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        h = jax.nn.relu(h @ p["w2"] + p["b2"])
        return jnp.mean((h @ p["w3"] - y) ** 2)

    tasks = sinusoid.sample_tasks(jax.random.key(4), 8, 5, 5)
    loss = functools.partial(
        meta.maml_loss,
        loss_fn,
        mask=select(params, "re:."),
        inner=InnerConfig(optax.sgd(0.05), max_steps=2),
    )
    single = meta.make_meta_step(loss, optax.adam(1e-2))
    fsdp = meta.make_meta_step(loss, optax.adam(1e-2), mesh=_mesh(), shard_params=True)
    s1, s8 = single.init(params), fsdp.init(params)
    for _ in range(2):
        s1, m1 = single.update(s1, tasks)
        s8, m8 = fsdp.update(s8, tasks)
    chex.assert_trees_all_close(s1.params, s8.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1.meta_loss, m8.meta_loss, rtol=1e-5)
    assert s8.params["w2"].sharding.shard_shape((40, 40)) == (5, 40)


def test_fit_resumes_a_sharded_run_into_its_sharding(tmp_path):
    """fit on an FSDP step: two calls of 2 steps each, the second resumed from the first's
    checkpoint, end where one uninterrupted 4-step run of the same step ends."""
    mesh, params = _mesh(), _mlp_params(3)
    fsdp = sharding.shard_step(
        train.supervised(_mlp_loss, optax.adam(1e-2)), mesh, shard_params=True, min_size=64
    )
    kwargs = dict(checkpoint_every=2, show_progress=False)
    whole = train.fit(fsdp, fsdp.init(params), _batch, num_steps=4, **kwargs)
    train.fit(fsdp, fsdp.init(params), _batch, num_steps=2, workdir=str(tmp_path / "run"), **kwargs)
    resumed = train.fit(
        fsdp, fsdp.init(params), _batch, num_steps=4, workdir=str(tmp_path / "run"), **kwargs
    )
    chex.assert_trees_all_equal(whole.params, resumed.params)
    assert resumed.params["w1"].sharding.shard_shape((D_IN, HIDDEN)) == (D_IN, HIDDEN // 8)


def test_a_batch_that_does_not_divide_over_the_devices_is_refused_in_one_line():
    step = sharding.shard_step(train.supervised(_mlp_loss, optax.sgd(0.1)), _mesh())
    x, y = _batch(0)
    with pytest.raises(ValueError, match=r"must be one size divisible by the 8 devices of mesh"):
        step.update(step.init(_mlp_params(0)), (x[:12], y[:12]))
    with pytest.raises(ValueError, match="axis 'model' is not an axis of the mesh"):
        sharding.shard_step(step, _mesh(), axis="model")


def test_local_copy_of_replicated_arrays_is_one_device_and_equal():
    mesh = jax.make_mesh((2,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    tree = {"w": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), "n": np.int32(7)}
    replicated = jax.device_put(tree, jax.sharding.NamedSharding(mesh, P()))
    local = sharding.local_copy(replicated)
    for key in tree:
        assert local[key].sharding.device_set == {jax.devices()[0]}
        assert not local[key].committed  # later computations place it with their other inputs
        np.testing.assert_array_equal(local[key], tree[key])


def test_inside_fits_compiled_call_the_batch_is_split_over_the_mesh():
    """fit with steps_per_call=2 traces the step (batches made in the program): each device
    still computes the loss of its 1/8 of the batch, and the result is the one-device fit's."""
    seen = []

    def loss(params, batch):
        jax.debug.inspect_array_sharding(batch[0], callback=seen.append)
        return _mlp_loss(params, batch)

    params = _mlp_params(4)
    single = train.supervised(_mlp_loss, optax.adam(1e-2))
    dp = sharding.shard_step(train.supervised(loss, optax.adam(1e-2), jit=False), _mesh())
    kwargs = dict(num_steps=4, steps_per_call=2, show_progress=False)
    want = train.fit(single, single.init(params), _batch, **kwargs)
    got = train.fit(dp, dp.init(params), _batch, **kwargs)
    assert seen and {s.shard_shape((BATCH, D_IN)) for s in seen} == {(BATCH // 8, D_IN)}
    chex.assert_trees_all_close(want.params, got.params, rtol=1e-5, atol=1e-6)


def test_data_mesh_is_one_auto_axis_or_none():
    assert sharding.data_mesh(0) is None
    mesh = sharding.data_mesh(2, axis="tasks")
    assert mesh.axis_names == ("tasks",) and mesh.devices.size == 2
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)


def test_shard_stacked_splits_the_batch_axis_of_every_leaf_not_the_steps():
    rng = np.random.default_rng(3)
    stacked = (rng.normal(size=(3, BATCH, D_IN)).astype(np.float32), rng.integers(0, 9, (3, BATCH)))
    placed = sharding.shard_stacked(stacked, sharding.data_mesh(8))
    for got, want in zip(placed, stacked, strict=True):
        assert got.sharding.spec == P(None, "batch")
        assert {s.data.shape[:2] for s in got.addressable_shards} == {(3, BATCH // 8)}
        np.testing.assert_array_equal(got, want)


def test_each_micro_batch_of_a_sharded_meta_step_is_split_over_every_device():
    """16 tasks in 2 micro-batches over 8 devices: micro-batch m is every 2nd task from m, so
    each one's 8 tasks already lie one per device. The compiled step's only collective is the
    all-reduce of the gradient (contiguous micro-batches, each on 4 devices' blocks, were
    all-gathered first), and the step equals the one-device micro-batched step."""

    def meta_loss(p, task):
        loss = _mlp_loss(p, task)
        return loss, meta.MetaAux(loss, jnp.zeros((1,)), jnp.zeros((), jnp.int32))

    params, tasks = _mlp_params(5), _batch(3)
    single = meta.make_meta_step(meta_loss, optax.adam(1e-2), micro_batches=2)
    dp = meta.make_meta_step(meta_loss, optax.adam(1e-2), micro_batches=2, mesh=_mesh())
    hlo = jax.jit(dp.update).lower(dp.init(params), tasks).compile().as_text()
    collectives = set(re.findall(r"\b(all-[a-z]+|collective-[a-z]+|reduce-scatter)\b", hlo))
    assert collectives == {"all-reduce"}
    want, _ = single.update(single.init(params), tasks)
    got, _ = dp.update(dp.init(params), tasks)
    chex.assert_trees_all_close(want.params, got.params, rtol=1e-5, atol=1e-6)
