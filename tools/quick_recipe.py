"""A min-max recipe made in one forward pass, for speed tests and engine tests (not a calibration
method: ``dtq-calibrate`` makes real recipes). Layers: every block's qkv, proj, fc1, fc2 (and, with
``adaln=True``, the blocks' adaLN Linears for weight-only formats). Optional random balancing
vectors at every foldable place exercise the folding paths (adaLN rows, V rows, run-time Mul)."""

from __future__ import annotations

import torch
from torch import nn

from dtq import formats
from dtq.runtime import quant
from dtq.runtime.recipe import LayerRecipe, Recipe, balanced_model, model_fingerprint

ROLES = formats.ROLES
FOLD = formats.FOLD_BY_ROLE
# precision -> (weight format, activation format), from the precision table
FORMATS = {n: (p.weight_format, p.act_format) for n, p in formats.PRECISIONS.items() if p.quantized}


def random_inputs(model: nn.Module, batch: int, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, c.num_classes + (1 if c.null_class is not None else 0), (batch,), generator=g)
    return x.to(device), t.to(device), y.to(device)


@torch.no_grad()
def minmax_recipe(model: nn.Module, precision: str, *, group: int = 128, balance: bool = False,
                  adaln: bool = False, calib_batch: int = 4, seed: int = 0,
                  fingerprint: str | None = None, act_granularity: str = "tensor") -> Recipe:
    """Per-channel (INT8/FP8) or per-group (INT4) min-max weight scales (``QuantLinear`` defaults),
    per-tensor min-max activation scales from one batch of random inputs. ``fingerprint``: pass a
    precomputed ``model_fingerprint`` (hashing DiT-XL takes seconds). ``act_granularity="token"``:
    dynamic per-token activation scales (no activation statistics pass)."""
    wf, af = FORMATS[precision]
    formats.check_act_granularity(precision, act_granularity)
    dynamic = act_granularity == "token"
    gen = torch.Generator().manual_seed(seed + 1)
    layers, tensors = {}, {}
    names = [f"blocks.{i}.{role}" for i in range(len(model.blocks)) for role in ROLES]
    if adaln and af == "none":
        names += [f"blocks.{i}.adaLN_modulation.1" for i in range(len(model.blocks))]
    for name in names:
        lin = model.get_submodule(name)
        gran = "group" if wf == "int4" else "channel"
        g = min(group, lin.in_features) if gran == "group" else None
        layers[name] = LayerRecipe(weight_format=wf, weight_granularity=gran, weight_group_size=g,
                                   act_format=af, act_scale=1.0 if af != "none" and not dynamic else None,
                                   act_granularity=act_granularity)
        role = ".".join(name.split(".")[2:])
        if balance and role in FOLD:
            b = torch.exp(torch.empty(lin.in_features).uniform_(-0.5, 0.5, generator=gen))
            tensors[f"{name}.balance"] = b
            layers[name].balance, layers[name].balance_fold = f"{name}.balance", FOLD[role]
    fp = fingerprint or model_fingerprint(model)
    recipe = Recipe("minmax-quick", fp, layers, tensors, model_config=model.config.to_dict(), precision=precision)
    if af != "none" and not dynamic:
        bal = balanced_model(model, recipe, check=False)
        amax: dict[str, float] = {}
        hooks = []
        for name in layers:
            def hook(m, args, name=name):
                x = args[0]
                if getattr(m, "input_mul", None) is not None:
                    x = x * m.input_mul
                amax[name] = max(amax.get(name, 0.0), float(x.abs().max()))

            hooks.append(bal.get_submodule(name).register_forward_pre_hook(hook))
        device = next(model.parameters()).device
        bal(*random_inputs(model, calib_batch, seed=seed + 100, device=device))
        for h in hooks:
            h.remove()
        del bal
        for name, layer in layers.items():
            layer.act_scale = float(quant.scale_from_amax(amax[name], af))
    return recipe
