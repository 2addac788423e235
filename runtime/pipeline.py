"""Sampling end to end: resolve a model, pick labels and noise from a seed, run the sampler in
batches, decode, and write a PNG grid, one PNG per image and an ADM-style ``.npz``.

``SampleConfig`` is the one description of a sampling job: ``dtq-sample`` parses its command
line into it and the Python API takes it (``generate(SampleConfig(...))``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..checks import check_finite_fields, check_output_path
from ..staging import staged_directory
from .attention import AttentionBackend
from .checkpoint import load_checkpoint, read_config_json
from .denoiser import Denoiser
from .denoiser_spec import parse_denoiser_spec
from .diffusion import GaussianDiffusion
from .distributed import DistContext, data_parallel, map_batches, rank_device
from .images import make_grid, save_npz, save_png, to_uint8
from .model import DIT_CONFIGS, DiT, DiTConfig, named_config
from .open import DTYPES, open_denoiser
from .qengine import DEFAULT_TOKEN_QUANT, TokenQuant, W4A8Kernel
from .regional_compile import CompileMode
from .sampler import sample
from .zoo import BUILTIN_MODELS, DEFAULT_MODEL, builtin_checkpoint


def _meta(help_text: str, **extra) -> dict:
    return {"help": help_text, **extra}


@dataclass
class SampleConfig:
    model: str | None = field(default=None, metadata=_meta(
        f"built-in model ({', '.join(BUILTIN_MODELS)}; the default when no --ckpt) or a DiT config name "
        "(DiT-XL/2 ...): with --ckpt the checkpoint must match it, without it needs --random-weights"))
    ckpt: Path | None = field(default=None, metadata=_meta(
        ".pt or .safetensors DiT checkpoint (facebookresearch layout; config.json beside it is read), or a "
        "local diffusers DiT folder (DiTPipeline with transformer/, vae/, scheduler/, or a bare transformer)"))
    random_weights: bool = field(default=False, metadata=_meta(
        "use random weights for --model CONFIG (speed tests; the images are noise)"))
    image_size: int | None = field(default=None, metadata=_meta(
        "image side in pixels (latent models: 8x the latent side); sets the input size of a --model config "
        "and is checked against a checkpoint"))
    num_classes: int | None = field(default=None, metadata=_meta("classes of a --model config (default 1000)"))
    steps: int = field(default=50, metadata=_meta("respaced sampling steps (of 1000)"))
    sampler: Literal["ddpm", "ddim"] = field(default="ddpm", metadata=_meta("ddpm (learned variance) or ddim"))
    eta: float = field(default=0.0, metadata=_meta("DDIM eta (0 = deterministic)"))
    cfg_scale: float = field(default=1.5, metadata=_meta("classifier-free guidance scale (1 = off)"))
    guidance_channels: Literal["all", "dit"] = field(default="all", metadata=_meta(
        "guide all noise channels, or only the first 3 as the original DiT code does"))
    classes: list[int] | None = field(default=None, metadata=_meta(
        "class labels to sample, each --per-class times (default: every class for models with <= 16 classes)"))
    per_class: int = field(default=4, metadata=_meta("images per listed class (the grid's columns)"))
    num_images: int | None = field(default=None, metadata=_meta("sample this many images with random labels instead"))
    seed: int = field(default=0, metadata=_meta("seed for labels, initial noise and per-step noise"))
    batch_size: int = field(default=64, metadata=_meta("images per denoiser batch (guidance doubles it)"))
    device: str = field(default="auto", metadata=_meta("cpu, cuda, cuda:N or auto"))
    dtype: Literal["fp32", "fp16", "bf16"] = field(default="fp32", metadata=_meta("weights and compute dtype"))
    autocast: bool = field(default=False, metadata=_meta("keep fp32 weights and run --dtype fp16/bf16 under autocast"))
    clip_denoised: bool | None = field(default=None, metadata=_meta(
        "clip predicted x0 to [-1, 1] (default: on for pixel-space models, off for latents as in DiT)"))
    prompt_embeddings: Path | None = field(default=None, metadata=_meta(
        "text-conditioned models (a diffusers PixArt folder): .safetensors of precomputed prompt embeddings "
        "(embeddings [N, tokens, D], mask [N, tokens], null_embedding, null_mask: runtime/prompts.py); --classes "
        "then picks prompt indices, and guidance uses the empty-prompt embedding"))
    vae: Path | None = field(default=None, metadata=_meta(
        "diffusers AutoencoderKL directory for latent models; without it latents are saved to latents.npz"))
    backend: str = field(default="torch", metadata=_meta(
        "the denoiser: torch (the PyTorch model; torch:bf16 names the dtype), sim:DIR (a recipe's fake-quant "
        "simulation), recipe:DIR (the quantized PyTorch engine: real FP8/INT8/INT4 GEMMs on CUDA, identical to "
        "sim:DIR on the CPU), onnx:FILE (ONNX Runtime), trt:DIR (a TensorRT / TensorRT-RTX engine directory, "
        "checked against this GPU and TensorRT); a bare path is an .onnx file, an engine directory (engine.plan) "
        "or a recipe directory (recipe.json, the engine)", metavar="SPEC"))
    compile: bool = field(default=False, metadata=_meta(
        "torch.compile the DiT blocks (torch, sim and recipe backends; CUDA)"))
    compile_mode: CompileMode = field(default="default", metadata=_meta(
        "with --compile: default (Inductor's defaults: GEMMs stay cuBLAS calls) or max-autotune (Inductor's "
        "max-autotune-no-cudagraphs options plus its persistent TMA GEMM template where torch has it: torch GEMMs, "
        "FP8 _scaled_mm and INT8 _int_mm included, are autotuned against cuBLAS on Inductor's Triton templates "
        "with GELU / quantize / gated residual fused into their epilogues; minutes more compile time; dtq's own "
        "Triton kernels are unaffected)"))
    cuda_graphs: bool = field(default=False, metadata=_meta(
        "replay the denoiser as one CUDA graph per batch size (torch, sim, recipe and trt backends on CUDA)"))
    attention: AttentionBackend = field(default="sdpa", metadata=_meta(
        "the DiT blocks' attention kernel (torch, sim and recipe backends): sdpa (torch's, bf16 flash on CUDA) or "
        "sage (SageAttention 1.0.6: INT8 QK^T, fp16 PV, head dim zero-padded to 64/96/128; CUDA, "
        "pip install sageattention==1.0.6; on the CPU its torch reference; on an H200 it was slower than sdpa, "
        "0.81-0.84x end to end for DiT-XL/2)"))
    w4a8_kernel: W4A8Kernel = field(default="group", metadata=_meta(
        "W4A8 layers of a recipe engine (--backend recipe:DIR): group (the recipe's INT4 codes and float group "
        "scales, INT8 x INT4 Triton GEMM rescaling each group in float; identical to sim:DIR on the CPU) or "
        "progressive (QServe-style: requantizes the INT4 weights at build time to two-level integer group "
        "scales, so q4 * s2 is an exact int8 weight, unpacked once per call for the INT8 GEMM (int32 over the "
        "whole K, fused epilogues): the fastest W4A8 engine, 1.26x bf16 torch.compile at batch 64 on an H200; "
        "weights differ slightly from the recipe's; static and per token activation scales)"))
    token_quant: TokenQuant = field(default=DEFAULT_TOKEN_QUANT, metadata=_meta(
        "per-token (dynamic, ViDiT-Q) INT8 activations of a recipe engine (--backend recipe:DIR): epilogue (the "
        "default: as pass-fused, but an all-INT8 MLP's fc1 GEMM writes fc2's per-token codes itself, the programs "
        "of a row exchanging their amaxes; pass-fused's codes; the fastest on an H200 at batch 1, 8 and 64, "
        "docs/engines.md) or pass-fused (one Triton quantize pass per layer input, fc2's GELU inside fc2's pass, "
        "the gated-residual epilogue with per-row scales) or pass (the Triton pass, per-token layers take no fused "
        "epilogue) or inductor (under --compile the quantizer is torch ops Inductor fuses into LayerNorm+modulate "
        "/ GELU, and per-token proj / fc2 take the gated-residual epilogue; same codes) or gemm (an all-INT8 MLP's "
        "fc2 input quantized as fc2's GEMM loads it, the row amaxes from fc1's epilogue: no pass, but slower on "
        "an H200)"))
    out: Path = field(default=Path("samples"), metadata=_meta("output directory"))
    progress: bool = field(default=True, metadata=_meta("show progress bars"))

    def __post_init__(self) -> None:
        check_finite_fields(self)  # --cfg-scale nan sampled black images and wrote invalid JSON
        if self.eta < 0:
            raise ValueError(f"--eta must be >= 0, got {self.eta}")
        if self.steps < 1 or self.steps > 1000:
            raise ValueError(f"--steps must be in 1..1000, got {self.steps}")
        if self.batch_size < 1 or self.per_class < 1:
            raise ValueError("--batch-size and --per-class must be positive")
        if self.num_images is not None and self.num_images < 1:
            raise ValueError("--num-images must be positive")
        if self.classes is not None and self.num_images is not None:
            raise ValueError("give either --classes or --num-images, not both")
        if self.ckpt is not None and self.random_weights:
            raise ValueError("--random-weights and --ckpt exclude each other")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"--compile-mode {self.compile_mode} applies to a compiled model: add --compile")
        spec = parse_denoiser_spec(self.backend)  # a bad spec fails here, before any work
        if self.token_quant != DEFAULT_TOKEN_QUANT and spec.kind != "recipe":
            raise ValueError(f"--token-quant {self.token_quant} chooses the recipe engine's per-token quantizer: it "
                             f"needs --backend recipe:DIR, not {self.backend}")
        if self.w4a8_kernel != "group" and spec.kind != "recipe":
            raise ValueError(f"--w4a8-kernel {self.w4a8_kernel} chooses the recipe engine's kernel: it needs "
                             f"--backend recipe:DIR, not {self.backend}")
        if spec.dtype is not None and self.dtype not in ("fp32", spec.dtype):
            raise ValueError(f"--backend {self.backend} and --dtype {self.dtype} disagree; give one of them")


@dataclass
class SampleResult:
    images: torch.Tensor | None  # decoded images in [-1, 1], [N, C, H, W] (latents when not decoded); None off rank 0
    labels: torch.Tensor
    out: Path
    files: list[Path]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_model(cfg: SampleConfig) -> DiT:
    """The DiT a job asks for: a checkpoint, a built-in model, or a config with random weights."""
    if cfg.ckpt is not None:
        expected = None
        if cfg.model is not None and cfg.model not in BUILTIN_MODELS:
            hints = read_config_json(cfg.ckpt)
            expected = _config_from_name(cfg.model, cfg, hints)
        model = load_checkpoint(cfg.ckpt, expected=expected)
    elif cfg.model is None or cfg.model in BUILTIN_MODELS:
        model = load_checkpoint(builtin_checkpoint(cfg.model or DEFAULT_MODEL))
    elif cfg.random_weights:
        model = DiT(_config_from_name(cfg.model, cfg, {})).randomize_(cfg.seed)
    else:
        raise ValueError(f"--model {cfg.model} names an architecture: give --ckpt, or --random-weights for a speed test")
    _check_image_size(model.config, cfg.image_size)
    return model


def _config_from_name(name: str, cfg: SampleConfig, hints: dict) -> DiTConfig:
    overrides = {k: hints[k] for k in ("in_channels", "num_classes", "learn_sigma", "space", "input_size") if k in hints}
    if cfg.num_classes is not None:
        overrides["num_classes"] = cfg.num_classes
    if cfg.image_size is not None and "input_size" not in overrides:
        overrides["input_size"] = cfg.image_size // 8 if overrides.get("space", "latent") == "latent" else cfg.image_size
    try:
        return named_config(name, **overrides)
    except KeyError:
        raise ValueError(f"unknown --model {name!r}; known: {', '.join(list(BUILTIN_MODELS) + list(DIT_CONFIGS))}") from None


def _check_image_size(config: DiTConfig, image_size: int | None) -> None:
    if image_size is None:
        return
    side = config.input_size * (8 if config.space == "latent" else 1)
    if side != image_size:
        raise ValueError(f"--image-size {image_size} does not match the model, which makes {side}px images")


def build_denoiser(cfg: SampleConfig, model: torch.nn.Module, device: torch.device, prompts=None) -> Denoiser:
    """The network the job samples with (``cfg.backend``, a denoiser spec; see ``open.open_denoiser``).
    All run inside the same sampling loop. ``prompts``: a text-conditioned model's embeddings
    (``load_prompts``); its denoiser then looks ``y`` up in them."""
    return open_denoiser(cfg.backend, model, device=device, dtype=DTYPES[cfg.dtype], compile=cfg.compile,
                         cuda_graphs=cfg.cuda_graphs, autocast=cfg.autocast, attention=cfg.attention, prompts=prompts,
                         compile_mode=cfg.compile_mode, w4a8_kernel=cfg.w4a8_kernel, token_quant=cfg.token_quant)


def load_prompts(cfg: SampleConfig, model: torch.nn.Module):
    """The prompt embeddings of a text-conditioned model (None for a class-conditioned one)."""
    text = getattr(model.config, "text_conditioned", False)
    if text and cfg.prompt_embeddings is None:
        raise ValueError("this model is text-conditioned: give --prompt-embeddings FILE (precomputed embeddings)")
    if not text and cfg.prompt_embeddings is not None:
        raise ValueError("--prompt-embeddings is for text-conditioned models (PixArt); this model takes class labels")
    if not text:
        return None
    from .prompts import PromptEmbeddings

    prompts = PromptEmbeddings.load(cfg.prompt_embeddings)
    if prompts.dim != model.config.caption_channels:
        raise ValueError(f"{cfg.prompt_embeddings}: embeddings have dim {prompts.dim}, the model's caption_channels "
                         f"is {model.config.caption_channels}")
    return prompts


def choose_labels(cfg: SampleConfig, num_classes: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Labels to sample and the grid's column count."""
    if cfg.num_images is not None:
        labels = torch.randint(0, num_classes, (cfg.num_images,), generator=generator)
        return labels, max(1, int(math.ceil(math.sqrt(cfg.num_images))))
    classes = cfg.classes
    if classes is None:
        if num_classes > 16:
            raise ValueError(f"the model has {num_classes} classes: pick some with --classes or use --num-images")
        classes = list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class labels {bad} are outside 0..{num_classes - 1}")
    return torch.tensor(classes).repeat_interleave(cfg.per_class), cfg.per_class


def generate(cfg: SampleConfig, denoiser: Denoiser | None = None, model: DiT | None = None) -> SampleResult:
    """Run a sampling job and write its files. ``denoiser`` replaces the PyTorch model as the
    network (ONNX Runtime, TensorRT, quantized backends); ``model`` still describes it.

    Under ``torchrun`` the batches are shared among the ranks (``distributed.map_batches``), rank
    0 gathers and writes the same files a single process writes, and the other ranks return a
    result with ``images=None`` and no files."""
    check_output_path(cfg.out, "dir")  # before the model is loaded, not after the sampling run
    device = resolve_device(cfg.device)
    with data_parallel(device) as ctx:
        return _generate(cfg, rank_device(device, ctx), ctx, denoiser, model)


def _generate(cfg: SampleConfig, device: torch.device, ctx: DistContext, denoiser: Denoiser | None,
              model: DiT | None) -> SampleResult:
    model = model if model is not None else resolve_model(cfg)
    mc = model.config
    prompts = load_prompts(cfg, model)
    num_classes, null_class = (mc.num_classes, mc.null_class) if prompts is None else (prompts.num_prompts,
                                                                                        prompts.null_index)
    if denoiser is None:
        denoiser = build_denoiser(cfg, model, device, prompts)
    if cfg.cfg_scale != 1.0 and null_class is None:
        raise ValueError("this model has no null class: use --cfg-scale 1")
    decoder = None
    vae = cfg.vae or _folder_vae(cfg.ckpt)
    if mc.space == "latent" and vae is not None:
        from .decode import LatentDecoder

        decoder = LatentDecoder(vae, device)
    clip = cfg.clip_denoised if cfg.clip_denoised is not None else mc.space == "pixel"

    gen = torch.Generator().manual_seed(cfg.seed)  # CPU generator: same images on any device
    labels, ncols = choose_labels(cfg, num_classes, gen)
    noise = torch.randn(len(labels), mc.in_channels, mc.input_size, mc.input_size, generator=gen)
    diffusion = GaussianDiffusion.dit(cfg.steps)

    def run_batch(start: int, sl: slice) -> torch.Tensor:
        # per-step noise seeded by the batch start: a batch gives the same images on any rank
        step_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
        x = sample(denoiser, diffusion, noise[sl].to(device), labels[sl].to(device), sampler=cfg.sampler,
                   cfg_scale=cfg.cfg_scale, null_class=null_class, guidance_channels=cfg.guidance_channels,
                   eta=cfg.eta, clip_denoised=clip, generator=step_gen, progress=cfg.progress and ctx.is_main)
        return (decoder(x) if decoder else x).cpu()

    images = map_batches(len(labels), cfg.batch_size, run_batch, ctx, progress=cfg.progress)
    if not ctx.is_main:
        return SampleResult(None, labels, cfg.out, [])
    files = write_outputs(cfg, images, labels, ncols, decoded=mc.space == "pixel" or decoder is not None)
    return SampleResult(images, labels, cfg.out, files)


def _folder_vae(ckpt: Path | None) -> Path | None:
    """A diffusers pipeline folder's own ``vae/`` (the default decoder of its latents)."""
    if ckpt is None or not Path(ckpt).is_dir():
        return None
    from .diffusers_dit import vae_dir

    return vae_dir(ckpt)


def write_outputs(cfg: SampleConfig, images: torch.Tensor, labels: torch.Tensor, ncols: int, decoded: bool) -> list[Path]:
    """Write into a temporary sibling directory, then move into place: never a half-written output
    (other files already in ``cfg.out`` are kept)."""
    with staged_directory(cfg.out, mode="merge") as tmp:
        names = []
        if decoded:
            arr = to_uint8(images)
            save_png(make_grid(arr, ncols), tmp / "grid.png")
            (tmp / "images").mkdir()
            for i, (img, lab) in enumerate(zip(arr, labels.tolist())):
                save_png(img, tmp / "images" / f"{i:06d}_class{lab}.png")
            save_npz(arr, labels.numpy(), tmp / "samples.npz")
            names = ["grid.png", "images", "samples.npz"]
        else:
            np.savez(tmp / "latents.npz", images.numpy().astype(np.float32), labels.numpy())
            names = ["latents.npz"]
        meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        (tmp / "sample_config.json").write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n")
        names.append("sample_config.json")
    return [Path(cfg.out) / n for n in names]
