"""Methods without balancing: only the clipping search differs."""

from __future__ import annotations

from ..build import assemble_recipe
from . import register


@register("minmax")
def minmax(model, stats, config):
    """Scales from the observed ranges (the config's searches apply; by default min-max)."""
    return assemble_recipe(model, stats, config, "minmax")


@register("percentile")
def percentile(model, stats, config):
    """Activation clip at the ``config.percentile`` of |x| (weights: the config's search)."""
    return assemble_recipe(model, stats, config, "percentile", act_search="percentile",
                           options={"percentile": config.percentile})


@register("mse")
def mse(model, stats, config):
    """Lp-optimal clipping of weights (per block) and activations (Q-Diffusion / PTQ4DiT init)."""
    return assemble_recipe(model, stats, config, "mse", weight_search="mse", act_search="mse",
                           options={"lp": config.lp})
