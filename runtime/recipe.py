"""The recipe: the one contract between calibrate/ (which writes it) and export/ and the runtime
(which apply it). A directory holding ``recipe.json`` and ``tensors.safetensors``.

recipe.json::

    {"schema": "dtq.recipe", "schema_version": 1, "method": "ptq4dit", "precision": "int8", "options": {...},
     "model": {"fingerprint": "sha256:...", "config": {...DiTConfig...}},
     "tensors_sha256": "...",  # of tensors.safetensors: load refuses a recipe.json beside foreign tensors
     "layers": {"blocks.0.attn.qkv": {"weight_format": "int8", "weight_granularity": "channel",
                "weight_group_size": null, "act_format": "int8", "act_scale": 0.0123,
                "weight_scale": "blocks.0.attn.qkv.weight_scale",
                "balance": "blocks.0.attn.qkv.balance", "balance_fold": "adaLN"}, ...}}

Conventions (export relies on them):
- ``precision`` is the recipe's default precision (a name of ``dtq.formats.PRECISIONS``); each layer's
  formats name its own precision (``Recipe.layer_precisions``), so a recipe with per-layer overrides
  is mixed. Recipes written before the field existed get the precision most of their layers have.
- Layer names are module names of the DiT (``blocks.N.attn.qkv``); tensors are referenced by key.
- ``balance`` is b (``[C_in]``): the layer sees ``X / b`` and uses ``W diag(b)``; it folds into the
  adaLN rows (qkv, fc1), the V rows of qkv (proj), or a run-time ``Mul`` by ``1 / b`` ("runtime").
- ``weight_scale`` is the scale of the *balanced* weight ``W diag(b)``; ``act_scale`` the per-tensor
  scale of the *balanced* input ``X / b``; a layer with ``act_granularity`` "token" has none: its input
  scale is ``amax(|X / b| over channels) / qmax`` per token, computed at run time (ViDiT-Q).
- ``weight`` (optional, ``[C_out, C_in]``) replaces ``W diag(b)`` as the weight the layer's quantizer
  sees (GPTQ's dequantized weight, or ``W diag(b) - L R`` with a low-rank branch); ``weight_scale``
  is its scale, and ``quant.quantize_weight(weight, weight_scale)`` gives the codes.
- ``lowrank_up`` L ``[C_out, r]`` and ``lowrank_down`` R ``[r, C_in]`` (optional, together): an FP16
  side branch ``Y = fq(X') fq(weight)^T + bias + (X' R^T) L^T``, where ``X'`` is the balanced,
  *unquantized* input (after a run-time balancing ``Mul``, before the activation quantizer).
- ``input_rotation`` (optional int ``k``, a power of two dividing ``C_in``): the layer's input is first
  rotated by the block-diagonal normalized Hadamard ``B`` (``runtime.rotation``), then balanced:
  the layer sees ``(B x) / b`` and uses ``W B^T diag(b)``; ``balance``, ``weight_scale``,
  ``act_scale``, ``weight`` and the low-rank branch all refer to the rotated layer. Only with a
  run-time balance fold (or none): an adaLN / V fold would divide the input before the rotation.
- ``balanced_model(model, recipe)`` gives the folded FP model, ``apply_recipe(model, recipe)`` the
  simulated model (the folded model with ``QuantLinear`` layers): the numerical reference for ONNX.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import artifacts, formats
from ..staging import staged_directory
from . import quant
from .qlinear import QuantLinear
from .rotation import rotate

SCHEMA = artifacts.RECIPE_SCHEMA
RECIPE_JSON, TENSORS_FILE = artifacts.RECIPE_JSON, artifacts.RECIPE_TENSORS
SCHEMA_VERSION = 1
FOLDS = formats.FOLDS
layer_role = formats.layer_role


class RecipeError(ValueError):
    """A recipe that is malformed, of an unknown schema, or not made for the given model."""


@dataclass
class LayerRecipe:
    """How one Linear is quantized. Tensors are referenced by key into ``Recipe.tensors``."""

    weight_format: str = "int8"  # int8 | int4 | fp8_e4m3 | none
    weight_granularity: str = "channel"  # tensor | channel | group
    weight_group_size: int | None = None  # block size along C_in for "group" (32/64/128)
    act_format: str = "int8"  # int8 | fp8_e4m3 | none
    act_scale: float | None = None  # static per-tensor scale; None with act_granularity "token"
    weight_scale: str | None = None
    balance: str | None = None
    balance_fold: str | None = None  # adaLN | v | runtime
    weight: str | None = None  # the quantization-ready balanced weight (GPTQ / low-rank residual)
    lowrank_up: str | None = None  # L [C_out, r] of the FP16 branch (X' R^T) L^T
    lowrank_down: str | None = None  # R [r, C_in]
    input_rotation: int | None = None  # Hadamard block of the online input rotation (before balancing)
    act_granularity: str = "tensor"  # tensor: static act_scale | token: per-token amax/qmax at run time

    def validate(self, name: str) -> None:
        try:
            precision = self.precision
        except ValueError as exc:
            raise RecipeError(f"{name}: {exc}") from None
        if self.weight_granularity not in quant.GRANULARITIES:
            raise RecipeError(f"{name}: unknown weight granularity {self.weight_granularity!r}")
        if self.weight_granularity == "group" and not self.weight_group_size:
            raise RecipeError(f"{name}: granularity 'group' needs weight_group_size")
        if formats.get_precision(precision).quantized:
            gran = formats.granularity_name(self.weight_granularity, self.weight_group_size)
            try:
                formats.check_granularity(precision, gran)
            except ValueError as exc:
                raise RecipeError(f"{name}: {exc}") from None
        try:
            formats.check_act_granularity(precision, self.act_granularity)
        except ValueError as exc:
            raise RecipeError(f"{name}: {exc}") from None
        if self.act_granularity == "token":
            if self.act_scale is not None:
                raise RecipeError(f"{name}: a per-token (dynamic) activation has no static act_scale")
        elif self.act_format != "none" and (self.act_scale is None or not 0 < self.act_scale < float("inf")):
            raise RecipeError(f"{name}: quantized activation needs a positive act_scale, got {self.act_scale}")
        if (self.balance is None) != (self.balance_fold is None):
            raise RecipeError(f"{name}: balance and balance_fold go together")
        if (self.lowrank_up is None) != (self.lowrank_down is None):
            raise RecipeError(f"{name}: lowrank_up and lowrank_down go together")
        if self.balance_fold is not None:
            role = layer_role(name)
            allowed = formats.ROLE_FOLDS.get(role, ("runtime",))
            if self.balance_fold not in allowed:
                raise RecipeError(f"{name}: balancing of a {role or 'this'} layer folds into {allowed}, "
                                  f"not {self.balance_fold!r}")
        if self.input_rotation is not None:
            k = self.input_rotation
            if not isinstance(k, int) or k < 2 or k & (k - 1):
                raise RecipeError(f"{name}: input_rotation must be a power of two >= 2, got {k!r}")
            if self.balance_fold not in (None, "runtime"):
                raise RecipeError(f"{name}: an input rotation composes only with a run-time balance fold "
                                  f"(the {self.balance_fold!r} fold divides the input before the rotation)")

    @property
    def precision(self) -> str:
        """This layer's precision name (``fp16``: not quantized); ValueError for a pair no precision has."""
        return formats.precision_of(self.weight_format, self.act_format)


@dataclass
class Recipe:
    method: str
    model_fingerprint: str
    layers: dict[str, LayerRecipe] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # free-form facts (timings, measured SQNR, ...)
    schema_version: int = SCHEMA_VERSION
    precision: str = ""  # the default precision (dtq.formats); "" = the one most layers have (fp16: none)

    def __post_init__(self) -> None:
        if not self.precision:
            self.precision = self._majority_precision()

    def _majority_precision(self) -> str:
        counts: dict[str, int] = {}
        for layer in self.layers.values():
            try:
                p = layer.precision
            except ValueError:
                continue  # validate() reports it
            if p != formats.UNQUANTIZED:
                counts[p] = counts.get(p, 0) + 1
        return max(counts, key=counts.get) if counts else formats.UNQUANTIZED  # balancing only

    @property
    def layer_precisions(self) -> dict[str, str]:
        """Each recipe layer's precision name (``fp16`` for a layer the recipe leaves unquantized)."""
        return {name: layer.precision for name, layer in self.layers.items()}

    @property
    def mixed(self) -> bool:
        return any(p != self.precision for p in self.layer_precisions.values())

    # -- accessors export uses ------------------------------------------------------------------
    def weight_scale(self, name: str) -> torch.Tensor | None:
        key = self.layers[name].weight_scale
        return None if key is None else self.tensors[key]

    def balance(self, name: str) -> torch.Tensor | None:
        key = self.layers[name].balance
        return None if key is None else self.tensors[key]

    def weight(self, name: str) -> torch.Tensor | None:
        """The quantization-ready weight replacing ``W diag(b)``, if the recipe holds one."""
        key = self.layers[name].weight
        return None if key is None else self.tensors[key]

    def lowrank(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(L [C_out, r], R [r, C_in])`` of the layer's FP16 branch, if any."""
        layer = self.layers[name]
        return None if layer.lowrank_up is None else (self.tensors[layer.lowrank_up], self.tensors[layer.lowrank_down])

    def validate(self, model: nn.Module | None = None) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise RecipeError(f"recipe schema version {self.schema_version} is not supported "
                              f"(this dtq reads version {SCHEMA_VERSION})")
        allowed = (*formats.QUANTIZED_PRECISIONS, formats.UNQUANTIZED)  # fp16: a balancing-only recipe
        if self.precision not in allowed:
            raise RecipeError(f"recipe precision {self.precision!r} is not one of {', '.join(allowed)}")
        modules = dict(model.named_modules()) if model is not None else None
        for name, layer in self.layers.items():
            layer.validate(name)
            for attr in ("weight_scale", "balance", "weight", "lowrank_up", "lowrank_down"):
                key = getattr(layer, attr)
                if key is not None and key not in self.tensors:
                    raise RecipeError(f"{name}: {attr} refers to tensor {key!r}, absent from tensors.safetensors")
            if modules is None:
                continue
            mod = modules.get(name)
            if not isinstance(mod, nn.Linear):
                raise RecipeError(f"recipe layer {name!r} is not a Linear of this model")
            if layer.input_rotation and mod.in_features % layer.input_rotation:
                raise RecipeError(f"{name}: input_rotation {layer.input_rotation} does not divide "
                                  f"{mod.in_features} input channels")
            b = self.balance(name)
            if b is not None and tuple(b.shape) != (mod.in_features,):
                raise RecipeError(f"{name}: balance has shape {tuple(b.shape)}, expected ({mod.in_features},)")
            w = self.weight(name)
            if w is not None and tuple(w.shape) != tuple(mod.weight.shape):
                raise RecipeError(f"{name}: weight has shape {tuple(w.shape)}, expected {tuple(mod.weight.shape)}")
            lr = self.lowrank(name)
            if lr is not None:
                up, down = lr
                if (up.ndim != 2 or down.ndim != 2 or up.shape[0] != mod.out_features
                        or down.shape[1] != mod.in_features or up.shape[1] != down.shape[0]):
                    raise RecipeError(f"{name}: low-rank branch shapes {tuple(up.shape)} x {tuple(down.shape)} do "
                                      f"not make a [{mod.out_features}, {mod.in_features}] weight")
            s = self.weight_scale(name)
            if s is not None:
                expected = tuple(quant.weight_amax(mod.weight[:, :], layer.weight_granularity,
                                                   layer.weight_group_size).shape)
                if tuple(s.shape) != expected:
                    raise RecipeError(f"{name}: weight_scale has shape {tuple(s.shape)}, expected {expected}")

    # -- IO -------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "schema_version": self.schema_version,
            "method": self.method,
            "precision": self.precision,
            "options": self.options,
            "model": {"fingerprint": self.model_fingerprint, "config": self.model_config},
            "layers": {k: dataclasses.asdict(v) for k, v in self.layers.items()},
            "info": self.info,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the recipe directory whole or not at all: into a temporary sibling that replaces
        ``directory`` by rename (:func:`dtq.staging.staged_directory`), so an interrupted save
        leaves an existing recipe as it was. recipe.json records the sha256 of its tensors file."""
        with staged_directory(directory, marker=RECIPE_JSON) as tmp:
            self.write_files(tmp)
        return Path(directory)

    def write_files(self, directory: Path) -> None:
        """Write recipe.json and tensors.safetensors into an existing (staging) directory."""
        from safetensors.torch import save_file

        self.validate()
        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.tensors.items()},
                  str(directory / TENSORS_FILE))
        data = {**self.to_json(), "tensors_sha256": artifacts.file_sha256(directory / TENSORS_FILE)}
        (directory / RECIPE_JSON).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module | None = None) -> "Recipe":
        return load_recipe(directory, model)


def rescaled_output_layers(recipe: Recipe) -> list[str]:
    """Layers whose output rows a fold rescales per channel: qkv, when proj's balance folds into
    its V rows (the next layer undoes the gain, so only comparisons of that output see it)."""
    return [name.removesuffix("attn.proj") + "attn.qkv" for name, layer in recipe.layers.items()
            if layer.balance_fold == "v"]


def load_recipe(directory: str | os.PathLike, model: nn.Module | None = None) -> Recipe:
    """Read a recipe directory; with ``model``, refuse a recipe made for another checkpoint."""
    directory = Path(directory)
    jpath, tpath = directory / RECIPE_JSON, directory / TENSORS_FILE
    if not jpath.is_file():
        raise RecipeError(f"{directory}: not a recipe directory (no {RECIPE_JSON})")
    try:
        data = json.loads(jpath.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{jpath}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise RecipeError(f"{jpath}: not a dtq recipe (schema {data.get('schema') if isinstance(data, dict) else None!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise RecipeError(f"{jpath}: recipe schema version {data.get('schema_version')} is not supported "
                          f"(this dtq reads version {SCHEMA_VERSION}); re-run dtq-calibrate")
    tensors = _load_tensors(jpath, tpath, data.get("tensors_sha256"))
    known = {f.name for f in dataclasses.fields(LayerRecipe)}
    layers = {}
    for name, spec in data.get("layers", {}).items():
        unknown = set(spec) - known
        if unknown:
            raise RecipeError(f"{jpath}: layer {name!r} has unknown fields {sorted(unknown)}")
        layers[name] = LayerRecipe(**spec)
    recipe = Recipe(method=data["method"], model_fingerprint=data["model"]["fingerprint"], layers=layers,
                    tensors=tensors, options=data.get("options", {}), model_config=data["model"].get("config", {}),
                    info=data.get("info", {}), schema_version=data["schema_version"],
                    precision=data.get("precision", ""))
    if model is not None:
        check_recipe_matches(recipe, model, source=str(directory))
    recipe.validate(model)
    return recipe


def _load_tensors(jpath: Path, tpath: Path, recorded: str | None) -> dict[str, torch.Tensor]:
    """tensors.safetensors, refused unless it is the file recipe.json was written with."""
    if not recorded:
        raise RecipeError(f"{jpath}: no tensors_sha256 (written by an older dtq, or edited); re-run dtq-calibrate")
    if not tpath.is_file():
        raise RecipeError(f"{tpath.parent}: recipe.json without its {TENSORS_FILE}; re-run dtq-calibrate")
    actual = artifacts.file_sha256(tpath)
    if actual != recorded:
        raise RecipeError(f"{tpath} does not belong to {jpath.name} (sha256 {actual[:12]}..., recipe.json records "
                          f"{str(recorded)[:12]}...): a mixed or damaged recipe; re-run dtq-calibrate")
    from safetensors.torch import load_file

    try:
        return load_file(str(tpath))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise RecipeError(f"{tpath}: not a readable safetensors file ({exc})") from exc


# -- the model a recipe belongs to ----------------------------------------------------------------
def model_fingerprint(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and float32 values of all tensors of the (unquantized) model.

    Float32 values make an fp16 checkpoint loaded as fp16 or fp32 hash the same."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def check_recipe_matches(recipe: Recipe, model: nn.Module, source: str = "recipe") -> None:
    fp = model_fingerprint(model)
    if fp != recipe.model_fingerprint:
        cfg = getattr(model, "config", None)
        mine = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
        diff = {k: (recipe.model_config.get(k), v) for k, v in mine.items()
                if k in recipe.model_config and recipe.model_config[k] != v}
        what = f" (config differs: {diff})" if diff else " (same architecture, different weights)"
        raise RecipeError(f"{source} was calibrated for a different checkpoint{what}: "
                          f"recipe fingerprint {recipe.model_fingerprint[:23]}..., model {fp[:23]}...; "
                          f"calibrate this checkpoint with dtq-calibrate")


# -- folding and simulation ------------------------------------------------------------------------
def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _block_of(model: nn.Module, name: str) -> nn.Module:
    parts = name.split(".")
    return model.get_submodule(".".join(parts[:2]))


@torch.no_grad()
def fold_balance(model: nn.Module, name: str, b: torch.Tensor, where: str) -> None:
    """Divide layer ``name``'s input by ``b`` and scale its weight columns by ``b`` (in place).

    adaLN: modulate(x) = x (1 + scale) + shift, so the shift rows are divided by b and the scale
    rows and bias become ``W/b`` and ``(bias + 1)/b - 1``. v: proj's input is attention-weighted V,
    so dividing V's rows (weight and bias) by b divides it. runtime: a ``Mul`` by 1/b stays."""
    layer = model.get_submodule(name)
    b = b.to(layer.weight.device, torch.float32)
    role = layer_role(name)
    if where == "adaLN":
        if role not in ("attn.qkv", "mlp.fc1"):
            raise RecipeError(f"{name}: adaLN folding applies to attn.qkv and mlp.fc1 only")
        ada = _block_of(model, name).adaLN_modulation[-1]
        c = layer.in_features
        shift_chunk, scale_chunk = (0, 1) if role == "attn.qkv" else (3, 4)
        w, bias = ada.weight, ada.bias
        rows_shift = slice(shift_chunk * c, (shift_chunk + 1) * c)
        rows_scale = slice(scale_chunk * c, (scale_chunk + 1) * c)
        w[rows_shift] = (w[rows_shift].float() / b[:, None]).to(w.dtype)
        bias[rows_shift] = (bias[rows_shift].float() / b).to(bias.dtype)
        w[rows_scale] = (w[rows_scale].float() / b[:, None]).to(w.dtype)
        bias[rows_scale] = ((bias[rows_scale].float() + 1) / b - 1).to(bias.dtype)
    elif where == "v":
        if role != "attn.proj":
            raise RecipeError(f"{name}: V folding applies to attn.proj only")
        qkv = _block_of(model, name).attn.qkv
        c = layer.in_features
        rows_v = slice(2 * c, 3 * c)
        qkv.weight[rows_v] = (qkv.weight[rows_v].float() / b[:, None]).to(qkv.weight.dtype)
        qkv.bias[rows_v] = (qkv.bias[rows_v].float() / b).to(qkv.bias.dtype)
    elif where == "runtime":
        if not isinstance(layer, QuantLinear):
            parent, attr = _parent(model, name)
            layer = QuantLinear.from_linear(layer)
            setattr(parent, attr, layer)
        prev = layer.input_mul if layer.input_mul is not None else torch.ones_like(b)
        layer.input_mul = prev * (1.0 / b)
    else:
        raise RecipeError(f"unknown balance fold {where!r}; known: {', '.join(FOLDS)}")
    layer.weight.copy_((layer.weight.float() * b[None, :]).to(layer.weight.dtype))


@torch.no_grad()
def fold_rotation(model: nn.Module, name: str, k: int) -> None:
    """Rotate layer ``name``'s input online by the block Hadamard of block ``k`` and fold ``B^T``
    into its weight columns (in place): the layer becomes a ``QuantLinear`` with ``input_rotation``.
    Before any balancing of the layer (``fold_balance`` then scales the rotated columns)."""
    layer = model.get_submodule(name)
    if isinstance(layer, QuantLinear) and (layer.input_rotation or layer.input_mul is not None):
        raise RecipeError(f"{name}: already rotated or balanced; the rotation comes first")
    if not isinstance(layer, QuantLinear):
        parent, attr = _parent(model, name)
        layer = QuantLinear.from_linear(layer)
        setattr(parent, attr, layer)
    layer.weight.copy_(rotate(layer.weight.float(), k).to(layer.weight.dtype))
    layer.input_rotation = k


def balanced_model(model: nn.Module, recipe: Recipe, *, check: bool = True, inplace: bool = False) -> nn.Module:
    """The FP model with every input rotation and balancing vector of ``recipe`` folded (rotation:
    ``W B^T`` + the online rotation; balancing: adaLN / V rows / run-time Mul), per layer in that order.

    In full precision it computes what ``model`` computes (up to rounding): the graph export
    writes, and the base of ``apply_recipe``."""
    if check:
        check_recipe_matches(recipe, model)
        recipe.validate(model)
    out = model if inplace else copy.deepcopy(model)
    for name, layer in recipe.layers.items():
        if layer.input_rotation:
            fold_rotation(out, name, layer.input_rotation)
        b = recipe.balance(name)
        if b is not None:
            fold_balance(out, name, b, layer.balance_fold)
    return out


def apply_recipe(model: nn.Module, recipe: Recipe, *, check: bool = True, inplace: bool = False) -> nn.Module:
    """The simulated (fake-quant) model: ``balanced_model`` with each recipe layer a ``QuantLinear``
    carrying the recipe's weight and activation scales. A copy of ``model`` unless ``inplace``, which
    folds and swaps the layers of ``model`` itself (saves the copy for a large model) and returns it."""
    out = balanced_model(model, recipe, check=check, inplace=inplace)
    for name, layer in recipe.layers.items():
        parent, attr = _parent(out, name)
        lin = getattr(parent, attr)
        input_mul = lin.input_mul if isinstance(lin, QuantLinear) else None
        rotation = lin.input_rotation if isinstance(lin, QuantLinear) else None
        q = QuantLinear.from_linear(
            lin, weight_format=layer.weight_format, weight_granularity=layer.weight_granularity,
            weight_group_size=layer.weight_group_size, act_format=layer.act_format,
            act_granularity=layer.act_granularity,
            weight_scale=recipe.weight_scale(name), act_scale=layer.act_scale, input_mul=input_mul,
            weight=recipe.weight(name), lowrank=recipe.lowrank(name), input_rotation=rotation)
        setattr(parent, attr, q)
    return out.eval()


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The ``QuantLinear`` modules of a simulated model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
