# %% [markdown]
# # MAML and E2E-TTT on a task family of your own, with `fit`, checkpoints and TensorBoard
#
# Your tasks: regress a random quadratic y = a x^2 + b x + c from 10 points. Your model: a
# small Flax NNX network. Meta-learning finds an initialisation from which a few gradient
# steps fit a new task. `mt.fit` runs the meta-step in compiled chunks, writes checkpoints,
# `metrics.jsonl` and TensorBoard events into its workdir, and resumes from the newest good
# checkpoint when started again. Writes `tutorial_output/maml_own_tasks.png` and
# `tutorial_output/maml_run/`.

# %%
import functools
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import metattt as mt  # noqa: E402

# %% [markdown]
# ## The task family and the model


# %%
def sample_tasks(key, num_tasks, k=10, q=10):
    """A batch of tasks: support and query (x, y) of shape (num_tasks, n, 1)."""
    kc, ks, kq = jax.random.split(key, 3)
    coef = jax.random.uniform(kc, (num_tasks, 1, 3), minval=-1.0, maxval=1.0)

    def draw(kk, n):
        x = jax.random.uniform(kk, (num_tasks, n, 1), minval=-2.0, maxval=2.0)
        return x, coef[..., :1] * x**2 + coef[..., 1:2] * x + coef[..., 2:]

    return mt.Task(draw(ks, k), draw(kq, q))


class Net(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.l2 = nnx.Linear(1, 40, rngs=rngs), nnx.Linear(40, 40, rngs=rngs)
        self.out = nnx.Linear(40, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


net = mt.functionalize(Net(nnx.Rngs(0)))


def mse(params, batch):
    x, y = batch
    return jnp.mean((net.apply(params, x) - y) ** 2)


# %% [markdown]
# ## Meta-train with `fit`
# Everything adapts in the inner loop (`"re:."`): one SGD step of rate 0.05, second order
# (MAML). `e2e_ttt_loss` in place of `maml_loss` adds the inner losses to the objective
# (end-to-end test-time training); swap it in to compare.

# %%
mask = mt.select(net.params, "re:.")
inner = mt.InnerConfig(optax.sgd(0.05), max_steps=1)
meta_step = mt.meta.make_meta_step(
    functools.partial(mt.meta.maml_loss, mse, mask=mask, inner=inner), optax.adam(1e-3)
)
workdir = os.path.abspath("tutorial_output/maml_run")
writer = mt.runlog.create_writer(workdir)  # metrics.jsonl + TensorBoard events


def meta_train(num_steps):
    """Meta-train up to ``num_steps`` in ``workdir``, resuming from its newest checkpoint."""
    return mt.fit(
        meta_step,
        meta_step.init(net.params),
        lambda s: sample_tasks(jax.random.fold_in(jax.random.key(1), s), 16),
        num_steps=num_steps,
        steps_per_call=100,
        workdir=workdir,  # checkpoints (and resume)
        checkpoint_every=200,
        log_every=100,
        writer=writer,
        show_progress=False,
    )


state = meta_train(400)
state = meta_train(600)  # started again: resumes from the step-400 checkpoint
writer.close()
logged = mt.runlog.read_metrics(os.path.join(workdir, "metrics.jsonl"))
print("logged steps:", [r["step"] for r in logged if "meta_loss" in r])
print("workdir holds:", sorted(os.listdir(workdir)))  # tensorboard -logdir tutorial_output

# %% [markdown]
# ## Evaluate on new tasks after 0, 1 and 5 steps
# `evaluate_after_steps` runs one inner loop per task and reports the query loss after each
# step count with a 95% interval over the tasks.

# %%
test_tasks = sample_tasks(jax.random.key(99), 100)
steps = [0, 1, 5]
curves = {
    name: mt.meta.evaluate_after_steps(
        mse, p, test_tasks, mask=mask, inner=inner, steps=steps
    )  # fmt: skip
    for name, p in {"meta-learned": state.params, "random init": net.params}.items()
}
for name, c in curves.items():
    print(name, {k: f"{v.mean:.3f} ± {v.half_width:.3f}" for k, v in c.items()})

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
for name, c in curves.items():
    ax.errorbar(steps, [c[k].mean for k in steps], [c[k].half_width for k in steps],
                marker="o", capsize=3, label=name)  # fmt: skip
ax.set(xlabel="inner steps on the support set", ylabel="query MSE (100 new tasks)")
ax.legend()
fig.tight_layout()
fig.savefig("tutorial_output/maml_own_tasks.png", dpi=80)
