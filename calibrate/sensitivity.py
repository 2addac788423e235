"""Metric-decoupled mixed precision (ViDiT-Q): which layers of a low-precision model to raise.

The sweep starts from the simulated all-low model (e.g. W4A8) and raises ONE unit (a layer, or all
quantized layers of a block) to the high recipe's format (e.g. W8A8) at a time; the unit's *gain* is
the held-out output SQNR of that model minus the all-low SQNR, i.e. what spending the budget on
it buys. Numbers are kept per timestep group and for two metrics (noise SQNR, cosine), so a user
sees where on the trajectory a layer matters; the ranking uses the mean over timestep groups.

Why the two recipes must share their balancing vectors: a layer's balance folds into rows other
layers own (qkv/fc1 into adaLN rows, proj into qkv's V rows), so a high recipe with its own balances
would fold a different model, and raising one layer would also change its neighbours' weights.
``matched_high_recipe`` re-assembles the high recipe on the low recipe's balances (same method, same
searches, only formats and scales differ): the folded model is then identical and raising a layer
changes exactly that layer's ``QuantLinear``. The sweep checks this (``check_matched``) and swaps the
high model's ``QuantLinear`` into the low simulation one unit at a time, with no rebuild.

Output: ``pick_overrides`` returns ``PATTERN=PRECISION`` strings (``blocks.3.mlp.fc2=int8``), the
syntax of ``CalibConfig.overrides``; ``mixed_recipe`` merges the two recipes into that mixed recipe.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from .. import formats
from ..runtime import quant
from ..runtime.recipe import Recipe, RecipeError, _parent, apply_recipe
from .build import assemble_recipe
from .rotation import attach_rotations, rotated_model
from .config import CalibConfig, PrecisionName
from .data import CalibrationSet
from .evaluate import predict
from .stats import Statistics

Unit = Literal["layer", "block"]
BudgetUnit = Literal["fraction", "layers"]
precision_of = formats.precision_of  # a recipe layer's (weight, activation) formats -> precision name


def config_for_precision(config: CalibConfig, precision: str) -> CalibConfig:
    """``config`` with another precision: its weight (activation) granularity where the precision
    takes it, else the precision's default (8-bit weights per channel, 4-bit per group; per tensor)."""
    p = formats.get_precision(precision)
    if not p.quantized:
        raise ValueError(f"precision must be one of {', '.join(formats.QUANTIZED_PRECISIONS)}, got {precision!r}")
    gran = config.weight_granularity if config.weight_granularity in p.granularities else p.default_granularity
    # per-token activations stay per token where the precision quantizes activations (W8A16 has none)
    act = config.act_granularity if config.act_granularity in p.act_granularities else "tensor"
    return replace(config, precision=precision, weight_granularity=gran, act_granularity=act)


def matched_high_recipe(model: nn.Module, stats: Statistics, recipe_low: Recipe, config_high: CalibConfig,
                        forward_loop=None) -> Recipe:
    """The high-precision recipe on ``recipe_low``'s balancing vectors, method and searches: the same
    folded model, only formats and scales differ (what the sweep and ``mixed_recipe`` need). The
    config's weight refinements (GPTQ, low-rank) run too; GPTQ needs ``forward_loop``."""
    from .weights import refine_weights, wants_refinement

    opts = recipe_low.options
    balances = {n: recipe_low.balance(n) for n in recipe_low.layers if recipe_low.balance(n) is not None}
    # the same layers as the low recipe: every layer it leaves unquantized stays so
    config_high = replace(config_high, overrides=[f"{n}={formats.UNQUANTIZED}" for n in opts.get("kept", [])])
    extra = {k: v for k, v in opts.items() if k not in ("precision", "overrides", "weight_granularity", "weight_search",
                                                        "act_search", "kept")}
    extra["balances_from"] = "low-precision recipe (mixed-precision sweep)"
    # fc2's Hadamard rotation (--rotate-fc2) is the low recipe's too: assemble on the rotated model
    rotations = {n: layer.input_rotation for n, layer in recipe_low.layers.items() if layer.input_rotation}
    recipe = assemble_recipe(rotated_model(model, rotations) if rotations else model, stats, config_high,
                             recipe_low.method, balances, extra,
                             weight_search=opts.get("weight_search"), act_search=opts.get("act_search"),
                             info={"matched_to": {"precision": recipe_low.precision}})
    if rotations:
        attach_rotations(recipe, model, rotations, config_high)
    if wants_refinement(config_high):
        if config_high.gptq and forward_loop is None:
            raise ValueError("GPTQ needs the calibration data: pass forward_loop=")
        refine_weights(model, recipe, forward_loop, config_high)
    return recipe


def check_matched(recipe_low: Recipe, recipe_high: Recipe) -> None:
    """Refuse two recipes that do not fold the same model (see the module docstring)."""
    if recipe_low.model_fingerprint != recipe_high.model_fingerprint:
        raise RecipeError("the two recipes were calibrated for different checkpoints")
    if set(recipe_low.layers) != set(recipe_high.layers):
        raise RecipeError("the two recipes quantize different layers")
    for name, lo in recipe_low.layers.items():
        hi = recipe_high.layers[name]
        b_lo, b_hi = recipe_low.balance(name), recipe_high.balance(name)
        same = lo.balance_fold == hi.balance_fold and (
            (b_lo is None and b_hi is None) or (b_lo is not None and b_hi is not None and torch.equal(b_lo, b_hi)))
        if not same:
            raise RecipeError(f"{name}: the two recipes balance this layer differently, so raising one layer would "
                              f"change the folds of others; build the high recipe with matched_high_recipe")


def mixed_recipe(recipe_low: Recipe, recipe_high: Recipe, raised: list[str]) -> Recipe:
    """``recipe_low`` with the ``raised`` layers taken from ``recipe_high`` (matched recipes)."""
    check_matched(recipe_low, recipe_high)
    unknown = sorted(set(raised) - set(recipe_low.layers))
    if unknown:
        raise ValueError(f"raised layers not in the recipe: {unknown}")
    out = copy.deepcopy(recipe_low)
    for name in raised:
        layer = copy.deepcopy(recipe_high.layers[name])
        out.layers[name] = layer
        for attr in ("weight_scale", "weight", "lowrank_up", "lowrank_down"):  # every tensor of the layer
            key = getattr(layer, attr)
            if key is not None:
                out.tensors[key] = recipe_high.tensors[key].clone()
    hi = recipe_high.layers[raised[0]] if raised else None
    if hi is not None:
        p = precision_of(hi.weight_format, hi.act_format)
        out.options["overrides"] = [f"{n}={p}" for n in raised]
    out.validate()
    return out


# -- metrics -----------------------------------------------------------------------------------------
def timestep_groups(data: CalibrationSet, groups: int) -> list[tuple[str, torch.Tensor]]:
    """``groups`` equal parts of the trajectory (0 = noisiest), as (label, row mask); empty ones dropped."""
    out = []
    for k in range(groups):
        lo, hi = k * data.steps / groups, (k + 1) * data.steps / groups
        mask = (data.step >= lo) & (data.step < hi)
        if mask.any():
            out.append((f"steps {math.ceil(lo)}-{math.ceil(hi) - 1}", mask))
    return out


def output_metrics(ref: torch.Tensor, out: torch.Tensor, groups: list[tuple[str, torch.Tensor]]) -> dict:
    """Noise SQNR (dB) and mean per-row cosine of the model output against FP, per timestep group,
    their means over the groups, and the SQNR over all rows."""
    ref, out = ref.double().flatten(1), out.double().flatten(1)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=1)
    sqnr = [quant.sqnr_db(ref[m], out[m]) for _, m in groups]
    cosine = [float(cos[m].mean()) for _, m in groups]
    return {"sqnr_db": sqnr, "cosine": cosine, "sqnr_mean_db": sum(sqnr) / len(sqnr),
            "cosine_mean": sum(cosine) / len(cosine), "sqnr_all_db": quant.sqnr_db(ref, out)}


# -- the sweep ---------------------------------------------------------------------------------------
@dataclass
class Sensitivity:
    """The sweep's result: per unit the layers it raises, their weight parameters, the metrics of
    the model with that unit raised, and the gains over the all-low model."""

    high_precision: str
    unit: str
    groups: list[str]
    low: dict  # metrics of the all-low model
    high: dict  # metrics of the all-high model
    units: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_params(self) -> int:
        return sum(u["params"] for u in self.units.values())

    def ranking(self) -> list[str]:
        return sorted(self.units, key=lambda u: self.units[u]["gain_db"], reverse=True)

    def to_json(self) -> dict:
        return {"high_precision": self.high_precision, "unit": self.unit, "timestep_groups": self.groups,
                "low": self.low, "high": self.high, "seconds": round(self.seconds, 2),
                "ranking": self.ranking(), "units": self.units}


def sweep_units(recipe: Recipe, unit: Unit) -> dict[str, list[str]]:
    """Unit name -> the recipe layers it raises (a layer itself, or a block's quantized layers)."""
    if unit == "layer":
        return {n: [n] for n in recipe.layers}
    if unit == "block":
        blocks: dict[str, list[str]] = {}
        for n in recipe.layers:
            blocks.setdefault(_block_prefix(n), []).append(n)
        return blocks
    raise ValueError(f"unit must be 'layer' or 'block', got {unit!r}")


def _block_prefix(name: str) -> str:
    """The block a layer belongs to: its name up to the first numeric part (``blocks.3`` of DiT's
    ``blocks.3.mlp.fc2``, ``transformer.transformer_blocks.3`` of PixArt's ``...3.ff.net.2``)."""
    parts = name.split(".")
    i = next((k for k, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
    return ".".join(parts[:i + 1])


@torch.no_grad()
def layer_sensitivity(model: nn.Module, recipe_low: Recipe, recipe_high: Recipe, held_out: CalibrationSet, *,
                      unit: Unit = "layer", groups: int = 4, batch_size: int = 256, device: str = "cpu",
                      progress: bool = False) -> Sensitivity:
    """Gain of raising each unit of the all-low simulation to ``recipe_high``'s format, measured on
    the noise channels of ``held_out`` (rows from across the trajectory) against the FP model."""
    check_matched(recipe_low, recipe_high)
    t0 = time.perf_counter()
    c = held_out.x.shape[1]
    tgroups = timestep_groups(held_out, groups)
    ref = predict(model.to(device), held_out, batch_size, device)[:, :c]
    sim_low = apply_recipe(model, recipe_low).to(device)
    sim_high = apply_recipe(model, recipe_high).to(device)

    def metrics(m: nn.Module) -> dict:
        return output_metrics(ref, predict(m, held_out, batch_size, device)[:, :c], tgroups)

    low, high = metrics(sim_low), metrics(sim_high)
    high_layer = next(iter(recipe_high.layers.values()))
    sens = Sensitivity(precision_of(high_layer.weight_format, high_layer.act_format), unit,
                       [label for label, _ in tgroups], low, high)
    units = sweep_units(recipe_low, unit)
    items = units.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="sensitivity sweep", leave=False)
    for uname, names in items:
        saved = []
        for n in names:  # swap in the high QuantLinear (same folded weight: check_matched)
            parent, attr = _parent(sim_low, n)
            saved.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, sim_high.get_submodule(n))
        try:
            m = metrics(sim_low)
        finally:
            for parent, attr, mod in saved:
                setattr(parent, attr, mod)
        params = sum(sim_low.get_submodule(n).weight.numel() for n in names)
        sens.units[uname] = {"layers": names, "params": params, **m,
                             "gain_db": m["sqnr_mean_db"] - low["sqnr_mean_db"],
                             "gain_db_per_group": [a - b for a, b in zip(m["sqnr_db"], low["sqnr_db"])],
                             "gain_cosine": m["cosine_mean"] - low["cosine_mean"]}
    sens.seconds = time.perf_counter() - t0
    return sens


def pick_units(sens: Sensitivity, budget: float, budget_unit: BudgetUnit = "fraction") -> list[str]:
    """Greedy: units by gain per cost (cost = weight parameters, or 1 per layer), best first, each
    taken if it still fits the budget; units that gain nothing are never taken.

    ``fraction``: at most ``budget`` of the quantized weights' parameters get the high precision;
    ``layers``: at most ``budget`` layers (a block unit costs its layer count)."""
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget}")
    if budget_unit == "fraction":
        if budget > 1:
            raise ValueError(f"a fraction budget is in [0, 1], got {budget}")
        limit, cost = budget * sens.total_params, (lambda u: sens.units[u]["params"])
    elif budget_unit == "layers":
        if budget != int(budget):
            raise ValueError(f"a layer budget is a whole number, got {budget}")
        limit, cost = budget, (lambda u: len(sens.units[u]["layers"]))
    else:
        raise ValueError(f"budget unit must be 'fraction' or 'layers', got {budget_unit!r}")
    order = sorted((u for u in sens.units if sens.units[u]["gain_db"] > 0),
                   key=lambda u: sens.units[u]["gain_db"] / cost(u), reverse=True)
    picked, spent = [], 0
    for u in order:
        if spent + cost(u) <= limit:
            picked.append(u)
            spent += cost(u)
    return picked


def pick_overrides(sens: Sensitivity, budget: float, budget_unit: BudgetUnit = "fraction") -> list[str]:
    """The greedy pick as ``CalibConfig.overrides`` strings, one per raised layer (``NAME=PRECISION``,
    exact names: a block pattern would also raise layers the low recipe keeps unquantized)."""
    return [f"{n}={sens.high_precision}" for u in pick_units(sens, budget, budget_unit) for n in sens.units[u]["layers"]]


def overrides_layers(overrides: list[str]) -> list[str]:
    """The layer names of ``NAME=PRECISION`` strings (``pick_overrides``' output)."""
    return [o.split("=", 1)[0] for o in overrides]


# -- one call: calibrate, sweep, pick, merge --------------------------------------------------------
@dataclass
class MixedConfig:
    """The sweep and the pick (``dtq-sensitivity``'s options beside CalibConfig's)."""

    high_precision: PrecisionName = field(default="int8", metadata={"help": "precision the picked layers get"})
    budget: float = field(default=0.1, metadata={"help": "fraction of the quantized weight parameters (budget-unit "
                                                         "fraction) or number of layers (layers) raised"})
    budget_unit: BudgetUnit = field(default="fraction", metadata={"help": "fraction of parameters, or layers"})
    unit: Unit = field(default="layer", metadata={"help": "sweep unit: one layer, or all quantized layers of a block"})
    groups: int = field(default=4, metadata={"help": "timestep groups the metrics are reported for"})

    def __post_init__(self) -> None:
        if self.high_precision not in formats.QUANTIZED_PRECISIONS:
            raise ValueError(f"unknown precision {self.high_precision!r}; known: {', '.join(formats.QUANTIZED_PRECISIONS)}")
        if self.groups < 1:
            raise ValueError("groups must be >= 1")
        pick_units(Sensitivity("", "", [], {}, {}), self.budget, self.budget_unit)  # validates the budget


def mixed_calibrate(model: nn.Module, data: CalibrationSet, held_out: CalibrationSet, config: CalibConfig,
                    mixed: MixedConfig = MixedConfig()) -> tuple[Recipe, Sensitivity, list[str]]:
    """Calibrate ``config`` (the low precision) and its matched ``mixed.high_precision`` recipe on one
    set of statistics, sweep, pick under the budget: (mixed recipe, sweep, overrides)."""
    from .api import calibrate, statistics
    from .recon import reconstruct_blocks

    stats = statistics(model, data, config)
    loop = data.forward_loop(config.batch_size, config.device, config.progress)
    # Reconstruction fits each block's rounding to its neighbours' formats, so it runs once, on the
    # final mix; the sweep ranks the unreconstructed layers (and costs no reconstruction per recipe).
    sweep_config = replace(config, reconstruct=False)
    low = calibrate(model, stats, sweep_config, forward_loop=loop)
    high = matched_high_recipe(model, stats, low, config_for_precision(sweep_config, mixed.high_precision), loop)
    sens = layer_sensitivity(model, low, high, held_out, unit=mixed.unit, groups=mixed.groups,
                             batch_size=config.batch_size, device=config.device, progress=config.progress)
    overrides = pick_overrides(sens, mixed.budget, mixed.budget_unit)
    recipe = mixed_recipe(low, high, overrides_layers(overrides))
    if config.reconstruct:
        reconstruct_blocks(model, recipe, loop, config)
    recipe.info["sensitivity"] = {"budget": mixed.budget, "budget_unit": mixed.budget_unit, "unit": mixed.unit,
                                  "sweep_seconds": round(sens.seconds, 2),
                                  "low_sqnr_mean_db": round(sens.low["sqnr_mean_db"], 3),
                                  "high_sqnr_mean_db": round(sens.high["sqnr_mean_db"], 3)}
    return recipe, sens, overrides
