"""Turning balancing vectors + statistics into a recipe: the step every method shares.

A method decides *what* to balance; this module folds the balancing into a copy of the model,
searches the weight scales on the folded weights and the activation scales of the balanced
inputs ``X / b``, and writes the ``Recipe``.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ..runtime import quant
from ..runtime.recipe import LayerRecipe, Recipe, balanced_model, layer_role, model_fingerprint
from .config import CalibConfig
from .search import search_act_amax, search_act_amax_samples, search_weight_scale
from .stats import LayerStats, Statistics

# where each role's balancing folds: a recipe layer's balance_fold (docs/calibration.md), done by
# runtime.recipe.fold_balance
FOLD_BY_ROLE = {"attn.qkv": "adaLN", "mlp.fc1": "adaLN", "attn.proj": "v", "mlp.fc2": "runtime"}


def quant_layer_names(model: nn.Module, roles: list[str]) -> list[str]:
    """``blocks.N.<role>`` for every block, in model order."""
    return [f"blocks.{i}.{r}" for i in range(len(model.blocks)) for r in roles]


def kept_layers(names: list[str], patterns: list[str]) -> set[str]:
    """The layers ``patterns`` (names or fnmatch patterns) keep unquantized. A pattern that
    matches nothing is an error: a typo would otherwise quantize the layer it meant to keep."""
    kept = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ValueError(f"keep: {pattern!r} matches no quantizable layer (they are blocks.N.ROLE with "
                             f"ROLE in {sorted({n.split('.', 2)[2] for n in names})})")
        kept.update(hits)
    return kept


def weight_salience(model: nn.Module, name: str) -> torch.Tensor:
    """s(W_j) = max_o |W[o, j]|, per input channel."""
    return model.get_submodule(name).weight.detach().float().abs().amax(dim=0).cpu()


def act_amax(st: LayerStats, b: torch.Tensor | None, config: CalibConfig, search: str) -> float:
    """Clip range of the (balanced) input of a layer. Its exact maximum comes from the
    per-channel maxima: max |X / b| = max_j s(X_j) / b_j."""
    sx = st.channel_amax_all()
    if b is None:
        if search == "minmax":
            return float(sx.max())
        return search_act_amax(st.hist, config.afmt, search, config.percentile, config.lp)
    exact = float((sx / b).max())
    if search == "minmax":
        return exact
    return search_act_amax_samples(st.token_samples() / b, config.afmt, search, config.percentile, config.lp,
                                   amax=exact)


@torch.no_grad()
def assemble_recipe(model: nn.Module, stats: Statistics, config: CalibConfig, method: str,
                    balances: dict[str, torch.Tensor] | None = None, options: dict | None = None, *,
                    weight_search: str | None = None, act_search: str | None = None,
                    info: dict | None = None) -> Recipe:
    balances = balances or {}
    weight_search = weight_search or config.weight_search
    act_search = act_search or config.act_search
    gran, group = config.granularity
    all_names = quant_layer_names(model, config.layers)
    kept = kept_layers(all_names, config.keep)
    names = [n for n in all_names if n not in kept]
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerRecipe] = {}
    for name in names:
        layer = LayerRecipe(weight_format="none", weight_granularity=gran, weight_group_size=group, act_format="none")
        b = balances.get(name)
        if b is not None:
            tensors[f"{name}.balance"] = b.detach().float().cpu()
            layer.balance, layer.balance_fold = f"{name}.balance", FOLD_BY_ROLE[layer_role(name)]
        layers[name] = layer
    opts = {"weight_bits": config.weight_bits, "act_bits": config.act_bits, "weight_format": config.wfmt,
            "act_format": config.afmt, "weight_granularity": config.weight_granularity,
            "weight_search": weight_search, "act_search": act_search, "kept": sorted(kept), **(options or {})}
    recipe = Recipe(method, model_fingerprint(model), layers, tensors, opts, model.config.to_dict(), dict(info or {}))
    folded = balanced_model(model, recipe, check=False)  # weights as the simulated model will hold them
    for name, layer in layers.items():
        w = folded.get_submodule(name).weight
        tensors[f"{name}.weight_scale"] = search_weight_scale(
            w, config.wfmt, gran, group, weight_search, config.percentile, config.lp).cpu()
        layer.weight_format, layer.weight_scale = config.wfmt, f"{name}.weight_scale"
        if config.afmt != "none":
            b = tensors.get(f"{name}.balance")
            amax = act_amax(stats[name], b, config, act_search)
            layer.act_format, layer.act_scale = config.afmt, float(quant.scale_from_amax(amax, config.afmt))
    recipe.validate(model)
    return recipe
