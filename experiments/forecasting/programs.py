"""The compiled programs of a run: pretraining, meta-steps, evaluation, adaptation curves, online.

Shapes depend only on the config, so each program is built once per run (cached by its static
arguments) and shared by every seed. With the config's ``mesh_devices`` the two trainings
(pretraining, meta-steps) split their batches over a data-parallel mesh of all processes'
devices, the parameters replicated; every other program runs on this process's own copy of
the parameters (:meth:`Programs.local`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from experiments.forecasting.configure import (
    FINETUNE,
    META_LOSSES,
    adapt_selector,
    compute_dtype,
    perceiver_config,
)
from metattt import meta, online, sharding, train
from metattt import params as P
from metattt.data.session_metrics import neuron_sse
from metattt.data.session_tasks import ResetTask
from metattt.inner import InnerConfig, adapt
from metattt.models import perceiver as M


def _reset_then(method_loss: Callable, init_std: float, params, task: ResetTask):
    """Register the task's session (fresh unit and session rows), then ``method_loss``: the
    meta-learner must adapt new neurons from scratch, as at test time."""
    fresh = M.register_session(
        params,
        task.support.session_id[0],
        task.support.unit_ids[0],
        task.key,
        mask=task.support.mask[0],
        init_std=init_std,
    )
    return method_loss(fresh, meta.Task(task.support, task.query))


class Programs:
    """The jitted functions of one run, built lazily and cached by their static arguments."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.mesh = sharding.data_mesh(cfg.mesh_devices)
        self.pcfg = perceiver_config(cfg)
        self.apply, _ = M.init_perceiver(self.pcfg, seed=0)  # same function for any params
        self.loss_fn = M.forecast_loss(self.apply)
        self.inner_opt = optax.adam(cfg.meta.inner_lr, eps_root=1e-12)  # eps_root: 2nd order
        self._cache: dict[Any, Any] = {}
        # XLA's cheap backend optimisation level: the same operations, several times faster to
        # compile (on the shared CPU compile time dominates); the GPU variant turns it off.
        options = {
            "xla_backend_optimization_level": 0,
            "xla_llvm_disable_expensive_passes": True,
        }
        self.jit = functools.partial(
            jax.jit, compiler_options=options if cfg.fast_compile else None
        )

    def init_params(self, seed: int):
        return M.init_perceiver(self.pcfg, seed=seed).params

    def template(self, seed: int):
        """Parameters shaped and placed as the trainings leave them (replicated over the mesh,
        if any): what a parameter cell saves and restores."""
        params = self.init_params(seed)
        if self.mesh is None:
            return params
        return jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))

    def local(self, params):
        """Trained parameters as this process's own arrays (unchanged without a mesh)."""
        return params if self.mesh is None else sharding.local_copy(params)

    def mask(self, params, adapt_set: str):
        return P.select(params, adapt_selector(adapt_set, self.pcfg.num_layers))

    def _cached(self, key, build: Callable[[], Any]):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def pretrain_program(self, chunk: int) -> tuple[train.Step, Callable]:
        """The pretraining step (Adam on every parameter) and its batches.

        Batches are ``batch_fn((windows, key), step)``: random training windows drawn with key
        ``split(fold_in(key, step // chunk), chunk)[step % chunk]`` (the draw of the original
        chunked loop, kept so that results reproduce). Built once per ``chunk``, so every seed
        shares one compilation.
        """
        cfg = self.cfg

        def build():
            def batch_fn(data, step):
                windows, key = data
                k = jax.random.split(jax.random.fold_in(key, step // chunk), chunk)[step % chunk]
                idx = jax.random.choice(
                    k, windows.context.shape[0], (cfg.pretrain.batch,), replace=False
                )
                return jax.tree.map(lambda x: x[idx], windows)

            step = train.supervised(self.loss_fn, optax.adam(cfg.pretrain.lr), jit=False)
            return sharding.shard_step(step, self.mesh), batch_fn

        return self._cached(("pretrain", chunk), build)

    def meta_loss(self, method: str, mask, *, inner_steps: int, remat: bool, dtype: str | None):
        """Per-task meta-loss ``(params, ResetTask) -> (loss, MetaAux)``: reset the task's
        embeddings, then the method's meta-loss over the inner loop."""
        loss_fn = M.forecast_loss(self.apply, dtype=dtype)
        inner = InnerConfig(self.inner_opt, max_steps=inner_steps, remat=remat)
        method_loss = functools.partial(META_LOSSES[method], loss_fn, mask=mask, inner=inner)
        return functools.partial(_reset_then, method_loss, self.pcfg.emb_init_std)

    def _method_loss(self, method: str, adapt_set: str, params):
        return self.meta_loss(
            method,
            self.mask(params, adapt_set),
            inner_steps=self.cfg.meta.inner_steps,
            remat=bool(self.cfg.meta.remat),
            dtype=compute_dtype(self.cfg.meta.dtype),
        )

    def meta_step(self, method: str, adapt_set: str, params) -> train.Step:
        """The method's jitted meta-step (clipping, gradient accumulation, outer Adam)."""
        cfg = self.cfg

        def build():
            step = meta.make_meta_step(
                self._method_loss(method, adapt_set, params),
                optax.adam(cfg.meta.outer_lr),
                clip_norm=cfg.meta.clip_norm or None,
                micro_batches=cfg.meta.micro_batches,
                jit=False,
            )
            step = sharding.shard_step(step, self.mesh)
            return train.Step(step.init, self.jit(step.update))

        return self._cached(("meta", method, adapt_set), build)

    def meta_evaluate(self, adapt_set: str, params):
        """``(params, tasks) -> mean query loss after the K inner steps`` (any method's inner
        loop computes the same forward, so one program serves all)."""

        def build():
            loss = self._method_loss("fomaml", adapt_set, params)
            return self.jit(lambda p, tasks: jnp.mean(jax.vmap(loss, (None, 0))(p, tasks)[1][0]))

        return self._cached(("meta_evaluate", adapt_set), build)

    def curve(self, adapt_set: str, params, opt_name: str):
        """``(run, adapt_only)``: ``run(params, support, query)`` gives the per-step per-neuron
        query SSE (K+1, N) of ``test.steps`` steps of the rule ``opt_name`` on the support
        windows (the query scored before every step and after the last) and the adapted
        parameters; ``adapt_only(params, support)`` the same steps unscored, for timing."""
        cfg = self.cfg

        def build():
            mask = self.mask(params, adapt_set)
            opt = self.test_opt(opt_name)

            def loss_and_query(p, batch):
                support, query = batch
                pred = self.apply(jax.lax.stop_gradient(p), query)
                return self.loss_fn(p, support), neuron_sse(pred, query.target, query.mask)

            @self.jit
            def run(params, support, query):
                fast, slow = P.split(params, mask)
                res = adapt(
                    loss_and_query,
                    fast,
                    slow,
                    (support, query),
                    opt=opt,
                    max_steps=cfg.test.steps,
                    has_aux=True,
                )
                adapted = P.merge(res.params, slow)
                last = neuron_sse(self.apply(adapted, query), query.target, query.mask)
                return jnp.concatenate([res.aux, last[None]]), adapted

            @self.jit
            def adapt_only(params, support):
                fast, slow = P.split(params, mask)
                res = adapt(self.loss_fn, fast, slow, support, opt=opt, max_steps=cfg.test.steps)
                return res.params

            return run, adapt_only

        rule = FINETUNE if opt_name == FINETUNE else "inner"  # the meta methods share one
        return self._cached(("curve", adapt_set, rule), build)

    def test_opt(self, opt_name: str) -> optax.GradientTransformation:
        """The fine-tuning baseline's AdamW or the meta-trained inner rule."""
        if opt_name == FINETUNE:
            return optax.adamw(self.cfg.meta.inner_lr, weight_decay=self.cfg.test.weight_decay)
        return self.inner_opt

    def adapt_k(self, adapt_set: str, params):
        """``(params, support) -> params``: the K trained inner steps on ``adapt_set``."""
        cfg = self.cfg

        def build():
            mask = self.mask(params, adapt_set)

            @self.jit
            def run(params, support):
                fast, slow = P.split(params, mask)
                res = adapt(
                    self.loss_fn,
                    fast,
                    slow,
                    support,
                    opt=self.inner_opt,
                    max_steps=cfg.meta.inner_steps,
                )
                return P.merge(res.params, slow)

            return run

        return self._cached(("adapt_k", adapt_set), build)

    def frozen(self):
        """``(params, windows) -> predictions``: the model's forward, compiled."""
        return self._cached("frozen", lambda: self.jit(self.apply))

    def online(self, adapt_set: str, params, delay: int):
        """``(params, stream) -> predictions (T, 1, N, P)``: predict each window, then adapt on
        the window whose target has just fully arrived (``delay`` windows late)."""
        cfg = self.cfg

        def build():
            mask = self.mask(params, adapt_set)
            opt = optax.adam(cfg.online.lr)

            @self.jit
            def run(params, stream):
                fast, slow = P.split(params, mask)
                inputs = {k: v[:, None] for k, v in stream.items() if k != "target"}
                result = online.online_adapt(
                    lambda p, xy: M.masked_mse(self.apply(p, xy[0]), xy[1], xy[0]["mask"]),
                    self.apply,
                    fast,
                    slow,
                    inputs,
                    stream["target"][:, None],
                    delay=delay,
                    opt=opt,
                    steps_per_update=cfg.online.steps_per_update,
                )
                return result.predictions

            return run

        return self._cached(("online", adapt_set, delay), build)
