"""Recipes for export tests, made with the recipe API (runtime.recipe): balancing vectors at
every foldable place and min-max activation scales measured on the balanced model."""

from __future__ import annotations

import torch

from dtq.runtime import quant
from dtq.runtime.recipe import LayerRecipe, Recipe, balanced_model, model_fingerprint

from conftest import dit_inputs as inputs  # noqa: F401  (re-exported for the export tests)

from dtq.tools.quick_recipe import FOLD, FORMATS, ROLES  # noqa: F401  (the layer tables shared with the engine tests)


def make_recipe(model, precision: str, balance: bool = True, group: int = 32, seed: int = 0,
                calib_batch: int = 8) -> Recipe:
    wf, af = FORMATS[precision]
    gen = torch.Generator().manual_seed(seed)
    layers, tensors = {}, {}
    for i in range(model.config.depth):
        for role in ROLES:
            name = f"blocks.{i}.{role}"
            lin = model.get_submodule(name)
            gran = "group" if wf == "int4" else "channel"
            layers[name] = LayerRecipe(weight_format=wf, weight_granularity=gran,
                                       weight_group_size=group if gran == "group" else None,
                                       act_format=af, act_scale=1.0 if af != "none" else None)
            if balance:
                b = torch.exp(torch.empty(lin.in_features).uniform_(-0.5, 0.5, generator=gen))
                tensors[f"{name}.balance"] = b
                layers[name].balance = f"{name}.balance"
                layers[name].balance_fold = FOLD[role]
    recipe = Recipe("test-minmax", model_fingerprint(model), layers, tensors, model_config=model.config.to_dict())
    if af != "none":
        bal = balanced_model(model, recipe)
        amax = {}
        hooks = []
        for name in layers:
            mod = bal.get_submodule(name)

            def hook(m, args, name=name):
                x = args[0]
                if getattr(m, "input_mul", None) is not None:
                    x = x * m.input_mul
                amax[name] = max(amax.get(name, 0.0), float(x.abs().max()))

            hooks.append(mod.register_forward_pre_hook(hook))
        with torch.no_grad():
            bal(*inputs(model, calib_batch, seed=seed + 100))
        for h in hooks:
            h.remove()
        for name, layer in layers.items():
            layer.act_scale = float(quant.scale_from_amax(amax[name], af))
    recipe.validate(model)
    return recipe
