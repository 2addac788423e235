"""SmoothQuant: s_j = s(X_j)^alpha / s(W_j)^(1-alpha), s(X) over all calibration data.

qkv, proj, fc1 fold their smoothing into adaLN / V; fc2 (``config.smooth_fc2``, default on) needs a
run-time multiply before its input quantizer, as ModelOpt's ``pre_quant_scale`` does."""

from __future__ import annotations

import torch

from ..build import assemble_recipe, quantized_layers, weight_salience
from . import register

SMOOTHED = ("attn.qkv", "attn.proj", "mlp.fc1")  # the inputs whose smoothing folds for free
RUNTIME = ("mlp.fc2",)  # after GELU: smoothing is a run-time Mul (balance_fold "runtime")
_EPS = 1e-5


def smoothing_factor(sx: torch.Tensor, sw: torch.Tensor, alpha: float) -> torch.Tensor:
    return (sx.clamp_min(_EPS) ** alpha / sw.clamp_min(_EPS) ** (1 - alpha)).clamp_min(_EPS)


@register("smoothquant")
def smoothquant(model, stats, config):
    roles = [r for r in config.layers if r in SMOOTHED or (config.smooth_fc2 and r in RUNTIME)]
    balances = {n: smoothing_factor(stats[n].channel_amax_all(), weight_salience(model, n), config.alpha)
                for n in quantized_layers(model, config, roles)}
    return assemble_recipe(model, stats, config, "smoothquant", balances, {"alpha": config.alpha, "smoothed": roles})
