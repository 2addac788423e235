"""Weight-side refinements applied to a method's recipe: DiTAS' low-rank branch and GPTQ.

They run after any method (minmax, smoothquant, ptq4dit, ditas ...) on what the method produced:
the balanced weight ``W diag(b)`` of ``balanced_model`` and the method's weight scales. The
activation side (balancing, activation scales) is left as the method chose it.

Per quantized layer, in this order:

1. low-rank (``lowrank_rank > 0``): ``(L, R)`` by ``lowrank.lowrank_decompose`` on ``W diag(b)``
   with the recipe's weight format and search; the layer's weight becomes ``W diag(b) - L R``
   with a scale searched on it. ``L``/``R`` are FP16 values (``lowrank_up`` / ``lowrank_down``).
2. GPTQ (``gptq``): the (residual) weight is rounded by ``gptq.gptq_quantize`` with the layer's
   (static) scale and ``H = X^T X`` of the layer's balanced input ``X / b``, all calibration rows
   and timesteps pooled, from one extra pass over ``balanced_model`` (the FP model with balancing
   folded). ``X`` is *not* activation-quantized: GPTQ's objective is ``|X W^T - X Q^T|``, the
   weight's share of the error; the branch (1) reads the same unquantized ``X``, so GPTQ on
   ``W - L R`` targets exactly what the quantized path must supply.

The recipe records the result in ``LayerRecipe.weight``: the weight the layer's quantizer sees
(replacing ``W diag(b)``). After GPTQ it is GPTQ's dequantized weight, on the grid, so
``quant.quantize_weight(weight, weight_scale)`` returns GPTQ's codes exactly in the simulation,
the ONNX initializers and the engine alike.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..runtime import quant
from ..runtime.distributed import SINGLE, DistContext
from ..runtime.recipe import Recipe, balanced_model
from .config import CalibConfig
from .data import ForwardLoop
from .gptq import collect_hessians, gptq_quantize
from .lowrank import lowrank_decompose
from .search import search_weight_scale


def wants_refinement(config: CalibConfig) -> bool:
    return config.gptq or config.lowrank_rank > 0


@torch.no_grad()
def refine_weights(model: nn.Module, recipe: Recipe, forward_loop: ForwardLoop | None, config: CalibConfig,
                   shard: DistContext = SINGLE) -> Recipe:
    """``recipe`` (edited in place and returned) with low-rank branches and/or GPTQ weights.
    ``shard``: ``forward_loop`` runs this rank's share of the batches (GPTQ all-reduces ``X^T X``)."""
    if not wants_refinement(config):
        return recipe
    if config.gptq and forward_loop is None:
        raise ValueError("GPTQ needs calibration data (a CalibrationSet or forward_loop), not only statistics")
    t0 = time.perf_counter()
    search = recipe.options.get("weight_search", config.weight_search)
    names = [n for n, layer in recipe.layers.items() if layer.weight_format != "none"]
    folded = balanced_model(model, recipe, check=False)
    hessians = collect_hessians(folded, forward_loop, names, shard) if config.gptq else {}
    t1 = time.perf_counter()
    lowrank_errors = {}
    for name in names:
        layer = recipe.layers[name]
        fmt, gran, group = layer.weight_format, layer.weight_granularity, layer.weight_group_size

        def quantizer(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = search_weight_scale(w, fmt, gran, group, search, config.percentile, config.lp)
            return quant.fake_quant_weight(w, s, fmt, gran, group), s

        w = folded.get_submodule(name).weight.detach().float()
        scale = recipe.weight_scale(name)  # none stored: min-max, as QuantLinear.set_quant takes it
        scale = quant.weight_scale(w, fmt, gran, group) if scale is None else scale.to(w.device)
        if config.lowrank_rank > 0:
            lr = lowrank_decompose(w, quantizer, min(config.lowrank_rank, *w.shape), config.lowrank_iters)
            w, scale = lr.residual, lr.scale
            recipe.tensors[f"{name}.lowrank_up"] = lr.up.cpu()
            recipe.tensors[f"{name}.lowrank_down"] = lr.down.cpu()
            layer.lowrank_up, layer.lowrank_down = f"{name}.lowrank_up", f"{name}.lowrank_down"
            lowrank_errors[name] = [round(e, 5) for e in lr.errors]
        if config.gptq:
            w = gptq_quantize(w, hessians.pop(name), scale, fmt, gran, group, block=config.gptq_block,
                              damp=config.gptq_damp, act_order=config.gptq_act_order)
        recipe.tensors[f"{name}.weight_scale"] = scale.detach().float().cpu()
        recipe.tensors[f"{name}.weight"] = w.detach().float().cpu()
        layer.weight = f"{name}.weight"
    recipe.options.update({"gptq": config.gptq, "lowrank_rank": config.lowrank_rank})
    if config.gptq:
        recipe.options.update({"gptq_block": config.gptq_block, "gptq_damp": config.gptq_damp,
                               "gptq_act_order": config.gptq_act_order})
    if config.lowrank_rank > 0:
        recipe.options["lowrank_iters"] = config.lowrank_iters
        recipe.info["lowrank_weight_error"] = lowrank_errors
    recipe.info.update({"hessian_seconds": round(t1 - t0, 2), "refine_seconds": round(time.perf_counter() - t1, 2)})
    recipe.validate(model)
    return recipe
