"""The one verb: ``calibrate(model, data, CalibConfig(...)) -> Recipe``.

``data`` is a ``CalibrationSet`` or any ModelOpt-style ``forward_loop(model)`` that runs the
calibration inputs through the model; statistics are hooked from whatever it feeds.

The pipeline stage around it, as ``export.api.export_model`` is export's:
``calibrate_checkpoint(CalibrateJob(...), CalibConfig(...), CalibDataConfig(...)) -> Recipe``
loads the checkpoint, samples (or reads) the calibration set, calibrates, measures the held-out
noise SQNR and writes the recipe directory. ``dtq-calibrate`` only parses its command line into
these three objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from torch import nn

from ..artifacts import CALIBRATION_SET
from ..runtime.recipe import Recipe
from ..runtime.zoo import BUILTIN_MODELS
from .build import layer_precisions, quant_layer_names
from .config import CalibConfig, CalibDataConfig
from .data import CalibrationSet, ForwardLoop
from .methods import get_method
from .rotation import attach_rotations, fc2_rotations, rotated_model
from .stats import Statistics, collect_stats
from .recon import reconstruct_blocks
from .weights import refine_weights, wants_refinement


def statistics(model: nn.Module, data: CalibrationSet | ForwardLoop, config: CalibConfig) -> Statistics:
    """Hook the quantizable layers named by ``config.layers`` and run the data through. With
    ``config.rotate_fc2`` the fc2 inputs are recorded rotated (``Statistics.rotations``)."""
    loop = _forward_loop(data, config)
    names = quant_layer_names(model, config.layers)
    rotations = fc2_rotations(model, config)
    target = rotated_model(model, rotations) if rotations else model
    stats = collect_stats(target, loop, names, sample_tokens=config.sample_tokens, hist_bins=config.hist_bins)
    stats.rotations = dict(rotations)
    return stats


def _forward_loop(data: CalibrationSet | ForwardLoop, config: CalibConfig) -> ForwardLoop:
    if isinstance(data, CalibrationSet):
        return data.forward_loop(config.batch_size, config.device, config.progress)
    return data


def calibrate(model: nn.Module, data: CalibrationSet | ForwardLoop | Statistics, config: CalibConfig = CalibConfig(),
              *, forward_loop: ForwardLoop | None = None) -> Recipe:
    """Statistics (unless given) then the method, then the weight-side refinements (GPTQ, low-rank
    branch: ``calibrate.weights``) and block reconstruction (``calibrate.recon``) if the config
    asks: a recipe for ``model``. GPTQ and reconstruction run the data once more; with precomputed
    ``Statistics`` pass the data as ``forward_loop``."""
    method = get_method(config.method)  # fail on a bad name before any forward pass
    if (config.gptq or config.reconstruct) and isinstance(data, Statistics) and forward_loop is None:
        what = "GPTQ" if config.gptq else "block reconstruction"
        raise ValueError(f"{what} needs the calibration data: pass forward_loop= with precomputed statistics")
    rotations = fc2_rotations(model, config)
    if isinstance(data, Statistics) and data.rotations != rotations:
        raise ValueError(f"statistics recorded with input rotations {data.rotations or 'none'}, the config asks "
                         f"for {rotations or 'none'}: collect them with statistics(model, data, config)")
    t0 = time.perf_counter()
    stats = data if isinstance(data, Statistics) else statistics(model, data, config)
    t1 = time.perf_counter()
    # rotate_fc2: the method calibrates the rotated model; the recipe is then made the original's
    recipe = method(rotated_model(model, rotations) if rotations else model, stats, config)
    if rotations:
        attach_rotations(recipe, model, rotations, config)
    recipe.info.update({"calibration_rows": stats.rows, "stats_seconds": round(t1 - t0, 2),
                        "method_seconds": round(time.perf_counter() - t1, 2)})
    loop = forward_loop if forward_loop is not None else (None if isinstance(data, Statistics)
                                                          else _forward_loop(data, config))
    if wants_refinement(config):
        refine_weights(model, recipe, loop, config)
    if config.reconstruct:  # last: it fits the rounding (and steps) of whatever came before
        reconstruct_blocks(model, recipe, loop, config)
    if isinstance(data, CalibrationSet):
        recipe.info["calibration_set"] = data.info
    return recipe


@dataclass
class CalibrateJob:
    """What to calibrate and where the recipe goes (the stage's inputs and outputs)."""

    ckpt: Path | None = field(default=None, metadata={"help": ".pt / .safetensors DiT checkpoint (config.json beside it is read) or diffusers DiT folder"})
    model: str | None = field(default=None, metadata={"help": f"built-in model when no --ckpt ({', '.join(BUILTIN_MODELS)})"})
    cali_data: Path | None = field(default=None, metadata={"help": "reuse a saved calibration set instead of sampling one"})
    eval_n: int = field(default=4, metadata={"help": "held-out samples (seed+1) for the SQNR report; 0: none"})
    out: Path = field(default=Path("recipe"), metadata={"help": "recipe directory to write"})


def calibrate_checkpoint(job: CalibrateJob, config: CalibConfig = CalibConfig(),
                         data_cfg: CalibDataConfig = CalibDataConfig()) -> Recipe:
    """The calibration stage: checkpoint (or built-in model) -> recipe directory ``job.out``
    (recipe.json + tensors.safetensors, and calibration_set.safetensors when it was sampled here,
    reusable as ``cali_data``). ``config.device`` "auto" takes CUDA when there is one. Returns the
    recipe; ``recipe.info["heldout_noise_sqnr_db"]`` holds the held-out SQNR when ``job.eval_n > 0``."""
    import shutil

    import torch

    from ..checks import check_output_path
    from ..runtime.checkpoint import load_checkpoint
    from ..runtime.recipe import RECIPE_JSON, apply_recipe
    from ..staging import staged_directory
    from ..runtime.zoo import DEFAULT_MODEL, builtin_checkpoint
    from .data import collect_calibration_set
    from .evaluate import noise_sqnr

    check_output_path(job.out, "dir", marker=RECIPE_JSON)  # before an hour of calibration, not after
    if config.device == "auto":
        config = replace(config, device="cuda" if torch.cuda.is_available() else "cpu")
    elif config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} requested but CUDA is not available")
    path = job.ckpt if job.ckpt is not None else builtin_checkpoint(job.model or DEFAULT_MODEL)
    model = load_checkpoint(path).to(config.device).eval()
    layer_precisions(model, config)  # an override matching no layer fails before any sampling
    fc2_rotations(model, config)  # so does a rotation no power-of-two block fits
    if job.cali_data is not None:
        data = CalibrationSet.load(job.cali_data)
    else:
        data = collect_calibration_set(model, data_cfg, device=config.device, progress=config.progress)
    recipe = calibrate(model, data, config)
    if job.eval_n > 0:
        held_cfg = replace(data_cfg, cali_n=job.eval_n, seed=data_cfg.seed + 1)
        held = collect_calibration_set(model, held_cfg, device=config.device, progress=config.progress)
        sqnr = noise_sqnr(model, apply_recipe(model, recipe), held, batch_size=config.batch_size, device=config.device)
        recipe.info["heldout_noise_sqnr_db"] = {k: round(v, 2) for k, v in sqnr.items()}
    # the recipe and its calibration set replace an old --out together, or not at all
    with staged_directory(job.out, marker=RECIPE_JSON) as tmp:
        recipe.write_files(tmp)
        if job.cali_data is None:
            data.save(tmp / CALIBRATION_SET)
        elif Path(job.cali_data).resolve() == (Path(job.out) / CALIBRATION_SET).resolve():
            shutil.copy2(job.cali_data, tmp / CALIBRATION_SET)  # --cali-data out/...: keep it
    return recipe
