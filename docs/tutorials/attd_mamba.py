# %% [markdown]
# # ATTD: adaptive test-time training of a Mamba's dynamics
#
# A Mamba classifies which of 4 periodic templates a sequence shows. At test time some
# sequences are played 2-3x slower or faster than in training (a shift in the temporal
# dynamics). ATTD reads a ponder signal s = L_int (the model's own next-token loss on the
# input), and a monotone controller turns it into K inner steps on a low-rank adapter of the
# state matrix A: more steps for inputs the model finds surprising. Public API of `attd` and
# `metattt` only. Writes `tutorial_output/attd_mamba.png`. (The full study, with baselines
# and seeds, is `configs/attd_dynamics.py`; this is a minute-sized walk through the API.)

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402

import attd  # noqa: E402
import metattt as mt  # noqa: E402

# %% [markdown]
# ## Data: time-warped templates (attd.shifts)
# Train and in-distribution test at warp 1; the shifted test plays each sequence w times
# slower, w in [1/3, 1/2] or [2, 3].

# %%
task = attd.shifts.shift_task(
    "timewarp", 0, num_train=256, num_test=96, shift_bands=((1 / 3, 1 / 2), (2.0, 3.0)),
    seq_len=48, period=12.0, num_outer=128, outer_bands=((1.0, 1.0), (1 / 2, 1 / 1.4), (1.4, 2.0)),
)  # fmt: skip
config = attd.MambaConfig(
    vocab_size=task.vocab_size, num_classes=task.num_classes, d_model=16, n_layers=1, d_state=4
)
apply, theta = attd.init_mamba(config, seed=0)

# %% [markdown]
# ## Pretrain θ on the task and the next-token loss (`mt.supervised` + `mt.fit`)


# %%
def pretrain_loss(params, batch):
    tokens, mask, labels = batch
    task_loss = mt.objectives.cross_entropy(apply(params, tokens, mask=mask), labels)
    lm = mt.objectives.next_token_cross_entropy(apply(params, tokens, head="lm"), tokens, mask)
    return task_loss + lm


train = task.train.split


def batch(s, split=train, size=32):
    """A pure function of the step number: a resumed run would see the same batches."""
    key = jax.random.fold_in(jax.random.key(1), s)
    idx = jax.random.randint(key, (size,), 0, len(split.labels))
    return tuple(jnp.asarray(a)[idx] for a in (split.tokens, split.mask, split.labels))


step = mt.supervised(pretrain_loss, optax.adam(3e-3))
theta = mt.fit(step, step.init(theta), batch, num_steps=100, steps_per_call=50, show_progress=False)
theta = theta.params

# %% [markdown]
# ## ATTD: controller thresholds from the ponder signal, then outer training of ψ₀ and them
# θ stays frozen (the adapter and the thresholds train on the outer split: warp 1 and milder
# warps than the test's). SGD keeps the gradient's size, a difficulty signal of its own.

# %%
controller = attd.threshold_controller(3, temperature=0.05)
method = attd.make_attd(apply, config, controller, inner_lr=10.0, lam=0.01)
psi0 = attd.init_psi(config, 2, jax.random.key(0))
outer = task.outer.split
signal = jax.jit(method.signal)  # jitted: one compiled program instead of one per operation
s = signal(method.init(theta, psi0), jnp.asarray(outer.tokens), jnp.asarray(outer.mask))
params = method.init(theta, psi0, attd.quantile_thresholds(np.asarray(s), 3))


def part_labels(p):  # each leaf of ATTDParams(theta, psi, controller) labelled by its part
    parts = zip(p._fields, p, strict=True)
    return type(p)(*(jax.tree.map(lambda _, n=name: n, part) for name, part in parts))


outer_step = method.train_step(
    optax.multi_transform(
        {"theta": optax.set_to_zero(), "psi": optax.adam(1e-2), "controller": optax.adam(2e-2)},
        part_labels,
    )
)
params = mt.fit(
    outer_step, outer_step.init(params), lambda i: batch(i, outer), num_steps=20, steps_per_call=10,
    show_progress=False,
).params  # fmt: skip

# %% [markdown]
# ## Evaluate: accuracy and the steps ATTD chose, per split


# %%
predict, classify = jax.jit(method.predict), jax.jit(method.classify)


def evaluate(split):
    out = predict(params, jnp.asarray(split.tokens), jnp.asarray(split.mask))
    fixed = classify(params, jnp.asarray(split.tokens), jnp.asarray(split.mask))
    labels = np.asarray(split.labels)
    return (
        float(np.mean(np.argmax(fixed, -1) == labels)),
        float(np.mean(np.argmax(out.logits, -1) == labels)),
        np.asarray(out.hard_steps),
    )


rows = {"in-dist.": evaluate(task.test_id.split), "warped": evaluate(task.test_shift.split)}
for name, (acc0, acc, k) in rows.items():
    print(f"{name}: accuracy {acc0:.3f} fixed (K = 0) -> {acc:.3f} ATTD, mean K {k.mean():.2f}")

# %% [markdown]
# The controller grades K by the signal: inputs at the training speed get few or no steps,
# warped ones more. Whether those steps raise the accuracy depends on the inner rule and its
# rate (here SGD at 10, untuned, with a minute of training); the full study chooses the rate on
# the outer split and compares with uniform K at every depth over seeds (BENCHMARKS.md,
# section attd_dynamics).

# %%
os.makedirs("tutorial_output", exist_ok=True)
fig, ax = plt.subplots(figsize=(5, 3.2))
difficulty = np.concatenate([task.test_id.split.difficulty, task.test_shift.split.difficulty])
steps = np.concatenate([rows["in-dist."][2], rows["warped"][2]])
ax.scatter(difficulty, steps + np.random.default_rng(0).uniform(-0.15, 0.15, len(steps)), s=8)
ax.set(xlabel="|log warp| (0 = training speed)", ylabel="inner steps K chosen", yticks=[0, 1, 2, 3])
fig.tight_layout()
fig.savefig("tutorial_output/attd_mamba.png", dpi=80)
