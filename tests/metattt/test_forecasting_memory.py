"""Remat lowers the compiled memory of second-order meta-training of the Perceiver forecaster.

The program is one end-to-end-TTT meta-gradient (second order through 10 inner SGD steps on
the embeddings) of a tiny Perceiver on a generated session; XLA's memory analysis of the
compiled program gives its temporary buffer size. Compiled at XLA's cheap backend optimisation
level (buffer assignment, which sets the memory, is unaffected; compilation is several times
faster).
"""

import functools

import jax
import optax

from metattt import meta
from metattt import params as P
from metattt.data import sessions as S
from metattt.inner import InnerConfig
from metattt.models import perceiver as M

CFG = M.PerceiverConfig(
    context=6,
    horizon=3,
    max_units=16,
    max_sessions=3,
    dim=8,
    num_latents=4,
    num_heads=2,
    num_layers=0,  # the encoder and decoder blocks suffice; half the compile time
)


def _task():
    session = S.generate_sessions(
        1, 0, num_steps=80, min_neurons=5, max_neurons=6, burn_in=50, units_per_region=16
    )[0]
    padded = S.pad_sessions([session], max_neurons=7)
    ids = S.assign_unit_ids([session.meta["num_neurons"]], 7, start=3)
    return S.session_task(
        padded.data[0],
        context=CFG.context,
        horizon=CFG.horizon,
        mask=padded.mask[0],
        unit_ids=ids[0],
        session_id=1,
    )


def test_remat_lowers_temporary_memory_at_ten_inner_steps():
    apply, params = M.init_perceiver(CFG, seed=0)
    task = _task()
    loss_fn = M.forecast_loss(apply)
    mask = P.select(params, "re:^(unit_emb|session_emb)$")
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

    def temp_bytes(remat):
        inner = InnerConfig(optax.sgd(1.0), max_steps=10, remat=remat)
        loss = functools.partial(meta.e2e_ttt_loss, loss_fn, mask=mask, inner=inner)
        grad = jax.grad(lambda p: loss(p, task)[0])
        compiled = jax.jit(grad, compiler_options=options).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, remat = temp_bytes(False), temp_bytes(True)
    assert 0 < remat < plain, (remat, plain)
