"""Models as pure functions over parameter pytrees (Flax NNX modules split once at the edge).

Modules: :mod:`~metattt.models.functional` (``functionalize``: any NNX module to
``apply(params, *args)`` plus its parameters), :mod:`~metattt.models.mlp`,
:mod:`~metattt.models.digits_net`, :mod:`~metattt.models.dynamics` (action-conditioned
transformer predictor), :mod:`~metattt.models.moe` (top-k MoE transformer),
:mod:`~metattt.models.quantize` (weight-only int8 experts),
:mod:`~metattt.models.fast_weights` (fast-weight experts trained at test time) and
:mod:`~metattt.models.perceiver` (population forecaster). The factory functions ``mlp`` and
``digits_net`` share their module's name, so reach them as ``models.mlp.mlp`` and
``models.digits_net.digits_net``.
"""

from typing import TYPE_CHECKING

from metattt import _lazy

# Imported on first use (PEP 562; see metattt/_lazy.py).
__getattr__, __dir__ = _lazy.exports(
    __name__,
    "digits_net dynamics fast_weights functional mlp moe perceiver quantize",
    {
        "dynamics": "PredictorConfig init_predictor",
        "functional": "Functional functionalize",
        "moe": "MoEConfig MoEOutput init_moe",
        "perceiver": "PerceiverConfig forecast_loss init_perceiver",
    },
)

if TYPE_CHECKING:  # what static tools see
    from metattt.models import (
        digits_net,
        dynamics,
        fast_weights,
        functional,
        mlp,
        moe,
        perceiver,
        quantize,
    )
    from metattt.models.dynamics import PredictorConfig, init_predictor
    from metattt.models.functional import Functional, functionalize
    from metattt.models.moe import MoEConfig, MoEOutput, init_moe
    from metattt.models.perceiver import PerceiverConfig, forecast_loss, init_perceiver

__all__ = [
    "Functional",
    "MoEConfig",
    "MoEOutput",
    "PerceiverConfig",
    "PredictorConfig",
    "digits_net",
    "dynamics",
    "fast_weights",
    "forecast_loss",
    "functional",
    "functionalize",
    "init_moe",
    "init_perceiver",
    "init_predictor",
    "mlp",
    "moe",
    "perceiver",
    "quantize",
]
