"""``open_denoiser(spec, model, ...)``: the one way a tool turns a denoiser spec
(``runtime.denoiser_spec``) into the sampler's ``(x, t, y) -> out`` callable.

Every artifact is checked against the model it stands for before anything runs: a recipe's
fingerprint against the checkpoint (``recipe.load_recipe``), an ONNX export's and an engine's
recorded DiT config against the model's, an engine against this TensorRT and GPU
(``backends.open_engine_dir``). dtq-sample, dtq-compare and dtq-bench all open through here, so a
path means the same thing in each of them.

Lower-level pieces for tools that need more than the callable: :func:`open_module` (the PyTorch
module of a torch / sim / recipe spec, e.g. to hook its layers), :func:`open_recipe`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .denoiser import Denoiser, TorchDenoiser
from .denoiser_spec import DenoiserSpec, parse_denoiser_spec
from .qengine import DEFAULT_TOKEN_QUANT

if TYPE_CHECKING:
    from .qengine import TokenQuant, W4A8Kernel
    from .regional_compile import CompileMode

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(spec: DenoiserSpec, dtype: torch.dtype | str) -> torch.dtype:
    """The spec's own dtype (``torch:bf16``) or the caller's."""
    if spec.dtype is not None:
        return DTYPES[spec.dtype]
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def check_model_config(source: str, recorded: str | dict | None, model: nn.Module) -> None:
    """An ONNX/engine records the DiT config it was exported from; it must be ``model``'s."""
    if not recorded:
        return
    data = json.loads(recorded) if isinstance(recorded, str) else recorded
    mine = model.config.to_dict()
    diff = {k: (v, mine.get(k)) for k, v in data.items() if k in mine and mine[k] != v}
    if diff:
        raise ValueError(f"{source} was exported from another DiT config than the model "
                         f"(recorded vs model: {diff}); pass the matching --ckpt/--model")


def onnx_model_config(path: str | os.PathLike) -> str | None:
    """The ``dtq.model_config`` metadata dtq-export writes (None for other ONNX files), after
    ``onnx_file.open_onnx`` has refused a truncated model or external-data file."""
    from .. import artifacts
    from ..onnx_file import open_onnx

    return artifacts.read_onnx_metadata(open_onnx(path)).get(artifacts.META_MODEL_CONFIG)


def open_recipe(spec: str | DenoiserSpec, model: nn.Module):
    """The recipe of a sim / recipe spec, refused when it was calibrated for another checkpoint."""
    from .recipe import load_recipe

    spec = parse_denoiser_spec(spec)
    if spec.kind not in ("sim", "recipe"):
        raise ValueError(f"{spec} is not a recipe (sim:DIR or recipe:DIR)")
    return load_recipe(spec.path, model)


def open_module(spec: str | DenoiserSpec, model: nn.Module, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | str = torch.float32, recipe=None, engine_options: dict | None = None) -> nn.Module:
    """The PyTorch module of a torch / sim / recipe spec, on ``device`` in ``dtype``.

    ``torch`` is ``model`` itself (moved, not copied); sim and recipe leave ``model`` unchanged.
    ``recipe``: the already loaded recipe of the spec. ``engine_options``: extra
    ``build_qengine`` arguments (``fuse_mlp=(), fuse_residual=(), fuse_norm=False`` keep qkv / fc1 /
    proj / fc2 separately hookable on CUDA)."""
    spec = parse_denoiser_spec(spec)
    device, dtype = torch.device(device), resolve_dtype(spec, dtype)
    if spec.kind == "torch":
        return model.to(device, dtype).eval()
    if spec.kind not in ("sim", "recipe"):
        raise ValueError(f"{spec} is not a PyTorch denoiser (torch, sim:DIR or recipe:DIR)")
    recipe = recipe if recipe is not None else open_recipe(spec, model)
    if spec.kind == "sim":
        from .recipe import apply_recipe

        return apply_recipe(model, recipe, check=False).to(device, dtype).eval()
    from .qengine import build_qengine

    return build_qengine(model, recipe, device=device, dtype=dtype, check=False, **(engine_options or {}))


def open_denoiser(spec: str | DenoiserSpec, model: nn.Module, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | str = torch.float32, compile: bool = False, cuda_graphs: bool = False,
                  autocast: bool = False, threads: int | None = None, attention: str = "sdpa",
                  prompts=None, compile_mode: CompileMode = "default", w4a8_kernel: W4A8Kernel = "group",
                  token_quant: TokenQuant = DEFAULT_TOKEN_QUANT) -> Denoiser:
    """The denoiser ``spec`` names (see ``runtime.denoiser_spec``), checked against ``model``.

    ``dtype``: weights and compute of torch / sim, activations of the recipe engine (``torch:DTYPE``
    overrides it). ``compile``: regional torch.compile of the DiT blocks (torch, sim, recipe);
    ``compile_mode`` its ``runtime.regional_compile.CompileMode`` ("default" or "max-autotune":
    Inductor's GEMM templates with fused epilogues, autotuned against cuBLAS; needs ``compile``).
    ``cuda_graphs``: one CUDA graph per batch size (torch, sim, recipe, trt; CUDA only).
    ``autocast``: fp32 weights and residual stream, matmuls under autocast in ``dtype`` (torch, sim,
    recipe: the engine's layers then take fp32 inputs and return fp32, their GEMMs unchanged).
    ``threads``: ONNX Runtime's intra-op threads. ``attention``: the DiT blocks' attention kernel
    (``runtime.attention``: "sdpa" or "sage"; torch, sim, recipe). ``w4a8_kernel``: the recipe
    engine's W4A8 layers (``build_qengine``'s ``w4a8``): "group" (the recipe's float group scales,
    bit-identical to the simulation on the CPU) or "progressive" (two-level INT4 requantized at
    build time, ``qengine.Int4ProgressiveLinear``; per-token layers keep "group"; refused when no
    layer of the recipe is eligible). ``token_quant``: the recipe engine's per-token (dynamic) INT8
    quantizer (``build_qengine``'s ``token_quant``): "epilogue" (default: as "pass-fused", but an all-INT8
    MLP's fc1 writes fc2's per-token codes itself, the same codes; measured fastest at batch 1, 8 and 64),
    "pass-fused" (the Triton pass, fc2's GELU inside fc2's pass, per-row-scale gated-residual epilogues),
    "pass" (the Triton pass, no per-token fused epilogue), "inductor" (torch ops Inductor fuses under
    ``compile``, gated-residual epilogues) or "gemm" (an all-INT8 MLP's fc2 quantizes its input on load, the
    row amaxes from fc1's epilogue; measured slower); recipe backend only.
    ``prompts``: the ``runtime.prompts.PromptEmbeddings`` a text-conditioned model (PixArt) needs;
    the denoiser is then a ``PromptDenoiser`` (``y`` indexes the prompts) over torch, sim, recipe or
    onnx; compile, cuda_graphs, autocast and attention do not apply to it yet."""
    from .attention import check_backend, use_attention
    from .qengine import check_token_quant, check_w4a8_kernel
    from .regional_compile import check_compile_mode

    spec = parse_denoiser_spec(spec)
    device = torch.device(device)
    check_backend(attention)
    check_compile_mode(compile_mode)
    check_w4a8_kernel(w4a8_kernel)
    check_token_quant(token_quant)
    _check_options(spec, compile=compile, cuda_graphs=cuda_graphs, autocast=autocast, attention=attention,
                   compile_mode=compile_mode, w4a8_kernel=w4a8_kernel, token_quant=token_quant)
    engine_options = {"w4a8": w4a8_kernel, "token_quant": token_quant} if spec.kind == "recipe" else None
    if getattr(model.config, "text_conditioned", False) or prompts is not None:
        return _open_text_denoiser(spec, model, prompts, device=device, dtype=dtype, threads=threads,
                                   options={"compile": compile, "cuda_graphs": cuda_graphs, "autocast": autocast,
                                            f"attention={attention}": attention != "sdpa"},
                                   engine_options=engine_options)
    if spec.kind == "onnx":
        return _open_onnx(spec, model, device, threads)
    if spec.kind == "trt":
        from .backends import TensorRTDenoiser

        den = TensorRTDenoiser(spec.path, device, cuda_graphs=cuda_graphs)
        check_model_config(str(spec.path), den.meta.onnx.get("metadata", {}).get("model_config"), model)
        return den
    work_dtype = resolve_dtype(spec, dtype)
    # autocast: fp32 weights and residual stream, matmuls (and the engine's GEMM outputs) in work_dtype
    amp = work_dtype if autocast and work_dtype != torch.float32 else None
    module = open_module(spec, model, device=device, dtype=torch.float32 if amp else work_dtype,
                         engine_options=engine_options)
    _check_progressive_layers(module, spec, w4a8_kernel)
    use_attention(module, attention)  # (before compiling: the compiled blocks call the chosen kernel)
    if compile:
        from .regional_compile import compile_blocks

        compile_blocks(module, compile_mode)
    if compile or cuda_graphs or spec.kind == "recipe":
        from .backends import GraphedDenoiser

        return GraphedDenoiser(module, device, torch.float32 if amp else work_dtype, cuda_graphs=cuda_graphs,
                               autocast=amp)
    return TorchDenoiser(module, device, work_dtype, autocast=amp is not None)


def _open_onnx(spec: DenoiserSpec, model: nn.Module, device: torch.device, threads: int | None) -> Denoiser:
    from .backends import OnnxDenoiser

    if not Path(spec.path).is_file():
        raise FileNotFoundError(f"{spec.path}: no such ONNX file")
    check_model_config(str(spec.path), onnx_model_config(spec.path), model)
    return OnnxDenoiser(spec.path, device, threads=threads)


def _open_text_denoiser(spec: DenoiserSpec, model: nn.Module, prompts, *, device: torch.device,
                        dtype: torch.dtype | str, threads: int | None, options: dict[str, bool],
                        engine_options: dict | None = None) -> Denoiser:
    """A text-conditioned model's ``(x, t, context, mask)`` network behind ``(x, t, y)``: y indexes
    ``prompts`` (``runtime.prompts.PromptDenoiser``)."""
    from .prompts import PromptDenoiser

    if not getattr(model.config, "text_conditioned", False):
        raise ValueError("prompt embeddings are for text-conditioned models (PixArt); this model takes class labels")
    if prompts is None:
        raise ValueError("this model is text-conditioned: give its prompt embeddings (--prompt-embeddings FILE)")
    on = [name for name, value in options.items() if value]
    if on:
        raise ValueError(f"{', '.join(on)}: not applicable to text-conditioned models yet")
    if spec.kind == "onnx":  # the session takes (x, t, context, mask)
        return PromptDenoiser(_open_onnx(spec, model, device, threads), prompts, device)
    if spec.kind not in ("torch", "sim", "recipe"):  # trt: TensorRTDenoiser binds x, t, y (not done)
        raise ValueError(f"text-conditioned models sample with the torch, sim:DIR, recipe:DIR and onnx:FILE "
                         f"backends, not {spec.kind}")
    work_dtype = resolve_dtype(spec, dtype)
    module = open_module(spec, model, device=device, dtype=work_dtype, engine_options=engine_options)
    _check_progressive_layers(module, spec, (engine_options or {}).get("w4a8", "group"))
    return PromptDenoiser(module, prompts, device, work_dtype)


def _check_options(spec: DenoiserSpec, *, compile: bool, cuda_graphs: bool, autocast: bool,
                   attention: str = "sdpa", compile_mode: str = "default", w4a8_kernel: str = "group",
                   token_quant: str = DEFAULT_TOKEN_QUANT) -> None:
    """Options a backend cannot honour are refused rather than silently ignored."""
    if compile_mode != "default" and not compile:
        raise ValueError(f"compile mode {compile_mode} applies to a compiled model: add compile (--compile)")
    bad = [name for name, on, kinds in (("compile", compile, ("torch", "sim", "recipe")),
                                        ("cuda_graphs", cuda_graphs, ("torch", "sim", "recipe", "trt")),
                                        ("autocast", autocast, ("torch", "sim", "recipe")),
                                        (f"attention={attention}", attention != "sdpa", ("torch", "sim", "recipe")),
                                        (f"w4a8_kernel={w4a8_kernel}", w4a8_kernel != "group", ("recipe",)),
                                        (f"token_quant={token_quant}", token_quant != DEFAULT_TOKEN_QUANT, ("recipe",)))
           if on and spec.kind not in kinds]
    if bad:
        raise ValueError(f"{', '.join(bad)} does not apply to the {spec.kind} backend ({spec})")


def _check_progressive_layers(module: nn.Module, spec: DenoiserSpec, w4a8_kernel: str) -> None:
    """w4a8_kernel="progressive" on a recipe none of whose layers take it (no INT4-weight x
    INT8-activation layer with C_in % 64 == 0) would silently run the group-scale kernels: refused."""
    if w4a8_kernel != "progressive":
        return
    from .qengine import Int4ProgressiveLinear

    if not any(isinstance(m, Int4ProgressiveLinear) for m in module.modules()):
        raise ValueError(f"w4a8 kernel progressive: no layer of {spec.path} takes it (it needs INT4 weights, "
                         "INT8 activations and C_in % 64 == 0)")
