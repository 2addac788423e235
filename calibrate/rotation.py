"""``CalibConfig.rotate_fc2``: calibrate fc2 on Hadamard-rotated inputs.

fc2's input (after GELU) cannot fold a balancing vector into a previous Linear; a rotation
``B`` (block-diagonal normalized Hadamard, ``runtime.rotation``) spreads its outlier channels
instead. The rotation comes *first*: the methods run on the rotated model (fc2 holds ``W B^T``
and rotates its input online) with statistics of the rotated input, so balancing (smoothquant's
or DiTAS' run-time ``Mul``), the weight and activation searches, GPTQ and the low-rank branch all
see the rotated layer. The recipe records the block per layer (``LayerRecipe.input_rotation``)
and is made for the original checkpoint (its fingerprint), like any recipe.

Why rotate-then-smooth and not smooth-then-rotate: with the rotation first, every method keeps
its per-channel statistics (of ``B x``) and the activation clip stays exact from channel maxima
(``max |B x / b| = max_j s(B x)_j / b_j``); smoothing before the rotation would need a second
statistics pass over the smoothed, rotated inputs. The measured effect of smoothing on top of the
rotation is in docs/calibration.md.
"""

from __future__ import annotations

import copy

from torch import nn

from ..runtime.recipe import Recipe, fold_rotation, model_fingerprint
from ..runtime.rotation import block_size
from .build import quantized_layers
from .config import CalibConfig

ROTATED_ROLES = ("mlp.fc2",)


def fc2_rotations(model: nn.Module, config: CalibConfig) -> dict[str, int]:
    """``{layer: Hadamard block}`` for the quantized fc2 layers when ``config.rotate_fc2``, else ``{}``."""
    if not config.rotate_fc2:
        return {}
    return {name: block_size(model.get_submodule(name).in_features, config.rotate_block)
            for name in quantized_layers(model, config, [r for r in config.layers if r in ROTATED_ROLES])}


def rotated_model(model: nn.Module, rotations: dict[str, int]) -> nn.Module:
    """A copy of ``model`` computing the same function, with each named layer's input rotated online
    and ``B^T`` folded into its weight: what the methods and the statistics hooks see."""
    out = copy.deepcopy(model)
    for name, k in rotations.items():
        fold_rotation(out, name, k)
    return out


def attach_rotations(recipe: Recipe, model: nn.Module, rotations: dict[str, int], config: CalibConfig) -> Recipe:
    """A method's recipe for ``rotated_model(model, rotations)`` as a recipe for ``model`` itself:
    the layers record their rotation block and the fingerprint becomes the original model's."""
    for name, k in rotations.items():
        recipe.layers[name].input_rotation = k
    recipe.model_fingerprint = model_fingerprint(model)
    recipe.options["rotate_fc2"] = bool(rotations)
    recipe.options["rotate_block"] = config.rotate_block
    recipe.validate(model)
    return recipe
