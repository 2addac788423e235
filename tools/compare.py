"""dtq-compare: accuracy of a candidate denoiser (Q/DQ ONNX, TensorRT engine, quantized recipe)
against a reference (FP ONNX or PyTorch) on real inputs captured from the FP sampler.

Three parts, one output directory:
1. Step level: the same captured ``(x_t, t, y)`` (early/middle/late steps) through both, via
   polygraphy's ``Comparator.run`` (OnnxrtRunner / TrtRunner / our TorchRunner); per output and
   timestep max/mean abs error, cosine, SQNR; pass/fail against the given tolerances (and
   polygraphy's ``SnrCompareFunc`` at the same SQNR threshold as a cross-check).
2. Layerwise: the inputs and outputs of every quantized Linear marked as outputs in both; layers
   ranked by SQNR drop, measured as the SQNR of the noise each layer adds itself (output minus
   input noise-to-signal ratio, in power); a bar chart of per-layer output SQNR.
3. End to end: the same noise and labels through the full sampler with both; PSNR and SSIM per
   image (data range 255 on the uint8 images) and their means; a side-by-side grid.

Files in ``--out``: ``report.json``, ``report.md``, ``layer_sqnr.png``, ``e2e_grid.png``,
``e2e_samples.npz`` (reference and candidate uint8 images).
Exit codes: 0 pass, 1 a check failed, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .. import artifacts, formats
from ..checks import check_finite_fields, check_output_path
from ..extras import require
from ..onnx_file import open_onnx
from ..runtime.checkpoint import load_checkpoint
from ..runtime.denoiser import TorchDenoiser
from ..runtime.denoiser_spec import FORMS, DenoiserSpec, parse_denoiser_spec
from ..runtime.diffusion import GaussianDiffusion
from ..runtime.images import to_uint8
from ..runtime.model import DiT
from ..runtime.open import DTYPES, check_model_config, onnx_model_config, open_denoiser, open_module, open_recipe
from ..runtime.recipe import Recipe
from ..runtime.sampler import sample
from ..runtime.zoo import DEFAULT_MODEL, builtin_checkpoint
from ..staging import staged_directory
from . import metrics
from .capture import CapturedStep, capture_inputs, default_step_indices, step_indices_for_timesteps
from .cli import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, add_dataclass_arguments, dataclass_from_args, run_cli

def _meta(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class CompareConfig:
    candidate: str | None = field(default=None, metadata=_meta(
        "what to test, a denoiser spec: " + FORMS + "; torch without a dtype runs in --torch-dtype", metavar="SPEC"))
    reference: str = field(default="torch", metadata=_meta("the reference, same forms as --candidate", metavar="SPEC"))
    ckpt: Path | None = field(default=None, metadata=_meta(
        "DiT checkpoint (.safetensors/.pt); default: the built-in dit-tiny-fmnist"))
    out: Path = field(default=Path("compare-out"), metadata=_meta("output directory"))
    steps: int = field(default=50, metadata=_meta("respaced DDPM steps of the capturing / end-to-end sampler"))
    timesteps: list[int] | None = field(default=None, metadata=_meta(
        "original timesteps (0..999) to compare at, nearest respaced step (default: first, middle, last step)"))
    num_images: int = field(default=4, metadata=_meta("images per captured batch (guidance doubles the batch)"))
    cfg_scale: float = field(default=1.5, metadata=_meta("classifier-free guidance scale"))
    seed: int = field(default=0, metadata=_meta("seed of labels, noise and sampler noise"))
    torch_dtype: Literal["fp32", "fp16", "bf16"] = field(default="fp32", metadata=_meta(
        "dtype of 'torch' (without :dtype), sim and recipe endpoints"))
    device: str = field(default="cpu", metadata=_meta("device of PyTorch endpoints and the capturing sampler"))
    min_sqnr: float = field(default=20.0, metadata=_meta("fail below this SQNR (dB) at any timestep"))
    min_cosine: float | None = field(default=None, metadata=_meta("fail below this cosine similarity"))
    max_abs: float | None = field(default=None, metadata=_meta("fail above this max abs error"))
    layerwise: bool = field(default=True, metadata=_meta("rank quantized Linears by SQNR drop"))
    input_alignment: Literal["auto", "none", "channel"] = field(default="auto", metadata=_meta(
        "layer inputs rescaled per channel by balancing (SmoothQuant-style), and the outputs of layers whose rows "
        "absorb a balancing fold (qkv under proj's V fold), differ from the FP ones by a gain: 'channel' compares "
        "them after the best per-channel gain, 'none' as they are, 'auto' aligns what a recipe candidate rescales, "
        "and inputs whose raw SQNR is 3 dB below their output's; outputs only where the recipe (or dtq-export's "
        "metadata) says a fold rescales them"))
    top_k: int = field(default=5, metadata=_meta("layers to name as candidates for higher precision"))
    suggest_below: float = field(default=30.0, metadata=_meta(
        "name a layer for higher precision only if the noise it adds itself has an SQNR (dB) below this"))
    e2e: bool = field(default=True, metadata=_meta("end-to-end PSNR/SSIM of full sampling runs"))
    e2e_images: int = field(default=8, metadata=_meta("images of the end-to-end comparison"))
    min_psnr: float | None = field(default=None, metadata=_meta("fail when the mean end-to-end PSNR (dB) is below"))

    def __post_init__(self) -> None:
        check_finite_fields(self)
        if not self.candidate:
            raise ValueError(f"--candidate is required: {FORMS}")
        if self.steps < 1 or self.steps > 1000:
            raise ValueError(f"--steps must be in 1..1000, got {self.steps}")
        if self.num_images < 1 or self.e2e_images < 1:
            raise ValueError("--num-images and --e2e-images must be positive")
        self.out = Path(self.out)


# -- endpoints ---------------------------------------------------------------------------------------
@dataclass
class Endpoint:
    """A resolved --reference / --candidate: its parsed spec (``runtime.denoiser_spec``), the FP
    model it stands for, and for sim / recipe the (checked) recipe."""

    spec: str  # as the user wrote it
    parsed: DenoiserSpec
    model: DiT
    recipe: Recipe | None = None  # sim / recipe

    @property
    def kind(self) -> str:
        return self.parsed.kind

    @property
    def path(self) -> Path | None:
        return self.parsed.path

    @property
    def dtype(self) -> str | None:
        return self.parsed.dtype

    def balanced_layers(self) -> set[str]:
        """Layers whose input a recipe rescales per channel."""
        if self.recipe is None:
            return set()
        return {n for n, lr in self.recipe.layers.items() if lr.balance is not None}

    def rescaled_outputs(self) -> set[str]:
        """Layers whose output rows a fold rescales (qkv under proj's V fold)."""
        if self.kind == "onnx":  # dtq-export records them (metadata dtq.rescaled_outputs)
            meta = artifacts.read_onnx_metadata(self.path)
            return set(artifacts.metadata_json(meta, artifacts.META_RESCALED_OUTPUTS, []))
        if self.recipe is not None:
            from ..runtime.recipe import rescaled_output_layers

            return set(rescaled_output_layers(self.recipe))
        return set()

    def quantized_layers(self) -> list[str]:
        if self.recipe is not None:  # the recipe's layers, in model order (as apply_recipe replaces them)
            return [n for n, _ in self.model.named_modules() if n in self.recipe.layers]
        if self.kind == "onnx":
            from .runners import onnx_quantized_layers

            return onnx_quantized_layers(open_onnx(self.path))
        return []

    def torch_dtype(self, cfg: CompareConfig) -> torch.dtype:
        return DTYPES[self.dtype or cfg.torch_dtype]

    def _device(self, cfg: CompareConfig) -> str:
        # ONNX Runtime on its CPU provider, engines on the GPU; PyTorch endpoints on --device
        return cfg.device if self.parsed.is_module else "cpu" if self.kind == "onnx" else "cuda"

    def _base(self) -> DiT:
        return copy.deepcopy(self.model) if self.kind == "torch" else self.model  # sim/recipe copy it themselves

    def runner(self, cfg: CompareConfig, name: str, probe_layers: list[str] | None = None):
        from .runners import TorchRunner, onnx_runner, trt_runner  # polygraphy: the onnx extra

        if self.parsed.is_module:
            # the engine's fused epilogues (CUDA) skip fc1's / proj's / fc2's forward, and its LayerNorm +
            # quantize pass hands qkv / fc1 codes, not their input: keep the layers separate to hook them
            module = open_module(self.parsed, self._base(), device=cfg.device, dtype=self.torch_dtype(cfg),
                                 recipe=self.recipe,
                                 engine_options={"fuse_mlp": (), "fuse_residual": (), "fuse_norm": False}
                                 if probe_layers else None)
            return TorchRunner(module, device=cfg.device, dtype=self.torch_dtype(cfg), probe_layers=probe_layers,
                               name=name)
        if self.kind == "onnx":
            return onnx_runner(self.path, probe_layers=probe_layers, name=name)
        if probe_layers:
            raise ValueError("layerwise diagnosis of an engine needs its ONNX file: pass that as --candidate")
        return trt_runner(self.path, self.model, name=name)

    def denoiser(self, cfg: CompareConfig):
        # an engine is refused when built for another GPU / TensorRT (runtime.open)
        return open_denoiser(self.parsed, self._base(), device=self._device(cfg), dtype=self.torch_dtype(cfg))


def keep_overrides(layers: list[str]) -> str:
    """dtq-calibrate's ``--overrides`` value that leaves ``layers`` unquantized."""
    return ",".join(f"{n}={formats.UNQUANTIZED}" for n in layers)


def resolve_endpoint(spec: str, model: DiT) -> Endpoint:
    """``spec`` in the shared grammar (``runtime.denoiser_spec``: a bare recipe directory is the
    quantized engine, ``sim:DIR`` the simulation), checked against ``model``."""
    parsed = parse_denoiser_spec(spec)
    recipe = None
    if parsed.kind in ("sim", "recipe"):
        recipe = open_recipe(parsed, model)  # refuses a recipe of another checkpoint
    elif parsed.kind == "onnx":
        if not parsed.path.is_file():
            raise FileNotFoundError(f"{parsed.path}: no such ONNX file")
        # onnx_model_config refuses a truncated model or external data before the capture run
        check_model_config(str(parsed.path), onnx_model_config(parsed.path), model)
    elif parsed.kind == "trt":  # engine.json vs this TensorRT and GPU, before any sampling
        from ..runtime.backends import open_engine_dir

        meta, _ = open_engine_dir(parsed.path, "cuda")
        check_model_config(str(parsed.path), meta.onnx.get("metadata", {}).get("model_config"), model)
    return Endpoint(spec, parsed, model, recipe)


def load_model(cfg: CompareConfig) -> DiT:
    path = cfg.ckpt if cfg.ckpt is not None else builtin_checkpoint(DEFAULT_MODEL)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return load_checkpoint(path)


# -- the three comparisons -------------------------------------------------------------------------
def _inputs(cfg: CompareConfig, model: DiT, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    mc = model.config
    gen = torch.Generator().manual_seed(cfg.seed)
    labels = torch.arange(n) % mc.num_classes
    noise = torch.randn(n, mc.in_channels, mc.input_size, mc.input_size, generator=gen)
    return noise, labels


def capture(cfg: CompareConfig, model: DiT) -> list[CapturedStep]:
    diffusion = GaussianDiffusion.dit(cfg.steps)
    idx = (step_indices_for_timesteps(diffusion, cfg.timesteps) if cfg.timesteps
           else default_step_indices(cfg.steps))
    noise, labels = _inputs(cfg, model, cfg.num_images)
    cfg_scale = cfg.cfg_scale if model.config.null_class is not None else 1.0
    return capture_inputs(TorchDenoiser(model, cfg.device), diffusion, noise.to(cfg.device), labels.to(cfg.device),
                          idx, cfg_scale=cfg_scale, null_class=model.config.null_class, seed=cfg.seed,
                          clip_denoised=model.config.space == "pixel")


def _run(runners, feeds):
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        return Comparator.run(runners, data_loader=feeds)


def step_comparison(cfg: CompareConfig, ref: Endpoint, cand: Endpoint, steps: list[CapturedStep]) -> dict:
    from polygraphy.comparator import Comparator, CosineSimilarityCompareFunc, SnrCompareFunc
    from polygraphy.logger import G_LOGGER

    runners = [ref.runner(cfg, "reference"), cand.runner(cfg, "candidate")]
    results = _run(runners, [s.feed() for s in steps])
    (_, ref_iters), (_, cand_iters) = list(results.items())
    rows = []
    for step, r_it, c_it in zip(steps, ref_iters, cand_iters):
        for name in r_it.keys():
            m = metrics.tensor_report(r_it[name], c_it[name])
            fails = []
            if not m["sqnr_db"] >= cfg.min_sqnr:
                fails.append(f"sqnr {m['sqnr_db']:.2f} < {cfg.min_sqnr}")
            if cfg.min_cosine is not None and not m["cosine"] >= cfg.min_cosine:
                fails.append(f"cosine {m['cosine']:.6f} < {cfg.min_cosine}")
            if cfg.max_abs is not None and not m["max_abs"] <= cfg.max_abs:
                fails.append(f"max_abs {m['max_abs']:.4g} > {cfg.max_abs}")
            if not np.isfinite(np.asarray(c_it[name])).all():
                fails.append("non-finite values")
            rows.append({"output": name, "step_index": step.index, "timestep": step.timestep, **m,
                         "passed": not fails, "failures": fails})
    funcs = [SnrCompareFunc(snr_threshold=cfg.min_sqnr)]
    if cfg.min_cosine is not None:
        funcs.append(CosineSimilarityCompareFunc(cosine_similarity_threshold=cfg.min_cosine))
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        poly = Comparator.compare_accuracy(results, compare_func=funcs)
    return {"rows": rows, "passed": all(r["passed"] for r in rows), "polygraphy_passed": bool(poly),
            "runners": {"reference": type(runners[0]).__name__, "candidate": type(runners[1]).__name__}}


def _aligned_sqnr(ref: np.ndarray, cand: np.ndarray) -> float:
    """SQNR after the least-squares gain per channel (last axis): balancing (SmoothQuant-style)
    legitimately rescales a Linear's input per channel, so only the remaining noise counts."""
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    c = cand.reshape(-1, cand.shape[-1]).astype(np.float64)
    den = (c * c).sum(0)
    gain = np.where(den > 0, (r * c).sum(0) / np.where(den > 0, den, 1), 1.0)
    return metrics.sqnr_db(r, c * gain)


def layerwise_comparison(cfg: CompareConfig, ref: Endpoint, cand: Endpoint, steps: list[CapturedStep],
                         all_layers: list[str]) -> dict:
    from .runners import probe_key

    layers = cand.quantized_layers() or ref.quantized_layers() or all_layers
    runners = [ref.runner(cfg, "reference", probe_layers=layers), cand.runner(cfg, "candidate", probe_layers=layers)]
    results = _run(runners, [s.feed() for s in steps])
    (_, ref_iters), (_, cand_iters) = list(results.items())
    channel = cfg.input_alignment == "channel"
    align = ({*layers} if channel else set() if cfg.input_alignment == "none"
             else ref.balanced_layers() | cand.balanced_layers())
    align_out = ({*layers} if channel else set() if cfg.input_alignment == "none"
                 else ref.rescaled_outputs() | cand.rescaled_outputs())
    per_layer = []
    for order, layer in enumerate(layers):
        # a balancing vector folded into a layer's rows (proj's into qkv's V rows) rescales its
        # output per channel and the next layer's weights undo it. Only known folds are aligned:
        # a gain heuristic would also hide a wrong weight scale (which is a per-channel gain too)
        out_aligned = layer in align_out
        s_raw, s_aligned, s_out, s_out_aligned = [], [], [], []
        for r_it, c_it in zip(ref_iters, cand_iters):
            r_in, c_in = np.asarray(r_it[probe_key(layer, "in")]), np.asarray(c_it[probe_key(layer, "in")])
            r_out, c_out = np.asarray(r_it[probe_key(layer, "out")]), np.asarray(c_it[probe_key(layer, "out")])
            s_raw.append(metrics.sqnr_db(r_in, c_in))
            s_aligned.append(_aligned_sqnr(r_in, c_in))
            s_out.append(metrics.sqnr_db(r_out, c_out))
            if out_aligned:
                s_out_aligned.append(_aligned_sqnr(r_out, c_out))
        sout = _mean_db(s_out_aligned if out_aligned else s_out)
        # auto: an input that looks 3 dB worse than the output it produces differs by a gain the
        # layer's weights undo (balancing folded upstream); propagated noise seldom shrinks that much
        aligned = layer in align or (cfg.input_alignment == "auto" and _mean_db(s_raw) < sout - 3.0)
        sin = _mean_db(s_aligned if aligned else s_raw)
        drop = (sin - sout) if math.isfinite(sin) else (math.inf if math.isfinite(sout) else 0.0)
        per_layer.append({"layer": layer, "order": order, "in_sqnr_db": sin, "out_sqnr_db": sout, "sqnr_drop_db": drop,
                          "added_sqnr_db": added_noise_sqnr(sin, sout), "input_aligned": aligned,
                          "output_aligned": out_aligned, "in_sqnr_db_raw": _mean_db(s_raw),
                          "out_sqnr_db_raw": _mean_db(s_out),
                          "out_sqnr_db_per_step": s_out_aligned if out_aligned else s_out})
    ranked = sorted(per_layer, key=lambda d: (d["added_sqnr_db"], d["out_sqnr_db"]))
    return {"layers": per_layer, "ranking": [d["layer"] for d in ranked],
            "keep_in_higher_precision": [d["layer"] for d in ranked if d["added_sqnr_db"] < cfg.suggest_below][:cfg.top_k]}


def added_noise_sqnr(in_db: float, out_db: float) -> float:
    """SQNR (dB) of the noise a layer adds itself: its output noise-to-signal ratio minus the
    input's, in the power domain (noises from independent sources add in power). This is the SQNR
    drop made independent of how clean the input already was: the first quantized layer drops from
    ~130 dB (FP rounding) to ~45 dB without being worse than a later layer going from 40 to 38 dB.
    +inf when the layer adds no noise (output as clean as its input, or cleaner)."""
    if not math.isfinite(out_db):
        return math.inf
    added = 10 ** (-out_db / 10) - (10 ** (-in_db / 10) if math.isfinite(in_db) else 0.0)
    return math.inf if added <= 0 else -10 * math.log10(added)


def _mean_db(values: list[float]) -> float:
    """Mean in dB of finite values; +inf if all are +inf."""
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        return float(np.mean(finite))
    return values[0] if values else math.nan


def e2e_comparison(cfg: CompareConfig, model: DiT, ref: Endpoint, cand: Endpoint) -> tuple[dict, np.ndarray, np.ndarray]:
    diffusion = GaussianDiffusion.dit(cfg.steps)
    noise, labels = _inputs(cfg, model, cfg.e2e_images)
    mc = model.config
    guided = mc.null_class is not None and cfg.cfg_scale != 1.0
    images = []
    for ep in (ref, cand):
        x = sample(ep.denoiser(cfg), diffusion, noise.clone(), labels, sampler="ddpm",
                   cfg_scale=cfg.cfg_scale if guided else 1.0, null_class=mc.null_class,
                   clip_denoised=mc.space == "pixel", generator=torch.Generator().manual_seed(cfg.seed + 1))
        images.append(to_uint8(x))
    rep = metrics.image_pair_report(images[0], images[1])
    rep["labels"] = labels.tolist()
    rep["passed"] = cfg.min_psnr is None or rep["mean_psnr_db"] >= cfg.min_psnr
    return rep, images[0], images[1]


# -- report ----------------------------------------------------------------------------------------
def run_compare(cfg: CompareConfig) -> dict:
    """Run every enabled comparison, write the report files into ``cfg.out``, return the report."""
    t0 = time.time()
    check_output_path(cfg.out, "dir")  # before the model loads and the capture runs
    require("polygraphy")  # the onnx extra: say so before any work, not after the capture

    model = load_model(cfg)
    ref, cand = resolve_endpoint(cfg.reference, model), resolve_endpoint(cfg.candidate, model)
    steps = capture(cfg, model)
    # the report files appear together when every comparison has run, or not at all
    with staged_directory(cfg.out, mode="merge") as out:
        report = _compare_into(cfg, model, ref, cand, steps, out, t0)
    return report


def _compare_into(cfg: CompareConfig, model: DiT, ref: Endpoint, cand: Endpoint, steps: list[CapturedStep],
                  out: Path, t0: float) -> dict:
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
              "reference": {"spec": ref.spec, "kind": ref.kind}, "candidate": {"spec": cand.spec, "kind": cand.kind},
              "captured": [{"step_index": s.index, "timestep": s.timestep, "batch": int(s.x.shape[0])} for s in steps]}
    report["step"] = step_comparison(cfg, ref, cand, steps)
    passed = report["step"]["passed"] and report["step"]["polygraphy_passed"]
    if cfg.layerwise and "trt" not in (ref.kind, cand.kind):
        from ..export.onnx_export import linear_names

        report["layerwise"] = layerwise_comparison(cfg, ref, cand, steps, linear_names(model))
        lw = report["layerwise"]
        from .plots import bar_chart_png

        bar_chart_png([d["layer"] for d in lw["layers"]], [d["out_sqnr_db"] for d in lw["layers"]],
                      out / "layer_sqnr.png", title="per-layer output SQNR (dB), mean over captured steps; "
                      "red: layers to keep in higher precision", highlight=set(lw["keep_in_higher_precision"]), threshold=cfg.min_sqnr)
    if cfg.e2e:
        rep, ref_img, cand_img = e2e_comparison(cfg, model, ref, cand)
        report["e2e"] = rep
        passed = passed and rep["passed"]
        from .plots import side_by_side_png

        diff = np.clip(np.abs(ref_img.astype(np.int16) - cand_img.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
        side_by_side_png([ref_img, cand_img, diff], out / "e2e_grid.png")
        np.savez(out / "e2e_samples.npz", reference=ref_img, candidate=cand_img, labels=np.asarray(rep["labels"]))
    report["passed"] = bool(passed)
    report["seconds"] = round(time.time() - t0, 2)
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    return report


def _jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("inf" if obj > 0 else "-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    return obj


def markdown_report(report: dict) -> str:
    c = report["config"]
    lines = [f"# dtq-compare: {'PASS' if report['passed'] else 'FAIL'}", "",
             f"reference `{report['reference']['spec']}` ({report['reference']['kind']}), "
             f"candidate `{report['candidate']['spec']}` ({report['candidate']['kind']}); "
             f"{c['steps']} DDPM steps, guidance {c['cfg_scale']}, seed {c['seed']}", "",
             f"## Step level (min SQNR {c['min_sqnr']} dB"
             + (f", min cosine {c['min_cosine']}" if c["min_cosine"] is not None else "")
             + (f", max abs {c['max_abs']}" if c["max_abs"] is not None else "") + ")", "",
             "| output | step | timestep | max abs | mean abs | cosine | SQNR dB | |", "|---|---|---|---|---|---|---|---|"]
    for r in report["step"]["rows"]:
        lines.append(f"| {r['output']} | {r['step_index']} | {r['timestep']} | {r['max_abs']:.4g} | {r['mean_abs']:.4g} "
                     f"| {r['cosine']:.6f} | {r['sqnr_db']:.2f} | {'ok' if r['passed'] else 'FAIL: ' + '; '.join(r['failures'])} |")
    lines += ["", f"polygraphy SnrCompareFunc at the same threshold: {'pass' if report['step']['polygraphy_passed'] else 'FAIL'}", ""]
    if "layerwise" in report:
        lw = report["layerwise"]
        lines += ["## Layerwise", "",
                  "Ranked by the SQNR of the noise each layer adds itself (output minus input noise-to-signal, "
                  "in power): the SQNR drop, independent of how clean the layer's input was.", "",
                  "Keep in higher precision first: " + (", ".join(f"`{n}`" for n in lw["keep_in_higher_precision"]) or "none")
                  + (f" (recalibrate with `dtq-calibrate --overrides {keep_overrides(lw['keep_in_higher_precision'])}`)"
                     if lw["keep_in_higher_precision"] else ""),
                  "", "![per-layer SQNR](layer_sqnr.png)", "",
                  "| rank | layer | in SQNR dB | out SQNR dB | drop dB | added-noise SQNR dB |", "|---|---|---|---|---|---|"]
        by = {d["layer"]: d for d in lw["layers"]}
        for i, name in enumerate(lw["ranking"][:20]):
            d = by[name]
            lines.append(f"| {i + 1} | `{name}` | {d['in_sqnr_db']:.2f} | {d['out_sqnr_db']:.2f} | {d['sqnr_drop_db']:.2f} "
                         f"| {d['added_sqnr_db']:.2f} |")
        lines.append("")
    if "e2e" in report:
        e = report["e2e"]
        lines += ["## End to end (uint8 images, data range 255)", "",
                  f"mean PSNR {e['mean_psnr_db']:.2f} dB over {len(e['psnr_db']) - e['n_identical']} differing images "
                  f"({e['n_identical']} identical), mean SSIM {e['mean_ssim']:.4f}", "",
                  "rows: reference, candidate, |difference| x4", "", "![side by side](e2e_grid.png)", ""]
    lines.append(f"({report['seconds']} s)")
    return "\n".join(lines) + "\n"


EPILOG = """examples:
  dtq-compare --candidate model_int8.onnx --reference model_fp32.onnx --out cmp
  dtq-compare --ckpt dit-s2/model.safetensors --candidate sim:recipes/w8a8 --min-sqnr 25 --out cmp
  dtq-compare --reference sim:recipes/w8a8 --candidate recipe:recipes/w8a8 --device cuda --out cmp  # kernels
  dtq-compare --reference int8.onnx --candidate trt:engines/int8 --no-layerwise --out cmp

--reference / --candidate take the denoiser specs of dtq-sample --backend: torch[:DTYPE], sim:DIR,
recipe:DIR, onnx:FILE, trt:DIR, or a bare path (an .onnx file, an engine directory, a recipe
directory = recipe:DIR, the quantized engine).
  dtq-compare --candidate model_int8.onnx --timesteps 999,500,20 --min-cosine 0.999 --out cmp

exit codes: 0 pass, 1 a check failed, 2 bad usage or input."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtq-compare", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, CompareConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    def _run_main() -> int:
        cfg = dataclass_from_args(CompareConfig, build_parser().parse_args(argv))
        try:
            report = run_compare(cfg)
        except ImportError as exc:  # an optional backend that is not installed (TensorRT, ONNX Runtime)
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        worst = min((r["sqnr_db"] for r in report["step"]["rows"]), default=math.nan)
        msg = f"{'PASS' if report['passed'] else 'FAIL'}: worst step SQNR {worst:.2f} dB"
        if "e2e" in report:
            msg += f", e2e mean PSNR {report['e2e']['mean_psnr_db']:.2f} dB, SSIM {report['e2e']['mean_ssim']:.4f}"
        if report.get("layerwise", {}).get("keep_in_higher_precision"):
            msg += f"; worst layer {report['layerwise']['keep_in_higher_precision'][0]}"
        print(msg + f"; report in {cfg.out}")
        return EXIT_OK if report["passed"] else EXIT_CHECK_FAILED

    return run_cli(_run_main)


if __name__ == "__main__":
    sys.exit(main())
