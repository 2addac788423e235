"""DiTAS: temporal-aggregated smoothing with a layer-wise alpha grid search.

s(X_j) = max_t s_t(X_j); s_j = s(X_j)^alpha / s(W_j)^(1-alpha); per layer, alpha in
{0, step, ..., 1} minimising the MSE between the quantized and the FP layer output on token
samples from all timesteps. qkv and fc1 fold into adaLN, proj into V, fc2 (after GELU) needs a
run-time multiply ("runtime" fold). DiTAS' training-free low-rank branch is a weight-side option
of every method (``--lowrank-rank``, calibrate/weights.py).
"""

from __future__ import annotations

import torch

from ..build import assemble_recipe, quantized_layers
from ..search import search_weight_scale
from ...runtime import quant
from . import register
from .smoothquant import smoothing_factor

SMOOTHED = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@torch.no_grad()
def quantized_output_mse(x: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, s: torch.Tensor, *, wfmt: str,
                         afmt: str, granularity: str, group_size: int | None, act_granularity: str = "tensor") -> float:
    """MSE of ``fq(X / s) fq(W diag(s))^T`` against ``X W^T`` (bias cancels). The activation clip
    is the exact calibration maximum of ``X / s`` (from ``sx``), as the recipe will use, or each
    token's own maximum with ``act_granularity`` "token"."""
    ref = x @ w.T
    xs, ws = x / s, w * s
    if afmt != "none" and act_granularity == "token":
        xs = quant.fake_quant_act(xs, None, afmt, "token")
    elif afmt != "none":
        xs = quant.fake_quant(xs, quant.scale_from_amax((sx / s).max(), afmt), afmt)
    wq = quant.fake_quant_weight(ws, search_weight_scale(ws, wfmt, granularity, group_size), wfmt, granularity,
                                 group_size)
    return float((xs @ wq.T - ref).pow(2).mean())


def tas_alpha_search(x: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, alphas: list[float], **fmt) -> tuple[float, list[float]]:
    """(best alpha, errors per alpha) for one layer: ``x`` token samples ``[N, C_in]``, ``sx`` the
    temporal-aggregated channel maxima ``[C_in]``, ``w`` the FP weight ``[C_out, C_in]``."""
    x, sx, w = x.float(), sx.float().to(x.device), w.detach().float().to(x.device)
    sw = w.abs().amax(dim=0)
    errors = [quantized_output_mse(x, sx, w, smoothing_factor(sx, sw, a), **fmt) for a in alphas]
    best = min(range(len(alphas)), key=errors.__getitem__)
    return alphas[best], errors


def alpha_grid(step: float) -> list[float]:
    n = int(round(1 / step))
    return [round(i * step, 6) for i in range(n + 1)]


@register("ditas")
def ditas(model, stats, config):
    roles = [r for r in config.layers if r in SMOOTHED]
    alphas = alpha_grid(config.alpha_grid_step)
    balances, chosen = {}, {}
    for name, lp in quantized_layers(model, config, roles).items():
        gran, group = lp.granularity  # each layer searched in its own precision
        st = stats[name]
        sx = st.channel_amax_all()
        w = model.get_submodule(name).weight.detach().float()
        # the search runs where the model is (DiT-XL/2: 21 alphas x 112 layers of matmuls)
        a, _ = tas_alpha_search(st.token_samples().to(w.device), sx, w, alphas, wfmt=lp.wfmt,
                                afmt=lp.afmt, granularity=gran, group_size=group,
                                act_granularity=lp.act_granularity)
        balances[name] = smoothing_factor(sx, w.abs().amax(dim=0).cpu(), a)
        chosen[name] = a
    return assemble_recipe(model, stats, config, "ditas", balances,
                           {"alpha_grid_step": config.alpha_grid_step, "smoothed": roles}, info={"alpha": chosen})
