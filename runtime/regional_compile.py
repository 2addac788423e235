"""Regional ``torch.compile`` of a DiT's blocks, and the compile modes dtq offers for it.

``compile_blocks(model, mode)`` compiles each block (identical code: one compilation serves every
block). ``mode`` is a :data:`CompileMode`:

- ``"default"``: Inductor's defaults. GEMMs stay ATen calls (cuBLAS); pointwise neighbours fuse
  among themselves.
- ``"max-autotune"``: Inductor's ``max-autotune-no-cudagraphs`` options (dtq captures its own CUDA
  graphs, ``runtime.backends.GraphedDenoiser``) plus ``max_autotune_gemm`` and ``epilogue_fusion``
  named explicitly, and Hopper's persistent TMA GEMM template where the installed torch has it.
  Inductor then lowers ``aten.mm`` / ``aten._scaled_mm`` / ``aten._int_mm`` to its own Triton GEMM
  templates, benchmarks them against the ATen (cuBLAS) kernel, and fuses a chosen template's
  pointwise consumers (GELU, the next layer's quantize, ``x + gate * out``) into its epilogue. dtq's
  own Triton kernels are custom ops, opaque to Inductor: only torch-op GEMMs are affected. Compiling
  takes minutes longer (every GEMM shape is autotuned).

Orthogonal to the mode, ``multi_kernel=True`` turns on Inductor's multi-kernel (``triton.multi_kernel``):
Inductor makes a row reduction persistent (the whole row in registers, read once) only up to 1024
elements; DiT-XL/2's rows are 1152 wide, so its LayerNorm + modulate (+ quantize) kernels loop over
each row twice. With multi-kernel, rows up to 16x wider also get the persistent variant, and Inductor
times both on the first call and keeps the faster (before ``GraphedDenoiser``'s capture: its warm-up
runs first).
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import nn

CompileMode = Literal["default", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)

# Inductor's mode whose options "max-autotune" takes: no CUDA graphs of Inductor's own (GraphedDenoiser
# captures the whole denoiser; Inductor's cudagraph trees inside that capture would fail)
MAX_AUTOTUNE_INDUCTOR_MODE = "max-autotune-no-cudagraphs"
# Hopper's persistent TMA GEMM template: off by default in torch, named here when this torch has it
PERSISTENT_TMA_OPTION = "triton.enable_persistent_tma_matmul"


# Options for an engine whose per-token (ViDiT-Q) layers quantize with Inductor-fused torch ops
# (build_qengine(token_quant="inductor"); any mode). Inductor stores a value
# that a row reduction and a later pointwise op both read when it reads more than
# ``realize_reads_threshold`` (default 4) buffers. The per-token quantizer of LayerNorm + modulate reads
# 5-7 (x, its statistics, shift, scale, the balancing Mul), so at rows wider than a persistent reduction
# (1024 elements: DiT-XL/2's 1152) the fused kernel wrote the modulated row in bf16 and read it back; at
# 8 it recomputes it from x (one more read loop of the row, cache-resident) and writes only the codes
# and scales, as the static kernel does. Inductor's code for a static DiT-XL/2 block is the same with
# and without it (docs/engines.md, "Per-token dynamic activations").
TOKEN_INDUCTOR_OPTIONS = {"realize_reads_threshold": 8}


def fuses_token_quant(model: nn.Module) -> bool:
    """Whether a layer of ``model`` quantizes its input per token with torch ops for Inductor to fuse
    (an engine layer with ``act_granularity`` "token" and ``token_quant`` "inductor"). The default
    engine ("pass": an opaque Triton pass), the simulation and the FP model do not."""
    return any(getattr(m, "act_granularity", None) == "token" and getattr(m, "act_format", "none") != "none"
               and getattr(m, "token_quant", None) == "inductor" for m in model.modules())


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")


def inductor_options(mode: CompileMode) -> dict:
    """The Inductor options of ``mode`` (a new dict each call: torch.compile pops keys from it).
    torch.compile takes a ``mode`` or ``options``, not both, so the max-autotune mode's options
    are spelled out here with the additions."""
    check_compile_mode(mode)
    if mode == "default":
        return {}
    from torch._inductor import config, list_mode_options

    options = dict(list_mode_options(MAX_AUTOTUNE_INDUCTOR_MODE))
    options.update(max_autotune_gemm=True, epilogue_fusion=True)
    if PERSISTENT_TMA_OPTION in config.get_config_copy():  # absent from older torch: leave it out
        options[PERSISTENT_TMA_OPTION] = True
    return options


# Inductor's option behind compile_blocks(multi_kernel=True): 1 = both variants, picked by timing
MULTI_KERNEL_OPTION = "triton.multi_kernel"


def compile_kwargs(mode: CompileMode, multi_kernel: bool = False) -> dict:
    """``torch.compile`` keyword arguments of ``mode`` (and of Inductor's multi-kernel)."""
    options = inductor_options(mode)
    if multi_kernel:
        options[MULTI_KERNEL_OPTION] = 1
    return {"options": options} if options else {}


def block_compile_kwargs(model: nn.Module, mode: CompileMode = "default", multi_kernel: bool = False) -> dict:
    """``torch.compile`` keyword arguments ``compile_blocks`` gives ``model``'s blocks: ``mode``'s, plus
    :data:`TOKEN_INDUCTOR_OPTIONS` when some layer's per-token quantizer is Inductor's to fuse
    (:func:`fuses_token_quant`)."""
    kwargs = compile_kwargs(mode, multi_kernel)
    if fuses_token_quant(model):
        kwargs["options"] = {**TOKEN_INDUCTOR_OPTIONS, **kwargs.get("options", {})}
    return kwargs


def compile_blocks(model: nn.Module, mode: CompileMode = "default", multi_kernel: bool = False,
                   **kwargs) -> nn.Module:
    """Regional compilation: ``torch.compile`` each DiT block (identical code: compiled once, reused
    by every block), leaving embedders and the final layer eager. Returns ``model`` (in place).
    ``mode``: :data:`CompileMode`; ``multi_kernel``: Inductor's multi-kernel (module docstring). ``kwargs``: more ``torch.compile`` arguments (e.g. ``backend``).
    torch's default shape policy applies: the first batch size gets static kernels, a second one
    a batch-dynamic compilation that serves all further sizes. Per-token models: see
    :func:`block_compile_kwargs`."""
    check_compile_mode(mode)
    for block in model.blocks:
        block.compile(**block_compile_kwargs(model, mode, multi_kernel), **kwargs)
    return model

