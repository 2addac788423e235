"""The one verb: ``calibrate(model, data, CalibConfig(...)) -> Recipe``.

``data`` is a ``CalibrationSet`` or any ModelOpt-style ``forward_loop(model)`` that runs the
calibration inputs through the model; statistics are hooked from whatever it feeds.
"""

from __future__ import annotations

import time
from typing import Callable

from torch import nn

from ..runtime.recipe import Recipe
from .build import quant_layer_names
from .config import CalibConfig
from .data import CalibrationSet, ForwardLoop
from .methods import get_method
from .stats import Statistics, collect_stats
from .weights import refine_weights, wants_refinement


def statistics(model: nn.Module, data: CalibrationSet | ForwardLoop, config: CalibConfig) -> Statistics:
    """Hook the quantizable layers named by ``config.layers`` and run the data through."""
    loop = _forward_loop(data, config)
    names = quant_layer_names(model, config.layers)
    return collect_stats(model, loop, names, sample_tokens=config.sample_tokens, hist_bins=config.hist_bins)


def _forward_loop(data: CalibrationSet | ForwardLoop, config: CalibConfig) -> ForwardLoop:
    if isinstance(data, CalibrationSet):
        return data.forward_loop(config.batch_size, config.device, config.progress)
    return data


def calibrate(model: nn.Module, data: CalibrationSet | ForwardLoop | Statistics, config: CalibConfig = CalibConfig(),
              *, forward_loop: ForwardLoop | None = None) -> Recipe:
    """Statistics (unless given) then the method, then the weight-side refinements (GPTQ, low-rank
    branch: ``calibrate.weights``) if the config asks: a recipe for ``model``. GPTQ runs the data
    once more; with precomputed ``Statistics`` pass the data as ``forward_loop``."""
    method = get_method(config.method)  # fail on a bad name before any forward pass
    if config.gptq and isinstance(data, Statistics) and forward_loop is None:
        raise ValueError("GPTQ needs the calibration data: pass forward_loop= with precomputed statistics")
    t0 = time.perf_counter()
    stats = data if isinstance(data, Statistics) else statistics(model, data, config)
    t1 = time.perf_counter()
    recipe = method(model, stats, config)
    recipe.info.update({"calibration_rows": stats.rows, "stats_seconds": round(t1 - t0, 2),
                        "method_seconds": round(time.perf_counter() - t1, 2)})
    if wants_refinement(config):
        loop = forward_loop if forward_loop is not None else (None if isinstance(data, Statistics)
                                                              else _forward_loop(data, config))
        refine_weights(model, recipe, loop, config)
    if isinstance(data, CalibrationSet):
        recipe.info["calibration_set"] = data.info
    return recipe
