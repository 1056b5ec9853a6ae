"""Norm presets on real Flax modules, ``of_type``, ``explain``, and the project's own selections.

Expected paths are written out from the modules' types (what a user means by "the LayerNorms"),
not from the presets' patterns.
"""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metattt
from metattt import params as P
from metattt.models.functional import functionalize

from .project_models import MODELS, SELECTORS

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "preset_selections.json"
NORM_KINDS = ("layernorm", "rmsnorm", "groupnorm", "batchnorm")


def _selected(tree, selector):
    return P.selected_paths(tree, P.select(tree, selector))


def _picks(tree, selector):
    """Selected paths, or None when the selector selects nothing (select raises)."""
    try:
        return _selected(tree, selector)
    except ValueError:
        return None


class LinenNet(nn.Module):
    """Default names for the four norm kinds, custom names, and an inline Sequential."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6)(x)
        x = nn.LayerNorm()(x)
        x = nn.RMSNorm()(x)
        x = nn.GroupNorm(num_groups=2)(x)
        x = nn.BatchNorm(use_running_average=False)(x)
        x = nn.LayerNorm(name="enc_ln")(x)
        x = nn.LayerNorm(name="ln1")(x)
        x = nn.RMSNorm(name="norm_f")(x)
        x = nn.BatchNorm(use_running_average=False, name="bn1")(x)
        x = nn.GroupNorm(num_groups=3, name="gn")(x)
        return nn.Sequential([nn.Dense(6), nn.LayerNorm()])(x)


@pytest.fixture(scope="module")
def linen_variables():
    x = jax.random.normal(jax.random.key(3), (4, 6))
    return jax.jit(LinenNet().init)(jax.random.key(0), x)  # one program, not ~50 eager ops


def test_norm_presets_on_linen(linen_variables):
    p = lambda module, *leaves: [f"params/{module}/{leaf}" for leaf in leaves]
    expected = {
        # LayerNorm_0, LayerNorm_1 (the Sequential's, named in the parent's scope), enc_ln,
        # ln1; norm_f is an RMSNorm but its name does not say so: LayerNorm by the contract.
        "layernorm": p("layernorm_0", "bias", "scale")
        + p("layernorm_1", "bias", "scale")
        + p("enc_ln", "bias", "scale")
        + p("ln1", "bias", "scale")
        + p("norm_f", "scale"),
        "rmsnorm": p("rmsnorm_0", "scale"),
        "groupnorm": p("groupnorm_0", "bias", "scale") + p("gn", "bias", "scale"),
        # scale and bias only: the running statistics (batch_stats/.../mean, var) never adapt.
        "batchnorm": p("batchnorm_0", "bias", "scale") + p("bn1", "bias", "scale"),
    }
    # (sorted: linen's keys flatten in their original case, LayerNorm_0 before enc_ln)
    for kind, paths in expected.items():
        assert sorted(_selected(linen_variables, kind)) == sorted(paths), kind
    everything = sorted(sum(expected.values(), []))
    assert sorted(_selected(linen_variables, "norm")) == everything
    assert sorted(_selected(linen_variables, "+".join(NORM_KINDS))) == everything


class Tower(nnx.Module):
    """Hand-chosen names of every kind, and an nnx.Sequential whose layers are only indices."""

    def __init__(self, rngs):
        self.enc_ln = nnx.LayerNorm(6, rngs=rngs)
        self.ln1 = nnx.LayerNorm(6, rngs=rngs)
        self.final_norm = nnx.LayerNorm(6, rngs=rngs)
        self.norm_f = nnx.RMSNorm(6, rngs=rngs)
        self.rms = nnx.RMSNorm(6, rngs=rngs)
        self.group_norm = nnx.GroupNorm(6, num_groups=2, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.proj = nnx.Linear(6, 6, rngs=rngs)
        self.stack = nnx.Sequential(
            nnx.Linear(6, 6, rngs=rngs),
            nnx.LayerNorm(6, rngs=rngs),
            nnx.Linear(6, 6, rngs=rngs),
            nnx.BatchNorm(6, rngs=rngs),
        )


@pytest.fixture(scope="module")
def tower():
    return Tower(nnx.Rngs(0))


# The norms of Tower by type; the Sequential's layers 1 and 3 have no name at all.
TOWER_BY_NAME = {
    "layernorm": ["enc_ln/bias", "enc_ln/scale", "final_norm/bias", "final_norm/scale"]
    + ["ln1/bias", "ln1/scale", "norm_f/scale"],  # norm_f: an RMSNorm named without its kind
    "rmsnorm": ["rms/scale"],
    "groupnorm": ["group_norm/bias", "group_norm/scale"],
    "batchnorm": ["bn/bias", "bn/scale"],
}
TOWER_SEQUENTIAL = [
    "stack/layers/1/bias",
    "stack/layers/1/scale",
    "stack/layers/3/bias",
    "stack/layers/3/scale",
]


@pytest.mark.parametrize("form", ["state", "param_state", "functionalize"])
def test_norm_presets_on_nnx(tower, form):
    tree = {
        "state": lambda: nnx.state(tower),  # with the BatchNorms' mean and var
        "param_state": lambda: nnx.split(tower, nnx.Param, ...)[1],
        "functionalize": lambda: functionalize(tower).params,
    }[form]()
    for kind, paths in TOWER_BY_NAME.items():
        assert _selected(tree, kind) == sorted(paths), kind
    expected = sorted(sum(TOWER_BY_NAME.values(), []) + TOWER_SEQUENTIAL)
    assert _selected(tree, "norm") == expected
    assert "proj/bias" not in expected and "stack/layers/0/bias" not in expected


def test_of_type_selects_by_module_type(tower):
    state = nnx.state(tower, nnx.Param)
    layer_norms = P.of_type(tower, nnx.LayerNorm)
    assert _selected(state, layer_norms) == sorted(
        ["enc_ln/bias", "enc_ln/scale", "final_norm/bias", "final_norm/scale"]
        + ["ln1/bias", "ln1/scale", "stack/layers/1/bias", "stack/layers/1/scale"]
    )
    assert _selected(state, P.of_type(tower, nnx.RMSNorm)) == ["norm_f/scale", "rms/scale"]
    # A whole container: every leaf below it; combined with a preset in a sequence.
    assert _selected(state, [P.of_type(tower, nnx.Sequential), "rmsnorm"]) == sorted(
        [f"stack/layers/{i}/{leaf}" for i in (0, 2) for leaf in ("bias", "kernel")]
        + [f"stack/layers/{i}/{leaf}" for i in (1, 3) for leaf in ("bias", "scale")]
        + ["rms/scale"]
    )
    assert layer_norms.__name__ == "of_type(LayerNorm)"


def test_of_type_refuses_what_has_no_types(linen_variables):
    with pytest.raises(TypeError, match="needs an nnx.Module"):
        P.of_type(linen_variables, nn.LayerNorm)
    with pytest.raises(TypeError, match="at least one module type"):
        P.of_type(Tower(nnx.Rngs(1)))


def test_a_custom_scale_param_is_not_a_norm_unless_unnamed():
    """The structural rule needs an index for a name: a named layer with ``scale`` is not taken."""
    rng = np.random.default_rng(7)
    tree = {
        "gate": {"scale": rng.normal(size=3), "w": rng.normal(size=(3, 3))},
        "blocks": {"0": {"kernel": rng.normal(size=(3, 3)), "bias": rng.normal(size=3)}},
    }
    assert _picks(tree, "norm") is None
    tree["blocks"]["1"] = {"scale": rng.normal(size=3)}
    assert _selected(tree, "norm") == ["blocks/1/scale"]


def test_project_models_keep_their_selections():
    """Every selector the configs use, and every older preset alone, takes what it took before
    the norm presets were split (frozen from the previous metattt.params)."""
    frozen = json.loads(FIXTURE.read_text())
    assert set(frozen) == set(MODELS)
    for name, build in MODELS.items():
        tree = jax.eval_shape(build)  # the paths without running the initialisers
        for selector in SELECTORS:
            assert _picks(tree, selector) == frozen[name][selector], (name, selector)
        # tent.py now asks for "norm": the digits net's batch norm is named just "norm".
        assert _picks(tree, "norm") == frozen[name]["layernorm"], name


def test_explain_exact_report():
    rng = np.random.default_rng(11)
    tree = {
        "ln": {"scale": rng.normal(size=5), "bias": rng.normal(size=5)},
        "dense": {"kernel": rng.normal(size=(5, 7)), "bias": rng.normal(size=7)},
    }
    assert metattt.explain is P.explain
    assert P.explain(tree, "layernorm") == "\n".join(
        [
            "selector 'layernorm': 2 of 4 leaves, 10 of 52 parameters (19.23%)",
            "selected:",
            "  ln  bias, scale  (2 leaves, 10 parameters)",
            "not selected:",
            "  dense  bias, kernel  (2 leaves, 42 parameters)",
        ]
    )


def test_explain_shows_a_missed_norm_and_nothing_selected():
    rng = np.random.default_rng(12)
    tree = {
        "enc_ln": {"scale": rng.normal(size=4), "bias": rng.normal(size=4)},
        "blocks": {"0": {"out": {"kernel": rng.normal(size=(4, 4))}}},
        "pos": rng.normal(size=(3, 4)),
        "head": {"temperature": rng.normal()},
    }
    missed = lambda path, leaf: path.startswith("blocks/")
    assert P.explain(tree, ["lora", missed]) == "\n".join(
        [
            "selector ['lora', <lambda>]: 1 of 5 leaves, 16 of 37 parameters (43.24%)",
            "selected:",
            "  blocks/0/out  kernel  (1 leaf, 16 parameters)",
            "not selected:",
            "  (top level)  pos  (1 leaf, 12 parameters)",
            "  enc_ln       bias, scale  (2 leaves, 8 parameters)",
            "  head         temperature  (1 leaf, 1 parameter)",
        ]
    )
    report = P.explain(tree, "re:^nothing")  # select() would raise; explain reports it
    assert report.splitlines()[:3] == [
        "selector 're:^nothing': 0 of 5 leaves, 0 of 37 parameters (0.00%)",
        "selected:",
        "  (none)",
    ]
    with pytest.raises(ValueError, match="unknown parameter preset"):
        P.explain(tree, "layrnorm")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_explain_counts_match_select_and_count(seed):
    """On random trees: the header's counts are those of select/count, every leaf is listed once."""
    rng = np.random.default_rng(seed)
    modules = ["ln", "norm1", "attn/out", "mlp/down", "bn", "head"]
    tree = {}
    for m in modules:
        node = tree
        for part in m.split("/"):
            node = node.setdefault(part, {})
        for leaf in rng.choice(["scale", "bias", "kernel"], size=2, replace=False):
            node[leaf] = jnp.asarray(rng.normal(size=tuple(rng.integers(1, 5, size=2))))
    selector = str(rng.choice(["layernorm", "norm", "bias", "attn_proj+batchnorm"]))
    mask = P.select(tree, selector)
    n = P.count(tree, mask)
    leaves = jax.tree.leaves(mask)
    lines = P.explain(tree, selector).splitlines()
    assert lines[0] == (
        f"selector {selector!r}: {sum(leaves)} of {len(leaves)} leaves, "
        f"{n.trainable:,} of {n.total:,} parameters ({100 * n.share:.2f}%)"
    )
    split_at = lines.index("not selected:")
    listed = {
        section: sorted(
            f"{line.split()[0]}/{name.strip(',')}"
            for line in lines[start:stop]
            if line != "  (none)"
            for name in line.split("  (")[0].split()[1:]
        )
        for section, start, stop in ((True, 2, split_at), (False, split_at + 1, len(lines)))
    }
    paths = P.leaf_paths(tree)
    for section in (True, False):
        assert listed[section] == sorted(
            p for p, m in zip(paths, leaves, strict=True) if m == section
        )
