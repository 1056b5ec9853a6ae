"""The README's usage example runs as written."""

import pathlib
import re

import jax
import numpy as np

from metattt import params as P

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _moved_leaves(before, after):
    """Paths of the leaves that differ between two trees of one structure."""
    pairs = zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    moved = [not np.array_equal(a, b) for a, b in pairs]
    return [path for path, m in zip(P.leaf_paths(before), moved, strict=True) if m]


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_usage_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    for block in blocks:  # later blocks continue the earlier ones
        exec(compile(block, str(README), "exec"), namespace)
    result = namespace["result"]
    assert float(result.losses[4]) < float(result.losses[0])
    assert int(result.num_skipped) == 0
    out = capsys.readouterr().out
    assert "ParamCount(trainable=" in out
    assert "selected:\n  enc_ln  bias, scale  (2 leaves, 32 parameters)\nnot selected:" in out
    loss, held_out = namespace["loss_fn"], namespace["held_out"]
    trained, initial = namespace["state"].params, namespace["model"].params
    mean = lambda p: sum(float(loss(p, b)) for b in held_out) / len(held_out)  # noqa: E731
    assert mean(trained) < 0.9 * mean(initial)  # multi-task regression learned something
    losses = namespace["diagnostics"].losses
    assert float(losses[-1]) < float(losses[0])  # TENT lowered the entropy on the shifted batch
    moved = _moved_leaves(namespace["net"].params, namespace["adapted"])
    assert moved == ["enc_ln/bias", "enc_ln/scale"]  # only the selected LayerNorm moved
