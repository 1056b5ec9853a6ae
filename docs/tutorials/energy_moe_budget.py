# %% [markdown]
# # Energy-aware test-time adaptation of a mixture of experts under a power budget
#
# A small mixture-of-experts language model whose experts differ in width (so in energy per
# token) is trained on documentation text, then serves Python source code. Energy-aware TENT
# adapts the router on each batch of the stream to lower the prediction entropy plus
# λ x the expected energy of its routing; a λ controller raises λ while the (simulated)
# power is over the budget and lowers it when under. Public API of `metattt` only; energy is
# modelled from each expert's FLOPs and bytes (`proxy_costs`), not measured: on a GPU,
# `metattt.energy.create_monitor` reads NVML instead. Writes
# `tutorial_output/energy_moe_budget.png`.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402

import metattt as mt  # noqa: E402
from metattt import energy  # noqa: E402
from metattt.data import text_corpora  # noqa: E402
from metattt.models import moe  # noqa: E402

# %% [markdown]
# ## Data and model
# Byte passages of pydoc topics (label 0, "docs") and of the standard library's source
# (label 1, "code"). Experts of widths 8, 16, 32 and 64: the wide ones cost up to 8x more.

# %%
corpus = text_corpora.build_corpus("doc_vs_code", length=32, max_per_class=256)
docs = corpus.train.tokens[corpus.train.labels == 0]
code = corpus.test.tokens[corpus.test.labels == 1]
config = moe.MoEConfig(
    vocab_size=257, d_model=32, num_heads=2, num_layers=1, num_experts=4, d_ff=64, top_k=1,
    max_len=32, expert_widths=(8, 16, 32, 64),
)  # fmt: skip
model = moe.init_moe(config, seed=0)
costs = energy.proxy_costs(config.num_experts, *moe.expert_token_costs(config))
print("joules per token of each expert:", energy.adapt.cost_vector(costs))


def lm_loss(params, tokens):
    out = model.apply(params, tokens)
    lm = mt.objectives.next_token_cross_entropy(out.logits, tokens, tokens > 0)
    return lm + 0.01 * out.aux["load_balance_loss"]


def batch(s, passages=docs, size=32):
    idx = jax.random.randint(jax.random.fold_in(jax.random.key(1), s), (size,), 0, len(passages))
    return jnp.asarray(passages)[idx]


step = mt.supervised(lm_loss, optax.adam(3e-3))
params = mt.fit(step, step.init(model.params), batch, num_steps=200, steps_per_call=100,
                show_progress=False).params  # fmt: skip

# %% [markdown]
# ## Serve the code stream under a budget
# Power = idle + token rate x energy per token of the routing (a modelled accelerator). The
# budget sits below what the unadapted routing draws on code, so the controller must raise
# λ until the router's choices fit.

# %%
ttt = energy.energy_tent(model.apply, costs, top_k=config.top_k, max_steps=3,
                         opt=optax.adam(3e-2))  # fmt: skip
adapt = jax.jit(lambda p, tokens, lam: ttt.adapt(p, tokens, lam))
idle_w, tokens_per_s = 60.0, 3e9  # a modelled accelerator: ~100 W of routed experts
stream = [batch(100 + i, code) for i in range(24)]


def power(joules_per_token):
    return idle_w + tokens_per_s * float(joules_per_token)


stats = jax.jit(ttt.stats)  # one compiled program for every batch (unjitted: op by op)
unadapted = float(np.mean([power(stats(params, t).joules_per_token) for t in stream]))
budget_w = 0.9 * unadapted
controller = energy.lambda_controller(budget_w, lam_init=0.1, gain=3.0)
state, current = controller.init(), params
log = {"power": [], "lam": [], "entropy": []}
for tokens in stream:
    result = adapt(current, tokens, state.lam)
    current = result.params  # cumulative: the router keeps what it learned
    watts = power(result.after.joules_per_token)
    state = controller.update(state, watts)
    log["power"].append(watts)
    log["lam"].append(float(state.lam))
    log["entropy"].append(float(result.after.entropy))
late = np.mean(log["power"][-8:])
print(f"budget {budget_w:.1f} W; unadapted routing {unadapted:.1f} W; adapted, last 8 batches")
print(f"{late:.1f} W at λ {log['lam'][-1]:.3f}")
print(f"entropy after adapting, first batch {log['entropy'][0]:.3f}, last {log['entropy'][-1]:.3f}")

# %% [markdown]
# Read the power together with the entropy (the prediction quality the adaptation trades):
# a budget met by routing every token to the narrowest expert can cost bits per character.
# The project's full study (BENCHMARKS.md, energy_moe) reports that trade-off honestly.

# %%
os.makedirs("tutorial_output", exist_ok=True)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
ax1.plot(log["power"], label="adapted routing")
ax1.axhline(budget_w, color="C3", ls="--", label="budget")
ax1.axhline(unadapted, color="C7", ls=":", label="unadapted")
ax1.set(xlabel="batch", ylabel="simulated power (W)")
ax1.legend()
ax2.plot(log["lam"], color="C2")
ax2.set(xlabel="batch", ylabel="λ_energy", title="the controller")
fig.tight_layout()
fig.savefig("tutorial_output/energy_moe_budget.png", dpi=80)
