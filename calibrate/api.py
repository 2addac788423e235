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


def statistics(model: nn.Module, data: CalibrationSet | ForwardLoop, config: CalibConfig) -> Statistics:
    """Hook the quantizable layers named by ``config.layers`` and run the data through."""
    loop = data.forward_loop(config.batch_size, config.device, config.progress) if isinstance(data, CalibrationSet) else data
    names = quant_layer_names(model, config.layers)
    return collect_stats(model, loop, names, sample_tokens=config.sample_tokens, hist_bins=config.hist_bins)


def calibrate(model: nn.Module, data: CalibrationSet | ForwardLoop | Statistics, config: CalibConfig = CalibConfig()) -> Recipe:
    """Statistics (unless given) then the method: a recipe for ``model``."""
    method = get_method(config.method)  # fail on a bad name before any forward pass
    t0 = time.perf_counter()
    stats = data if isinstance(data, Statistics) else statistics(model, data, config)
    t1 = time.perf_counter()
    recipe = method(model, stats, config)
    recipe.info.update({"calibration_rows": stats.rows, "stats_seconds": round(t1 - t0, 2),
                        "method_seconds": round(time.perf_counter() - t1, 2)})
    if isinstance(data, CalibrationSet):
        recipe.info["calibration_set"] = data.info
    return recipe
