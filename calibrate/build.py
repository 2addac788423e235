"""Turning balancing vectors + statistics into a recipe: the step every method shares.

A method decides *what* to balance; this module folds the balancing into a copy of the model,
searches the weight scales on the folded weights and the activation scales of the balanced
inputs ``X / b``, and writes the ``Recipe``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import formats
from ..runtime import quant
from ..runtime.adapters import adapter_for, quantizable_names
from ..runtime.recipe import LayerRecipe, Recipe, balanced_model, model_fingerprint
from .config import CalibConfig, LayerPrecision
from .search import search_act_amax, search_act_amax_samples, search_weight_scale
from .stats import LayerStats, Statistics

# where each DiT role's balancing folds: a recipe layer's balance_fold (docs/calibration.md), done by
# runtime.recipe.fold_balance; the table is dtq.formats'. Other families: their adapter's fold().
FOLD_BY_ROLE = formats.FOLD_BY_ROLE


def quant_layer_names(model: nn.Module, roles: list[str]) -> list[str]:
    """The model's quantizable Linears of ``roles`` (its adapter's names: ``blocks.N.<role>`` for a
    DiT), in model order; roles the model does not have are skipped."""
    return quantizable_names(model, roles)


def layer_precisions(model: nn.Module, config: CalibConfig) -> dict[str, LayerPrecision]:
    """Every layer ``config.layers`` names, with its precision after ``config.overrides``."""
    return config.layer_precisions(quant_layer_names(model, config.layers))


def quantized_layers(model: nn.Module, config: CalibConfig, roles=None) -> dict[str, LayerPrecision]:
    """The layers (of ``roles``, default all configured) that get quantized, with their precision."""
    roles = config.layers if roles is None else roles
    role = adapter_for(model).role
    return {n: lp for n, lp in layer_precisions(model, config).items() if lp.quantized and role(n) in roles}


def weight_salience(model: nn.Module, name: str) -> torch.Tensor:
    """s(W_j) = max_o |W[o, j]|, per input channel."""
    return model.get_submodule(name).weight.detach().float().abs().amax(dim=0).cpu()


def act_amax(st: LayerStats, b: torch.Tensor | None, config: CalibConfig, search: str, afmt: str | None = None) -> float:
    """Clip range of the (balanced) input of a layer in activation format ``afmt`` (default: the
    config's). Its exact maximum comes from the per-channel maxima: max |X / b| = max_j s(X_j) / b_j."""
    afmt = afmt or config.afmt
    sx = st.channel_amax_all()
    if b is None:
        if search == "minmax":
            return float(sx.max())
        return search_act_amax(st.hist, afmt, search, config.percentile, config.lp)
    exact = float((sx / b).max())
    if search == "minmax":
        return exact
    return search_act_amax_samples(st.token_samples() / b, afmt, search, config.percentile, config.lp,
                                   amax=exact)


@torch.no_grad()
def assemble_recipe(model: nn.Module, stats: Statistics, config: CalibConfig, method: str,
                    balances: dict[str, torch.Tensor] | None = None, options: dict | None = None, *,
                    weight_search: str | None = None, act_search: str | None = None,
                    info: dict | None = None) -> Recipe:
    balances = balances or {}
    adapter = adapter_for(model)
    weight_search = weight_search or config.weight_search
    act_search = act_search or config.act_search
    precisions = layer_precisions(model, config)  # each layer in its own precision (overrides)
    kept = sorted(n for n, lp in precisions.items() if not lp.quantized)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerRecipe] = {}
    for name, lp in precisions.items():
        if not lp.quantized:
            continue
        gran, group = lp.granularity
        layer = LayerRecipe(weight_format="none", weight_granularity=gran, weight_group_size=group, act_format="none")
        b = balances.get(name)
        if b is not None:
            tensors[f"{name}.balance"] = b.detach().float().cpu()
            layer.balance, layer.balance_fold = f"{name}.balance", adapter.fold(name)
        layers[name] = layer
    opts = {"precision": config.precision, "weight_granularity": config.weight_granularity,
            "overrides": list(config.overrides), "act_granularity": config.act_granularity, "weight_search": weight_search, "act_search": act_search,
            "kept": kept, **(options or {})}
    recipe = Recipe(method, model_fingerprint(model), layers, tensors, opts, model.config.to_dict(), dict(info or {}),
                    precision=config.precision)
    folded = balanced_model(model, recipe, check=False)  # weights as the simulated model will hold them
    for name, layer in layers.items():
        lp = precisions[name]
        w = folded.get_submodule(name).weight
        tensors[f"{name}.weight_scale"] = search_weight_scale(
            w, lp.wfmt, layer.weight_granularity, layer.weight_group_size, weight_search, config.percentile,
            config.lp).cpu()
        layer.weight_format, layer.weight_scale = lp.wfmt, f"{name}.weight_scale"
        if lp.afmt != "none" and lp.act_granularity == "token":  # scale computed per token at run time
            layer.act_format, layer.act_granularity = lp.afmt, "token"
        elif lp.afmt != "none":
            b = tensors.get(f"{name}.balance")
            amax = act_amax(stats[name], b, config, act_search, lp.afmt)
            layer.act_format, layer.act_scale = lp.afmt, float(quant.scale_from_amax(amax, lp.afmt))
    recipe.validate(model)
    return recipe
