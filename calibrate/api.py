"""The one verb: ``calibrate(model, data, CalibConfig(...)) -> Recipe``.

``data`` is a ``CalibrationSet`` or any ModelOpt-style ``forward_loop(model)`` that runs the
calibration inputs through the model; statistics are hooked from whatever it feeds.

The pipeline stage around it, as ``export.api.export_model`` is export's:
``calibrate_checkpoint(CalibrateJob(...), CalibConfig(...), CalibDataConfig(...)) -> Recipe``
loads the checkpoint, samples (or reads) the calibration set, calibrates, measures the held-out
noise SQNR and writes the recipe directory. ``dtq-calibrate`` only parses its command line into
these three objects.

Under ``torchrun`` (``calibrate_checkpoint``, or ``calibrate(..., shard=ctx)``) the two data
passes are data-parallel: the ranks share the calibration set's sampler batches and the forward
loops' batches (statistics, GPTQ's ``X^T X``) and reduce what they collected, so every rank holds
the statistics one process would have. The method (scale searches, DiTAS' alpha grid, GPTQ's
rounding) then runs on every rank on those same numbers, which keeps the code one path: no recipe
is sent between ranks, and rank 0 alone writes. A ``forward_loop`` given instead of a
``CalibrationSet`` is opaque: it runs whole on every rank and nothing is reduced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from torch import nn

from ..artifacts import CALIBRATION_SET
from ..runtime.adapters import adapter_for
from ..runtime.distributed import SINGLE, DistContext, data_parallel, rank_device
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


def statistics(model: nn.Module, data: CalibrationSet | ForwardLoop, config: CalibConfig,
               shard: DistContext = SINGLE) -> Statistics:
    """Hook the quantizable layers named by ``config.layers`` and run the data through (a
    ``CalibrationSet`` shared among the ranks of ``shard``). With ``config.rotate_fc2`` the fc2
    inputs are recorded rotated (``Statistics.rotations``)."""
    shard = _shard_of(data, shard)
    names = quant_layer_names(model, config.layers)
    rotations = fc2_rotations(model, config)
    target = rotated_model(model, rotations) if rotations else model
    stats = collect_stats(target, _forward_loop(data, config, shard), names, sample_tokens=config.sample_tokens,
                          hist_bins=config.hist_bins, shard=shard)
    stats.rotations = dict(rotations)
    return stats


def _shard_of(data, shard: DistContext) -> DistContext:
    return shard if isinstance(data, CalibrationSet) else SINGLE  # an opaque loop runs whole on every rank


def _forward_loop(data: CalibrationSet | ForwardLoop, config: CalibConfig, shard: DistContext = SINGLE) -> ForwardLoop:
    if isinstance(data, CalibrationSet):
        return data.forward_loop(config.batch_size, config.device, config.progress, shard=shard)
    return data


def calibrate(model: nn.Module, data: CalibrationSet | ForwardLoop | Statistics, config: CalibConfig = CalibConfig(),
              *, forward_loop: ForwardLoop | None = None, shard: DistContext = SINGLE) -> Recipe:
    """Statistics (unless given) then the method, then the weight-side refinements (GPTQ, low-rank
    branch: ``calibrate.weights``) and block reconstruction (``calibrate.recon``) if the config
    asks: a recipe for ``model``. GPTQ and reconstruction run the data once more; with precomputed
    ``Statistics`` pass the data as ``forward_loop``. ``shard``: the rank context under torchrun
    (``runtime.distributed.data_parallel``); every rank must call this with the same arguments and
    gets the same recipe."""
    method = get_method(config.method)  # fail on a bad name before any forward pass
    if config.reconstruct and adapter_for(model).family != "dit":
        raise ValueError(f"block reconstruction works on DiT blocks only, not on a {adapter_for(model).family} model "
                         "(docs/model-adapters.md)")
    if (config.gptq or config.reconstruct) and isinstance(data, Statistics) and forward_loop is None:
        what = "GPTQ" if config.gptq else "block reconstruction"
        raise ValueError(f"{what} needs the calibration data: pass forward_loop= with precomputed statistics")
    rotations = fc2_rotations(model, config)
    if isinstance(data, Statistics) and data.rotations != rotations:
        raise ValueError(f"statistics recorded with input rotations {data.rotations or 'none'}, the config asks "
                         f"for {rotations or 'none'}: collect them with statistics(model, data, config)")
    t0 = time.perf_counter()
    stats = data if isinstance(data, Statistics) else statistics(model, data, config, shard)
    t1 = time.perf_counter()
    # rotate_fc2: the method calibrates the rotated model; the recipe is then made the original's
    recipe = method(rotated_model(model, rotations) if rotations else model, stats, config)
    if rotations:
        attach_rotations(recipe, model, rotations, config)
    recipe.info.update({"calibration_rows": stats.rows, "stats_seconds": round(t1 - t0, 2),
                        "method_seconds": round(time.perf_counter() - t1, 2)})
    if forward_loop is not None:
        loop, loop_shard = forward_loop, SINGLE
    else:
        loop_shard = _shard_of(data, shard)
        loop = None if isinstance(data, Statistics) else _forward_loop(data, config, loop_shard)
    if wants_refinement(config):
        refine_weights(model, recipe, loop, config, loop_shard)
    if config.reconstruct:  # last: it fits the rounding (and steps) of whatever came before
        # not data-parallel: every rank reconstructs on all the rows (the same result, no reduction)
        whole = forward_loop if forward_loop is not None else _forward_loop(data, config)
        reconstruct_blocks(model, recipe, whole, config)
    if isinstance(data, CalibrationSet):
        recipe.info["calibration_set"] = data.info
    return recipe


@dataclass
class CalibrateJob:
    """What to calibrate and where the recipe goes (the stage's inputs and outputs)."""

    ckpt: Path | None = field(default=None, metadata={"help": ".pt / .safetensors DiT checkpoint (config.json beside it is read) or diffusers DiT folder"})
    model: str | None = field(default=None, metadata={"help": f"built-in model when no --ckpt ({', '.join(BUILTIN_MODELS)})"})
    cali_data: Path | None = field(default=None, metadata={"help": "reuse a saved calibration set instead of sampling one"})
    prompt_embeddings: Path | None = field(default=None, metadata={"help": (
        "text-conditioned models (diffusers PixArt folder): .safetensors of precomputed prompt embeddings the "
        "calibration trajectories are sampled with (runtime/prompts.py)")})
    eval_n: int = field(default=4, metadata={"help": "held-out samples (seed+1) for the SQNR report; 0: none"})
    out: Path = field(default=Path("recipe"), metadata={"help": "recipe directory to write"})


def calibrate_checkpoint(job: CalibrateJob, config: CalibConfig = CalibConfig(),
                         data_cfg: CalibDataConfig = CalibDataConfig()) -> Recipe:
    """The calibration stage: checkpoint (or built-in model) -> recipe directory ``job.out``
    (recipe.json + tensors.safetensors, and calibration_set.safetensors when it was sampled here,
    reusable as ``cali_data``). ``config.device`` "auto" takes CUDA when there is one. Returns the
    recipe; ``recipe.info["heldout_noise_sqnr_db"]`` holds the held-out SQNR when ``job.eval_n > 0``.

    Under ``torchrun --nproc-per-node N`` each rank takes ``cuda:LOCAL_RANK`` (or the CPU, gloo),
    the sampling and forward passes are shared (module docstring), and rank 0 alone measures the
    held-out SQNR and writes ``job.out``; the other ranks return the same recipe without it."""
    import torch

    from ..checks import check_output_path
    from ..runtime.recipe import RECIPE_JSON

    check_output_path(job.out, "dir", marker=RECIPE_JSON)  # before an hour of calibration, not after
    if config.device == "auto":
        config = replace(config, device="cuda" if torch.cuda.is_available() else "cpu")
    elif config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} requested but CUDA is not available")
    with data_parallel(torch.device(config.device)) as ctx:
        device = rank_device(torch.device(config.device), ctx)
        return _calibrate_checkpoint(job, replace(config, device=str(device)), data_cfg, ctx)


def _calibrate_checkpoint(job: CalibrateJob, config: CalibConfig, data_cfg: CalibDataConfig,
                          ctx: DistContext) -> Recipe:
    import shutil

    from ..runtime.checkpoint import load_checkpoint
    from ..runtime.recipe import RECIPE_JSON
    from ..runtime.zoo import DEFAULT_MODEL, builtin_checkpoint
    from ..staging import staged_directory
    from .data import collect_calibration_set
    from .evaluate import record_heldout_sqnr

    path = job.ckpt if job.ckpt is not None else builtin_checkpoint(job.model or DEFAULT_MODEL)
    model = load_checkpoint(path).to(config.device).eval()
    layer_precisions(model, config)  # an override matching no layer fails before any sampling
    fc2_rotations(model, config)  # so does a rotation no power-of-two block fits
    progress = config.progress and ctx.is_main
    prompts = _prompts(job, model)
    if job.cali_data is not None:
        data = CalibrationSet.load(job.cali_data)
    else:
        data = collect_calibration_set(model, data_cfg, device=config.device, progress=progress, shard=ctx,
                                       prompts=prompts)
    recipe = calibrate(model, data, replace(config, progress=progress), shard=ctx)
    if job.eval_n > 0:
        held_cfg = replace(data_cfg, cali_n=job.eval_n, seed=data_cfg.seed + 1)
        held = collect_calibration_set(model, held_cfg, device=config.device, progress=progress, shard=ctx,
                                       prompts=data.prompts)
        if ctx.is_main:  # a report, not part of the recipe's numbers: one rank measures it
            record_heldout_sqnr(model, recipe, held, batch_size=config.batch_size, device=config.device)
    if not ctx.is_main:
        return recipe
    # the recipe and its calibration set replace an old --out together, or not at all
    with staged_directory(job.out, marker=RECIPE_JSON) as tmp:
        recipe.write_files(tmp)
        if job.cali_data is None:
            data.save(tmp / CALIBRATION_SET)
        elif Path(job.cali_data).resolve() == (Path(job.out) / CALIBRATION_SET).resolve():
            shutil.copy2(job.cali_data, tmp / CALIBRATION_SET)  # --cali-data out/...: keep it
    return recipe


def _prompts(job: CalibrateJob, model: nn.Module):
    """The prompt embeddings a text-conditioned model calibrates with (None for a class model)."""
    text = getattr(model.config, "text_conditioned", False)
    if job.prompt_embeddings is not None and not text:
        raise ValueError("prompt_embeddings is for text-conditioned models (PixArt); this model takes class labels")
    if not text:
        return None
    if job.prompt_embeddings is None and job.cali_data is None:
        raise ValueError("this model is text-conditioned: give prompt_embeddings (precomputed embeddings file)")
    if job.prompt_embeddings is None:
        return None  # the saved calibration set carries its prompts
    from ..runtime.prompts import PromptEmbeddings

    return PromptEmbeddings.load(job.prompt_embeddings)
