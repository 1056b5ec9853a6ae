# %% [markdown]
# # Online adaptation on a stream whose labels arrive late
#
# A forecaster trained on yesterday's regime meets a stream whose dynamics drift. At each
# tick it predicts first; the true value of the input seen `H` ticks ago arrives only then,
# and the model takes a step on the last few arrived pairs (a replay window).
# `mt.online.online_adapt` re-indexes the stream so that a prediction can never see its own
# target or a later one. Writes `tutorial_output/online_delayed_labels.png`.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402

import metattt as mt  # noqa: E402

# %% [markdown]
# ## The stream: a drifting linear response
# y_t = w_t . x_t + noise, with the weights w_t rotating slowly away from the training ones.
# Each tick brings a small batch of 8 inputs (a stream element may be a batch).

# %%
T, B, D, H = 300, 8, 4, 5
key = jax.random.key(0)
w0 = jax.random.normal(key, (D,))
angle = jnp.linspace(0.0, 1.5, T)  # radians of drift in the first two coordinates
rot = jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
w_t = jnp.tile(w0, (T, 1)).at[:, 0].set(w0[0] * rot[:, 0] - w0[1] * rot[:, 1])
w_t = w_t.at[:, 1].set(w0[0] * rot[:, 1] + w0[1] * rot[:, 0])
xs = jax.random.normal(jax.random.key(1), (T, B, D))
ys = jnp.einsum("tbd,td->tb", xs, w_t) + 0.05 * jax.random.normal(jax.random.key(2), (T, B))

params = {"w": w0, "b": jnp.zeros(())}  # the model fitted to the regime before the drift


def predict(p, x):
    return x @ p["w"] + p["b"]


def pair_loss(p, pair):
    x, y = pair
    return jnp.mean((predict(p, x) - y) ** 2)


# %% [markdown]
# ## Predict, then update when a label arrives
# Everything adapts here (`"re:."`); the replay window fits the mean loss of the last 4
# arrived pairs. The whole stream runs as one compiled `lax.scan`.

# %%
fast, slow = mt.split(params, mt.select(params, "re:."))
run = jax.jit(
    lambda f: mt.online.online_adapt(
        pair_loss, predict, f, slow, xs, ys, delay=H, opt=optax.sgd(0.05), replay=4
    )
)
result = run(fast)
frozen_error = jnp.mean((jax.vmap(lambda x: predict(params, x))(xs) - ys) ** 2, -1)
online_error = jnp.mean((result.predictions - ys) ** 2, -1)
last = slice(T // 2, None)
print(f"mean squared error, second half: frozen {float(frozen_error[last].mean()):.3f}, "
      f"online {float(online_error[last].mean()):.3f}")  # fmt: skip
skipped = int(result.num_skipped.sum())
print(f"updates run: {int(result.updated.sum())} of {T}; skipped steps: {skipped}")

# %%
os.makedirs("tutorial_output", exist_ok=True)
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(frozen_error, label="frozen model", color="C7")
ax.plot(online_error, label=f"online, labels {H} ticks late", color="C0")
ax.set(xlabel="tick", ylabel="squared error", yscale="log", title="a drifting stream")
ax.legend()
fig.tight_layout()
fig.savefig("tutorial_output/online_delayed_labels.png", dpi=80)
