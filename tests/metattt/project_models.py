"""The project's own models, built as the configs build them, for selector regression tests.

``MODELS`` maps a name to ``() -> params`` for one config variant's model; ``SELECTORS`` are the
ones configs/ and experiments/ pass to :func:`metattt.params.select`, and every preset alone.
"""

from __future__ import annotations

import jax

from configs import drift_adapters, energy_moe, energy_moe_digits, tta_protocol
from experiments.energy_moe import runtime
from metattt.models import digits_net, dynamics, mlp, moe, perceiver

# What configs/ and experiments/ select with (tta.ADAPT_PRESETS, c.ttt.params, tent.py), and
# every preset on its own.
SELECTORS = (
    "layernorm",
    "bias",
    "attn_proj",
    "mlp_out",
    "emb",
    "router",
    "lora",
    "layernorm+attn_proj",
    "layernorm+bias",
    "layernorm+mlp_out",
    "router+layernorm",
)


def _dynamics(variant):
    cfg = tta_protocol.get_config(variant)
    return dynamics.init_predictor(dynamics.PredictorConfig(**cfg.model)).params


def _moe(config_module, variant, num_classes):
    """The experiment's own model config (the reference dispatch: only the paths matter)."""
    cfg = config_module.get_config(variant)
    mcfg = runtime.model_config(cfg, num_classes=num_classes)._replace(backend="reference")
    return moe.init_moe(mcfg).params


def _digits(variant):
    cfg = drift_adapters.get_config(variant)
    params, _ = digits_net.digits_net(hidden=cfg.backbone.hidden).init(jax.random.key(0))
    return params


MODELS = {
    "tta_protocol": lambda: _dynamics(None),
    "tta_protocol:tiny": lambda: _dynamics("tiny"),
    "energy_moe": lambda: _moe(energy_moe, None, 0),
    "energy_moe:tiny": lambda: _moe(energy_moe, "tiny", 0),
    "energy_moe_digits": lambda: _moe(energy_moe_digits, None, 10),
    "energy_moe_digits:tiny": lambda: _moe(energy_moe_digits, "tiny", 10),
    "drift_adapters": lambda: _digits(None),
    "drift_adapters:tiny": lambda: _digits("tiny"),
    # forecasting selects with re: patterns only; its model's presets are covered as well.
    "perceiver": lambda: perceiver.init_perceiver(perceiver.PerceiverConfig()).params,
    "mlp (README)": lambda: mlp.mlp([1, 40, 40, 1], norm=True, seed=0).params,
}
