"""Config -> the library's arguments: model and data configs, adapted sets, recordings, checks."""

from __future__ import annotations

from experiments import harness
from metattt import meta, train
from metattt.data import sessions as S
from metattt.data.session_tasks import Recording, make_recordings
from metattt.models import perceiver as M

META_LOSSES = {"fomaml": meta.fomaml_loss, "e2e_ttt": meta.e2e_ttt_loss}
FINETUNE = "finetune"  # the baseline: AdamW from the pretrained model, no meta-training
ADAPT_SETS = ("embeddings", "embeddings+latents", "embeddings+last_layer")
_EMB = "unit_emb|session_emb"


def perceiver_config(cfg) -> M.PerceiverConfig:
    """The model section as a validated :class:`~metattt.models.perceiver.PerceiverConfig`."""
    return harness.section_to(
        M.PerceiverConfig, cfg.model, query_context=bool(cfg.model.query_context)
    )


def session_config(cfg, drift: float = 0.0) -> S.SessionConfig:
    """The data section as a validated :class:`~metattt.data.sessions.SessionConfig`."""
    d = cfg.data
    return S.SessionConfig(
        num_steps=d.num_steps,
        min_neurons=d.min_neurons,
        max_neurons=d.max_neurons,
        num_regions=d.num_regions,
        units_per_region=d.units_per_region,
        drift=float(drift),
    ).validate()


def adapt_selector(name: str, num_layers: int) -> str:
    """The :mod:`metattt.params` selector of an adapted set named in ``ADAPT_SETS``."""
    if name == "embeddings":
        return f"re:^({_EMB})$"
    if name == "embeddings+latents":
        return f"re:^({_EMB}|latent_emb)$"
    if name == "embeddings+last_layer":
        if num_layers < 1:
            raise ValueError("adapt set 'embeddings+last_layer' needs model.num_layers >= 1")
        return f"re:^({_EMB})$|^layers/{num_layers - 1}/"
    raise ValueError(f"unknown adapt set {name!r}; known: {ADAPT_SETS}")


def compute_dtype(cfg_value: str) -> str | None:
    """A config's dtype string as the model's ``dtype`` argument ("" -> None: float32)."""
    return cfg_value or None


def recordings(cfg, seed: int, *, test: bool, drift: float = 0.0) -> list[Recording]:
    """Training (``test`` False) or held-out sessions of one seed's system, padded to N_max.

    Held-out sessions have ids after the training ones (and so unit ids after all training
    units: :func:`~metattt.data.session_tasks.make_recordings`).
    """
    d = cfg.data
    return make_recordings(
        session_config(cfg, drift),
        d.num_test_sessions if test else d.num_train_sessions,
        seed,
        max_neurons=d.max_neurons,
        context=cfg.model.context,
        horizon=cfg.model.horizon,
        stride=d.stride,
        support_fraction=d.support_fraction,
        first_session_id=d.num_train_sessions if test else 0,
    )


def window_counts(cfg) -> tuple[int, int]:
    """Support and query windows per session (the rule of ``session_task``)."""
    d, c, p = cfg.data, cfg.model.context, cfg.model.horizon
    cut = int(d.num_steps * d.support_fraction)
    support = (cut - c - p) // d.stride + 1 if cut >= c + p else 0
    rest = d.num_steps - cut
    query = (rest - c - p) // d.stride + 1 if rest >= c + p else 0
    return support, query


def validate(cfg) -> None:
    """Raise ValueError for config values that would fail later."""
    if not cfg.seeds:
        raise ValueError("config.seeds is empty")
    pcfg = perceiver_config(cfg)
    session_config(cfg)
    d = cfg.data
    if d.num_train_sessions < 1 or d.num_test_sessions < 1:
        raise ValueError("data.num_train_sessions and data.num_test_sessions must be >= 1")
    sessions = d.num_train_sessions + d.num_test_sessions
    if sessions > pcfg.max_sessions:
        raise ValueError(f"{sessions} sessions need model.max_sessions >= {sessions}")
    if sessions * d.max_neurons > pcfg.max_units:
        raise ValueError(
            f"{sessions} sessions of up to {d.max_neurons} neurons need model.max_units >= "
            f"{sessions * d.max_neurons}"
        )
    for name in (cfg.adapt, *cfg.ablation_adapt):
        adapt_selector(name, pcfg.num_layers)
    for method in cfg.meta.methods:
        if method not in META_LOSSES:
            raise ValueError(f"unknown meta method {method!r}; known: {sorted(META_LOSSES)}")
    for method in cfg.ablation_methods:
        if method != FINETUNE and method not in cfg.meta.methods:
            raise ValueError(f"ablation method {method!r} is neither finetune nor a meta method")
    if cfg.online.method not in cfg.meta.methods:
        raise ValueError(f"online.method {cfg.online.method!r} is not in meta.methods")
    m = cfg.meta
    train.check_counts(m.steps, 1, m.checkpoint_every, prefix="meta.")
    if cfg.pretrain.steps < 1 or (cfg.pretrain.steps > 50 and cfg.pretrain.steps % 50):
        raise ValueError(
            f"pretrain.steps must be 1..50 or a multiple of 50 (steps run 50 per compiled "
            f"call), got {cfg.pretrain.steps}"
        )
    if m.tasks_per_step > d.num_train_sessions:
        raise ValueError(
            f"meta.tasks_per_step = {m.tasks_per_step} exceeds the {d.num_train_sessions} "
            "training sessions"
        )
    if m.tasks_per_step % m.micro_batches:
        raise ValueError(
            f"meta.tasks_per_step = {m.tasks_per_step} must be divisible by meta.micro_batches "
            f"= {m.micro_batches}"
        )
    sizes = {
        "pretrain.batch": cfg.pretrain.batch,
        "meta.tasks_per_step/meta.micro_batches": m.tasks_per_step // m.micro_batches,
    }
    harness.check_mesh_devices("mesh_devices", cfg.mesh_devices, sizes, "windows or tasks")
    support, query = window_counts(cfg)
    if min(support, query) < 1:
        raise ValueError(
            f"data.num_steps = {d.num_steps} leaves no support or query window of "
            f"C + P = {pcfg.context + pcfg.horizon} steps"
        )
    if m.support_windows > support or m.query_windows > query:
        raise ValueError(
            f"meta.support_windows / query_windows ({m.support_windows}, {m.query_windows}) "
            f"exceed the {support} support / {query} query windows per session"
        )
    if m.inner_steps < 1 or cfg.test.steps < m.inner_steps:
        raise ValueError(
            f"need 1 <= meta.inner_steps ({m.inner_steps}) <= test.steps ({cfg.test.steps})"
        )
    for dtype in (m.dtype, *cfg.memory.dtypes):
        if dtype:
            M.PerceiverConfig(dtype=dtype).validate()
    for drift in cfg.online.drifts:
        session_config(cfg, drift)
    if any(k < 1 for k in cfg.memory.inner_steps):
        raise ValueError("memory.inner_steps must hold positive ints (empty: no memory table)")
