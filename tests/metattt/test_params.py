"""Parameter selection on NNX, linen and plain-dict trees; split/merge; counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metattt import params as P
from metattt.models.functional import functionalize


class FeedForward(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 8, rngs=rngs)


class Block(nnx.Module):
    """A transformer-ish block with the names the presets rely on."""

    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
        self.norm2 = nnx.RMSNorm(8, rngs=rngs)
        self.mlp = FeedForward(rngs)
        self.token_emb = nnx.Embed(11, 8, rngs=rngs)
        self.router = nnx.Linear(8, 4, use_bias=False, rngs=rngs)


@pytest.fixture(scope="module")
def nnx_params():
    return functionalize(Block(nnx.Rngs(0))).params


def _selected(tree, selector):
    return P.selected_paths(tree, P.select(tree, selector))


def test_presets_on_nnx(nnx_params):
    assert _selected(nnx_params, "layernorm") == ["ln1/bias", "ln1/scale", "norm2/scale"]
    assert _selected(nnx_params, "attn_proj") == ["attn/out/bias", "attn/out/kernel"]
    assert _selected(nnx_params, "mlp_out") == ["mlp/down/bias", "mlp/down/kernel"]
    assert _selected(nnx_params, "emb") == ["token_emb/embedding"]
    assert _selected(nnx_params, "router") == ["router/kernel"]
    biases = _selected(nnx_params, "bias")
    assert all(p.endswith("/bias") for p in biases) and "ln1/bias" in biases
    combo = _selected(nnx_params, "layernorm+attn_proj")
    assert combo == ["attn/out/bias", "attn/out/kernel", "ln1/bias", "ln1/scale", "norm2/scale"]


def test_presets_on_linen():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm()(x)
            x = nn.MultiHeadDotProductAttention(num_heads=1)(x, x)
            return nn.Dense(3)(nn.RMSNorm()(x))

    variables = jax.jit(Net().init)(jax.random.key(0), jnp.ones((1, 2, 4)))
    # linen's default names say the kind: LayerNorm and RMSNorm are separate presets.
    assert _selected(variables, "layernorm") == [
        "params/layernorm_0/bias",
        "params/layernorm_0/scale",
    ]
    assert _selected(variables, "rmsnorm") == ["params/rmsnorm_0/scale"]
    assert _selected(variables, "attn_proj") == [
        "params/multiheaddotproductattention_0/out/bias",
        "params/multiheaddotproductattention_0/out/kernel",
    ]


def test_plain_dict_lora_and_regex():
    tree = {"block": {"lora_a": np.ones((4, 2)), "lora_b": np.ones((2, 4)), "w": np.ones(3)}}
    assert _selected(tree, "lora") == ["block/lora_a", "block/lora_b"]
    assert _selected(tree, "re:block/w$") == ["block/w"]
    assert _selected(tree, ["lora", lambda path, leaf: path.endswith("/w")]) == [
        "block/lora_a",
        "block/lora_b",
        "block/w",
    ]


def test_unknown_preset_and_empty_selection_raise(nnx_params):
    with pytest.raises(ValueError, match="unknown parameter preset 'layrnorm'"):
        P.select(nnx_params, "layrnorm")
    with pytest.raises(ValueError, match="selects no leaf.*metattt.params.of_type"):
        P.select(nnx_params, "lora")  # a preset: the hint names the selection by type
    with pytest.raises(ValueError, match=r"selects no leaf; paths look like: [^;]*$"):
        P.select(nnx_params, "re:nothing")  # a pattern: no hint about presets
    with pytest.raises(ValueError, match="empty term"):
        P.select(nnx_params, "layernorm+")


def test_split_merge_roundtrip_and_count():
    rng = np.random.default_rng(0)
    tree = {
        "ln": {"scale": rng.normal(size=5), "bias": rng.normal(size=5)},
        "dense": {"kernel": rng.normal(size=(5, 7)), "bias": rng.normal(size=7)},
    }
    mask = P.select(tree, "layernorm")
    fast, slow = P.split(tree, mask)
    assert fast["dense"]["kernel"] is None and slow["ln"]["scale"] is None
    assert len(jax.tree.leaves(fast)) == 2 and len(jax.tree.leaves(slow)) == 2
    back = P.merge(fast, slow)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    n = P.count(tree, mask)
    assert (n.trainable, n.total) == (10, 5 + 5 + 35 + 7)
    assert n.share == pytest.approx(10 / 52)
    assert P.count(tree).trainable == 52


def test_mask_from_another_tree_is_an_error():
    tree = {"a": np.ones(2), "b": np.ones(3)}
    with pytest.raises(ValueError, match="mask has 1 leaves"):
        P.split(tree, {"a": True})


def test_raw_nnx_state_splits_merges_and_adapts():
    """Without functionalize: an nnx.State (Variables as leaves' parents) works as is."""
    import optax

    from metattt.inner import adapt

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 3, rngs=rngs)
            self.norm = nnx.LayerNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.lin(x))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    mask = P.select(state, "layernorm")
    assert P.selected_paths(state, mask) == ["norm/bias", "norm/scale"]
    fast, slow = P.split(state, mask)
    x = jax.random.normal(jax.random.key(1), (4, 2))
    loss = lambda p, x: jnp.mean((nnx.merge(graphdef, p)(x) - 1.0) ** 2)
    result = adapt(loss, fast, slow, x, opt=optax.sgd(0.1), max_steps=3)
    assert float(result.losses[-1]) < float(result.losses[0])
    merged = P.merge(result.params, slow)
    np.testing.assert_array_equal(merged["lin"]["kernel"][...], state["lin"]["kernel"][...])


class _BatchNormNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.lin(x))


def _batchnorm_reference(h, mean, var, scale, bias, eps=1e-5):
    return (h - mean) / np.sqrt(var + eps) * scale + bias


def test_functionalized_batchnorm_uses_batch_statistics_in_training_and_stored_ones_in_eval():
    """Classic TENT needs a BatchNorm that normalises with the test batch's statistics: in
    training mode the functionalised model does (jit and grad work, the stored statistics stay
    as they were); after ``model.eval()`` it uses the stored ones. NumPy is the reference."""
    rng = np.random.default_rng(0)
    model = _BatchNormNet(nnx.Rngs(0))
    model.bn.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
    model.bn.bias[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
    stored_mean = rng.normal(size=6).astype(np.float32)
    stored_var = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    model.bn.mean[...], model.bn.var[...] = jnp.asarray(stored_mean), jnp.asarray(stored_var)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    net = functionalize(model)
    p = net.params
    h = x.astype(np.float64) @ np.asarray(p["lin"]["kernel"]) + np.asarray(p["lin"]["bias"])
    scale, bias = np.asarray(p["bn"]["scale"]), np.asarray(p["bn"]["bias"])
    train = _batchnorm_reference(h, h.mean(0), h.var(0), scale, bias)
    np.testing.assert_allclose(jax.jit(net.apply)(p, x), train, rtol=1e-4, atol=1e-4)
    grads = jax.jit(jax.grad(lambda q: jnp.sum(net.apply(q, x) ** 2)))(p)
    assert np.abs(np.asarray(grads["bn"]["scale"])).sum() > 0
    np.testing.assert_array_equal(model.bn.mean[...], stored_mean)  # never written back
    model.eval()
    evaluation = _batchnorm_reference(h, stored_mean, stored_var, scale, bias)
    np.testing.assert_allclose(
        jax.jit(functionalize(model).apply)(p, x), evaluation, rtol=1e-4, atol=1e-4
    )
