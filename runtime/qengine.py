"""The quantized PyTorch engine: a recipe's model with real low-precision GEMMs on the GPU.

``build_qengine(model, recipe)`` starts from the simulated model (``apply_recipe``: balancing
folded into adaLN / V rows / a run-time ``Mul`` exactly as the ONNX graph has it, each recipe layer
a ``QuantLinear``) and replaces every quantized ``QuantLinear`` from outside by an engine layer
holding the integer / float8 codes the simulation (and the ONNX initializers) hold:

=========  ======================  =====================================================================
precision  layer                   CUDA kernel
=========  ======================  =====================================================================
fp8        ``FP8Linear``           ``torch._scaled_mm``: static per-tensor FP8 E4M3 activation,
                                   per-channel weight scale (row-wise scaling; tensor-wise + epilogue
                                   where the row-wise kernel is unavailable), bf16 out
int8       ``Int8Linear``          Triton int8 x int8 -> int32 GEMM with the dequant epilogue fused
                                   (``runtime.kernels.int8_mm``); static per-tensor activation scale
                                   (TensorRT's rule). ``int8_kernel="auto"`` (default): ``torch._int_mm``
                                   at M <= ``INT8_INT_MM_MAX_M`` rows (Triton elsewhere); "triton" /
                                   "int_mm" pin one kernel (docs/engines.md: the measurements)
int8 (fp8  ``FusedMlp``            the MLP's fc1 as a Triton 8-bit GEMM that also applies GELU and
opt-in)                            quantizes fc2's input in its epilogue (``mm8_gelu_quant``): 8-bit
                                   codes out, no bf16 pass over the 4x-hidden tensor
w8a16      ``Int8WeightOnlyLinear`` int8 weight codes converted per call, dense bf16 GEMM, per-channel
                                   scale on the output (weight memory halved; no fused kernel)
w4a16      ``Int4Linear``          4-bit weight memory, bf16 compute: from ``W4A16_STAGED_MIN_ROWS`` rows
                                   the weight dequantized to bf16 and cuBLAS (in a DiT a block ahead on a
                                   side stream, ``runtime.weight_prefetch``; fc1's GELU in cuBLASLt's
                                   epilogue, ``GeluEpilogueMlp``); below it the Triton INT4 GEMM (weights
                                   unpacked and group-scaled in registers, bf16 MMA)
w4a8       ``Int4Linear``          Triton INT4-weight x INT8-activation GEMM: weight tiles unpacked to
                                   int8, int8 MMA per K tile, group scales applied per tile (group a
                                   multiple of 64; else as w4a16 after fake-quantizing the activation).
                                   TensorRT has no such kernel: it runs W4A8 graphs weight-only
w4a8       ``Int4Progressive-      ``build_qengine(w4a8="progressive")``: weights requantized to two-level
(opt-in)   Linear``                INT4 (integer group scales); ``q4 * s2`` unpacked to exact int8 (once per
                                   call into a temporary, then the INT8 GEMM: ``w4a8_staged_rows``; or in
                                   the GEMM's registers), int32 accumulation over the whole K, one float
                                   epilogue
=========  ======================  =====================================================================

Per-token dynamic activations (a recipe layer's ``act_granularity`` "token", ViDiT-Q): INT8 layers
(int8, w4a8) quantize their balanced input per row and the GEMM's epilogue (``int8_mm`` / ``w4a8_mm``)
scales row m by its scale. FP8 layers compute the row scale in torch and give ``torch._scaled_mm``
row-wise ``scale_a``. ``build_qengine(token_quant=...)`` (:data:`TokenQuant`) picks how:
"pass": the INT8 quantizer is one Triton pass
(``kernels.quant_rows_int8``, an opaque custom op also under ``torch.compile``) and per-token layers
take no fused epilogue; "inductor" (opt-in): under ``torch.compile`` the quantizer is plain torch ops
(``quant.token_codes_int8``, same codes and scales) that Inductor fuses into the kernel computing the
activation (LayerNorm + modulate, GELU), ``compile_blocks`` adds ``TOKEN_INDUCTOR_OPTIONS``, and
per-token proj / fc2 take the gated-residual epilogue with per-row scales; "pass-fused": the
Triton pass, with fc2's GELU applied inside fc2's pass (``kernels.quant_rows_int8(gelu=True)``, a
``FusedMlp`` whose fc1 keeps its own GEMM) and the gated-residual epilogue with per-row scales;
"epilogue" (the default, :data:`DEFAULT_TOKEN_QUANT`; the fastest on an H200 at batch 1, 8 and 64 since
session 22, docs/engines.md): as "pass-fused", except that an all-INT8 MLP's fc1 GEMM writes fc2's per-token
codes itself, the programs of a row block exchanging their parts of the row amax (``token_gemm``). The
static GELU + quantize epilogue of fc1 needs no such exchange (one scale for the tensor).
``Int4ProgressiveLinear`` takes both, as ``Int4Linear`` does (its kernel's ``ROW_SCALE``).

qkv's and fc1's input, ``modulate(LayerNorm(x))``, reaches a layer that takes 8-bit codes (static INT8 / FP8,
per-token INT8, two-level W4A8) as those codes from one Triton pass (``kernels.norm_quant``; ``fuse_norm``,
:class:`FusedResidualBlock`, ``quantized_input``), not as a bf16 tensor that the layer then quantizes.

A recipe layer with DiTAS' low-rank branch (``lowrank_up`` L, ``lowrank_down`` R) adds
``(x' R^T) L^T`` on the balanced unquantized input ``x'``: on the GPU two small FP16 GEMMs after the
layer's kernel, the second accumulating into the output (``addmm``) when the output is FP16. Their
FLOPs are ``r (K + N) / (K N)`` of the layer's (:meth:`EngineLinear.lowrank_flop_ratio`; rank 32 on
DiT-XL/2: 5.6% for qkv-sized, 3.5% for fc1/fc2-sized layers).

A recipe layer with an ``input_rotation`` (``--rotate-fc2``: fc2's block-Hadamard) rotates its input
before the run-time ``Mul`` and the quantizer: on the GPU a torch matmul with the small ``H_k``
(``runtime.rotation.rotate``) between GELU and the layer's input quantization, unfused (such an MLP
is not a ``FusedMlp``). A Triton kernel fusing GELU + FWHT + quantize is future work; a GPU run must
measure the rotation's share of the block time.

On the CPU (and with ``kernel="reference"``) each layer computes with exactly the simulation's
operations from its stored codes, so the engine's output is bit-identical to ``apply_recipe``'s:
the codes, scales and folding are verified on any machine; the GPU kernels are compared with the
simulation by SQNR (``benchmarks/bench_engines.py`` reports it).

Other model families (PixArt, through its ``runtime.adapters`` adapter): the recipe's layers, whose
names calibration took from the adapter's quantizable Linears, become engine layers exactly as a
DiT's do (same classes, same kernels, bit-identical to the simulation on the CPU). The fusions above
(``FusedMlp``, ``FusedResidualBlock``) and the attention backends rewrite DiT blocks only: any
other model runs unfused, its own attention (diffusers' SDPA for PixArt) between the engine layers.

The DiT's forward is untouched; the engine is an ordinary ``nn.Module``: compile it with
``compile_blocks`` (``runtime.regional_compile``: regional ``torch.compile`` of each DiT block, one
compilation serves all blocks; ``mode="max-autotune"`` lets Inductor put the torch GEMMs, FP8
``_scaled_mm`` and ``_int_mm``, on its autotuned templates with fused epilogues) and run it under
CUDA graphs with ``runtime.backends.GraphedDenoiser``.
"""

from __future__ import annotations

import functools
import typing
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import formats
from . import quant
from .adapters import adapter_for
from .attention import AttentionBackend, check_backend, use_attention
from .gelu import GeluForm, check_gelu_form, use_gelu
from .kernels_ref import pair_columns
from .model import DiTBlock, Mlp, modulate
from .qlinear import QuantLinear
from .quantized_input import QuantizedActivation, norm_quantized
from .recipe import Recipe, apply_recipe
from .regional_compile import compile_blocks  # noqa: F401  (the engine's compile; callers import it from here)
from .rotation import rotated_input
from .weight_prefetch import WeightPrefetcher

# "auto": the GPU path (custom ops, Triton / cuBLAS kernels) on CUDA inputs, the simulation's operations
# elsewhere; "reference": the simulation's operations everywhere; "gpu": the GPU path on any device (on
# the CPU through Triton's interpreter, TRITON_INTERPRET=1, and torch's CPU _scaled_mm / _int_mm: tests)
Kernel = Literal["auto", "reference", "gpu"]
W4_MIN_K = 64  # runtime.kernels.w4a16_mm needs C_in % 64 == 0
# int8_kernel="auto": torch._int_mm (cuBLAS) up to this many rows, the Triton GEMM above. Measured on an
# H200 with CUDA-graph timing (bench_speed_h200_e2e_88e4fae.json, DiT-XL/2 block GEMMs): the Triton
# kernel with its small-M candidates beat _int_mm at M = 4096 (0.86-1.22x vs 0.78-0.91x of bf16) and
# M = 512 (0.88-1.04x vs 0.58-0.87x), as at M = 32768, so no row count takes _int_mm by default.
INT8_INT_MM_MAX_M = 0
# Two-level W4A8 (Int4ProgressiveLinear) from this many input rows on: q4 * s2 unpacked to int8 once per
# call, then the INT8 GEMM; below it the INT4 weight is unpacked in the GEMM's registers (4-bit weight
# reads). build_qengine's w4a8_staged_rows; None: never staged. Measured on an H200 (session 12, DiT-XL/2,
# per-token g32, images/s staged vs in registers): 4.22 vs 3.32 at batch 1 (512 rows with guidance),
# 13.29 vs 10.13 at batch 8; at batch 64 the static g128 engine went from 0.82x to 1.26x of bf16. So every
# row count is staged; the in-register kernel stays for w4a8_staged_rows=None (and GPUs where it wins).
W4A8_STAGED_MIN_ROWS = 0
# W4A16 (Int4Linear) from this many rows on: the INT4 weight dequantized with its float group scales to the
# activation type once per call, then cuBLAS; None: the INT4 Triton kernel (dequantizing in its registers).
# Measured on an H200 (session 13, DiT-XL/2, 50 steps with guidance, bf16-compile in the same run): staged
# forward 9.75 ms vs the INT4 kernel's 15.56 ms at batch 8 (14.46 vs 9.50 img/s; the kernel with its new
# swapped-operand candidates: 13.14 ms, 11.02 img/s) and 3.38 vs 3.68 ms at batch 1, against bf16's
# 8.80-9.23 / 2.67-2.77 ms: staged is faster at every batch measured, still slower than bf16 (the dequantize
# pass, about 6 us per layer). Batch 64 was not measured either way. Session 17 (w4a16_bench.py, CUDA-graph
# medians): the INT4 kernel is slower than unpack + cuBLAS down to DiT-XL/2's adaLN at 2-16 rows too
# (14.1 / 12.4 us against 12.3 / 11.8; cuBLAS alone on the bf16 weight: 5.4 / 4.7 us), so those rows
# staged, and a DiT's layers took the unpack off the critical path (runtime.weight_prefetch). Then the
# kernel got 16-row tiles for such GEMVs (kernels.W4A16_TINY_M); below this many rows it runs them.
W4A16_STAGED_MIN_ROWS = 32
INT8_KERNELS = ("auto", "triton", "int_mm")
# How per-token (dynamic) INT8 activations are quantized on the GPU path (build_qengine's token_quant):
# "pass": one Triton pass (quant_rows_int8, opaque to Inductor), no fused epilogue on per-token layers;
# "inductor": torch ops Inductor fuses into the producer under compile + TOKEN_INDUCTOR_OPTIONS + the
# gated-residual epilogue with per-row scales. On the H200 "inductor" ran 24.7% behind static INT8,
# "pass" 13.4% (docs/engines.md).
# "pass-fused": the Triton pass, with fc2's GELU done inside fc2's quantization pass (FusedMlp: no GELU
# pass over the 4x-hidden tensor) and the gated-residual epilogue with per-row scales in proj / fc2.
# The default since session 16: once that pass took one MUFU operation per element and no masked-off
# lanes (kernels._quant_rows_kernel), per-token INT8 at batch 64 ran 8.0% behind static with it and 15.0%
# with "pass" (26.57 against 24.55 img/s, same run, bench_speed_h200_s16d_7bdf0f5.json). Since session 18
# the pass reads 16-bit rows as int32 pairs (kernels._quant_pairs_kernel: 0.123 ms against 0.240 at 32768 x
# 4608, at memory speed): 6.1% / 6.8% behind static at batch 64, 3.5% at batch 8 (docs/engines.md).
# "gemm": as "pass-fused", except fc2's input in an all-INT8 MLP: fc1's epilogue takes each row's amax (atomic
# max over its N tiles) and fc2's GEMM quantizes its bf16 input as it loads it (kernels.mm8_gelu_rowmax /
# mm8_rowquant): no pass over the 4x-hidden tensor, the scale computed in the kernel writing the activation.
# Measured slower (session 17, H200, batch 64, same run): 22.0% behind static INT8 against pass-fused's 7.7%.
# fc2 quantizing on load ran 0.833 ms against 0.391 on codes (+ the pass's 0.241): its A tile goes through
# registers without the pipelined shared-memory copy; fc1's GELU + row-amax epilogue ran 0.543 against 0.366.
# Kept as the ablation (dtq-bench "-token-gemmq").
# "epilogue": as "pass-fused", except fc2's input in an all-INT8 MLP: fc1's GEMM writes fc2's per-token codes
# and row scales itself (token_gemm.mm8_gelu_token_codes: the programs of a row block's N tiles exchange their
# parts of the row amax through global memory), the codes of fc1 + the paired pass without fc1's output in HBM.
# Measured (session 19, H200, batch 64, same run): forward 44.58 ms against pass-fused's 44.74 and static's
# 42.00 (6.1% / 6.5% behind static); fc1 alone 0.470 ms against fc1 + the pass 0.490 (static fc1 0.389), 0.065
# against 0.080 at batch 8. The conversion unit (int-to-float, two bf16 roundings, tanh.approx per element) and
# the wait bound it. At batch 8 (session 20) its forward was 0.9% behind static's against pass-fused's 5.0%
# (7.174 / 7.466 / 7.110 ms). The default since session 22: same runs (s22a, s22b), images/s behind static at
# batch 64 / 8 / 1: 6.0% / 1.6% / 2.4% and 5.8% / 0.6% / 2.9% against pass-fused's 6.9% / 5.0% / 5.0% (s22a).
# Where one row group cannot be on the GPU at once (fewer SMs than fc1's N tiles) it runs as "pass-fused".
TokenQuant = Literal["pass", "inductor", "pass-fused", "gemm", "epilogue"]
TOKEN_QUANTS: tuple[str, ...] = typing.get_args(TokenQuant)
DEFAULT_TOKEN_QUANT: TokenQuant = "epilogue"


class EngineLinear(nn.Module):
    """Common state: bias (float32), optional run-time balancing multiplier, activation format and
    scale, weight format/granularity and codes. Buffers keep their dtypes under ``.to(dtype)``."""

    def __init__(self, q: QuantLinear, kernel: Kernel = "auto"):
        super().__init__()
        self.in_features, self.out_features = q.in_features, q.out_features
        self.weight_format, self.act_format = q.weight_format, q.act_format
        self.act_granularity = q.act_granularity  # "token": scale per row computed from the input
        self.weight_granularity, self.weight_group_size = q.weight_granularity, q.weight_group_size
        self.kernel = kernel
        # online block-Hadamard rotation of the input (recipe input_rotation), before input_mul; on the
        # GPU a torch matmul with the small H in the activation dtype (not fused into the GEMM yet)
        self.input_rotation = q.input_rotation
        # the layer's own H (QuantLinear.input_rotation: moved by .to(), no host copy per call)
        h = q.rotation_matrix
        self.register_buffer("rotation_matrix", None if h is None else h.clone(), persistent=False)
        f32 = lambda t: None if t is None else t.detach().float().clone()  # noqa: E731
        self.register_buffer("bias", f32(q.bias))
        self.register_buffer("input_mul", f32(q.input_mul))
        # the same Mul as the paired per-token pass reads it (kernels.quant_rows_int8): laid out once here
        self.register_buffer("input_mul_pairs", None if q.input_mul is None or q.in_features % 2
                             else pair_columns(q.input_mul), persistent=False)
        self.register_buffer("act_scale", f32(q.act_scale))
        self.register_buffer("weight_scale", f32(q.weight_scale))
        # low-rank branch: float32 for the reference path (the simulation's values), fp16 for the GPU
        self.register_buffer("lowrank_up", f32(q.lowrank_up))
        self.register_buffer("lowrank_down", f32(q.lowrank_down))
        half = lambda t: None if t is None else t.detach().to(torch.float16).contiguous()  # noqa: E731
        self.register_buffer("lowrank_up_h", half(q.lowrank_up))
        self.register_buffer("lowrank_down_h", half(q.lowrank_down))

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts do not (the codes and scales are the engine)."""
        for key, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    # -- the simulation's numbers, from the stored codes ------------------------------------------------
    def weight_codes(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """float32 ``[N, K]``: ``codes * scale`` (what ``QuantLinear.fake_quant_weight`` computes)."""
        scale = quant.expand_weight_scale(self.weight_scale, (self.out_features, self.in_features),
                                          self.weight_granularity, self.weight_group_size)
        return quant.dequantize(self.weight_codes(), scale)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """``QuantLinear.forward``'s operations, in its order."""
        dtype = x.dtype
        x = rotated_input(self, x)
        if self.input_mul is not None:
            x = x * self.input_mul.to(dtype)
        xb = x
        if self.act_format != "none":
            x = quant.fake_quant_act(x, self.act_scale, self.act_format, self.act_granularity)
        w = self.dequantized_weight()
        b = self.bias
        y = F.linear(x.to(w.dtype), w, b if b is None else b.to(w.dtype))
        if self.lowrank_up is not None:
            y = y + F.linear(F.linear(xb.to(w.dtype), self.lowrank_down), self.lowrank_up)
        return y.to(dtype)

    # INT4 layers: from this many input rows on, the weight is unpacked once per call into a temporary and
    # a GEMM without INT4 in its inner loop runs (None: never; Int4ProgressiveLinear, Int4Linear's W4A16)
    staged_min_rows: int | None = None

    def staged(self, rows: int) -> bool:
        """Whether ``rows`` input rows run on the unpacked weight. Two-level W4A8: unpacking INT4 in the
        GEMM's inner loop (extra ALU work beside the MMAs, the weight tile through registers instead of
        shared memory) ran at 0.82x of bf16 at batch 64 where the INT8 GEMM ran at 1.15x; the unpack pass
        reads 0.5 and writes 1 byte per weight once per call, which even at 512 rows cost less than the
        slower kernel (``W4A8_STAGED_MIN_ROWS``, docs/engines.md)."""
        return self.staged_min_rows is not None and rows >= self.staged_min_rows

    def runs_kernels(self, x: torch.Tensor | QuantizedActivation) -> bool:
        """Whether ``x`` takes the GPU path (``kernel``: "auto" on CUDA, "gpu" anywhere) or the reference
        (codes from a producing kernel exist on the GPU path only)."""
        return self.kernel == "gpu" or isinstance(x, QuantizedActivation) or (self.kernel == "auto" and x.is_cuda)

    def norm_codes_format(self) -> str | None:
        """The 8-bit input codes this layer's GEMM can take from the kernel producing its input
        (``kernels.NORM_CODES``: "int8", "int8-token", "fp8"), or None: the reference path, a layer
        without ``codes_forward``, a low-rank branch (it needs the unquantized input), an input rotation,
        per-token codes other than INT8 or under ``token_quant="inductor"`` (Inductor fuses those)."""
        if (self.kernel == "reference" or not callable(getattr(self, "codes_forward", None))
                or self.lowrank_up is not None or self.input_rotation):
            return None
        if self.dynamic:
            return "int8-token" if self.act_format == formats.INT8 and self.token_quant != "inductor" else None
        return {formats.INT8: "int8", formats.FP8_E4M3: "fp8"}.get(self.act_format)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):  # the producer quantized the input (quantized_input.py)
            return self.codes_forward(x.codes, x.dtype, x.scale).reshape(*x.shape[:-1], self.out_features)
        if not self.runs_kernels(x):
            return self.reference(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x2 = rotated_input(self, x2)
        out = self.kernel_forward(x2)
        if self.lowrank_up is not None:
            out = self.lowrank_forward(x2, out)
        return out.reshape(*shape[:-1], self.out_features)

    def lowrank_forward(self, x2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + (x' R^T) L^T`` in FP16 (the branch's precision in the graph), ``x'`` the balanced
        unquantized input; the second GEMM accumulates into ``out`` when ``out`` is FP16."""
        a = (self._balanced_float(x2) if self.input_mul is not None else x2).to(torch.float16)
        h = a @ self.lowrank_down_h.t()
        if out.dtype == torch.float16:
            return torch.addmm(out, h, self.lowrank_up_h.t())
        return out + (h @ self.lowrank_up_h.t()).to(out.dtype)

    def lowrank_flop_ratio(self) -> float:
        """FLOPs of the low-rank branch over the layer's GEMM: ``r (K + N) / (K N)``."""
        if self.lowrank_up is None:
            return 0.0
        r, k, n = self.lowrank_up.shape[1], self.in_features, self.out_features
        return r * (k + n) / (k * n)

    def kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- fused GEMM epilogues (FusedMlp, FusedResidualBlock) ----------------------------------------------
    # A layer whose GPU kernel is a Triton GEMM of ours names its epilogue family ("int8", "fp8",
    # "w4a8" = two-level W4A8, "w4a8-group"); build_qengine's fuse_mlp / fuse_residual pick families.
    # Such a layer implements quantize_input, codes_forward, codes_gelu_quant and codes_gate_residual
    # (the group-scale W4A8 kernel: the gated residual only).
    epilogue_format: str | None = None
    # per-token layers: how their INT8 input is quantized and whether they fuse epilogues (TokenQuant;
    # set by build_qengine / swap_engine_layers)
    token_quant: TokenQuant = DEFAULT_TOKEN_QUANT

    def fuses_epilogue(self, rows: int | None = None) -> bool:
        """Whether the GPU path can run this layer with a fused epilogue (at ``rows`` input rows, or at
        some row count when None): a Triton kernel of ours, no low-rank branch (added after the GEMM).
        Per-token layers only with ``token_quant`` "inductor" or "pass-fused" (the gated residual with
        per-row scales; "pass" keeps them unfused); ``FusedMlp``'s fc1 epilogue also needs static scales
        (fc2's input is quantized inside fc1's N tiles; per token it folds GELU into fc2's pass instead)."""
        return (self.epilogue_format is not None and self.kernel != "reference" and self.lowrank_up is None
                and (not self.dynamic or self.token_quant in ("inductor", "pass-fused", "gemm", "epilogue")))

    def fused_gate_residual(self, x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + gate.unsqueeze(1) * self(x)`` (a DiT block's adaLN-gated residual add) as one GEMM
        with the add in its epilogue: ``x`` ``[B, T, K]``, ``gate`` ``[B, N]``, ``residual`` ``[B, T, N]``."""
        x2 = x.reshape(-1, x.shape[-1])
        # fc2's Hadamard, if any (a torch matmul), before the quantizing GEMM
        x2 = rotated_input(self, x2)
        xq, a_scale = self.input_codes(x2)  # static [] or per token [M]
        return self.codes_gate_residual(xq, gate, residual.reshape(-1, self.out_features),
                                        a_scale).reshape(residual.shape)

    def input_codes(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """8-bit codes of the (balanced) input and their scale (``[]`` static or ``[M]`` per token)."""
        raise NotImplementedError

    def _balanced_float(self, x2: torch.Tensor) -> torch.Tensor:
        xf = x2.float()
        return xf * self.input_mul if self.input_mul is not None else xf

    @property
    def dynamic(self) -> bool:
        return self.act_granularity == "token"

    def int8_codes(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """INT8 codes of the balanced input and their scale: the static scalar, or per token ``[M]``
        from one Triton pass over ``x2`` (``kernels.quant_rows_int8``, opaque under ``torch.compile``).
        ``token_quant="inductor"`` under ``torch.compile`` (``compile_blocks``): plain torch ops
        (``quant.token_codes_int8``), which Inductor fuses into the kernel that computes ``x2``
        (LayerNorm + modulate before qkv / fc1, GELU before fc2); eager it keeps the Triton pass (the
        torch ops would be several kernels there). Both give the same codes and scales for the same ``x2``."""
        if self.dynamic:
            if self.token_quant == "inductor" and torch.compiler.is_compiling():
                return quant.token_codes_int8(x2, self.input_mul)
            return torch.ops.dtq.quant_rows_int8(x2, self.input_mul, self.input_mul_pairs)
        return torch.round(self._balanced_float(x2) / self.act_scale).clamp_(-128, 127).to(torch.int8), self.act_scale

    def weight_bytes(self) -> int:
        """Codes + the kernel's scales + bias (``weight_scale`` is kept for the reference path only;
        each layer also holds it in its kernel's layout; likewise a low-rank branch's float32 copies,
        whose FP16 copies count; a W4A16 layer's prefetched weight, output and cast bias are the prefetcher's
        scratch, ``input_mul_pairs`` another layout of ``input_mul``)."""
        return sum(b.numel() * b.element_size() for k, b in self._buffers.items()
                   if b is not None and k not in ("weight_scale", "lowrank_up", "lowrank_down", "prefetched_weight",
                                                  "prefetched_output", "bias_cast", "input_mul_pairs"))

    def extra_repr(self) -> str:
        g = f"{self.weight_granularity}{self.weight_group_size or ''}"
        return (f"in={self.in_features}, out={self.out_features}, w={self.weight_format}/{g}, a={self.act_format}, "
                f"kernel={self.kernel_name()}{', input_mul' if self.input_mul is not None else ''}"
                f"{f', input_rotation={self.input_rotation}' if self.input_rotation else ''}"
                f"{f', token_quant={self.token_quant}' if self.dynamic else ''}")

    def kernel_name(self) -> str:
        return "reference" if self.kernel == "reference" else type(self).__name__


def _per_channel(scale: torch.Tensor, n: int) -> torch.Tensor:
    return scale.reshape(-1).expand(n).contiguous() if scale.numel() == 1 else scale.reshape(n).contiguous()


class FP8Linear(EngineLinear):
    """FP8 E4M3 W8A8 with ``torch._scaled_mm``."""

    def __init__(self, q: QuantLinear, kernel: Kernel = "auto"):
        super().__init__(q, kernel)
        if q.weight_granularity == "group":
            raise ValueError("FP8 weights take per-tensor or per-channel scales")
        self.register_buffer("weight_fp8", q.quantized_weight().contiguous())  # [N, K] row-major
        self.register_buffer("w_scale_row", _per_channel(q.weight_scale.float(), q.out_features).reshape(1, -1))
        self.register_buffer("one", torch.ones((), dtype=torch.float32))
        self.scaling = "tensorwise"  # or "rowwise"[+bias]: set by build_qengine for the GPU (probe_rowwise)

    def weight_codes(self) -> torch.Tensor:
        return self.weight_fp8

    def quantize_input(self, x2: torch.Tensor) -> torch.Tensor:
        return (self._balanced_float(x2) / self.act_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)

    def fp8_codes(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E4M3 codes of the balanced input and their scale (static ``[]`` or per token ``[M]``)."""
        if not self.dynamic:
            return self.quantize_input(x2), self.act_scale
        xf = self._balanced_float(x2)
        s = quant.token_scale(xf, self.act_format)
        return (xf / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s.reshape(-1)

    def kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        xq, a_scale = self.fp8_codes(x2)
        return self.codes_forward(xq, x2.dtype, a_scale)

    def codes_forward(self, xq: torch.Tensor, dtype: torch.dtype, a_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The GEMM on E4M3 codes of this layer's (balanced) input -> ``dtype``; ``a_scale``: per-row
        scales ``[M]`` of dynamic codes (default: the static scale)."""
        w_t = self.weight_fp8.t()  # [K, N] column-major, as _scaled_mm wants
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if a_scale is not None and a_scale.dim() == 1:  # per token: row-wise scale_a, or scale the output rows
            if self.scaling.startswith("rowwise"):
                out = torch._scaled_mm(xq, w_t, scale_a=a_scale.reshape(-1, 1).contiguous(), scale_b=self.w_scale_row,
                                       out_dtype=out_dtype)
            else:
                out = torch._scaled_mm(xq, w_t, scale_a=self.one, scale_b=self.one, out_dtype=torch.float32)
                out = out * a_scale.reshape(-1, 1) * self.w_scale_row
            if self.bias is not None:
                out = out + self.bias
            return out.to(dtype)
        if self.scaling.startswith("rowwise"):
            a_scale = self.act_scale.reshape(1, 1).expand(xq.shape[0], 1).contiguous()
            if self.scaling == "rowwise+bias" and self.bias is not None:  # bias in the GEMM's epilogue
                return torch._scaled_mm(xq, w_t, scale_a=a_scale, scale_b=self.w_scale_row,
                                        bias=self.bias.to(out_dtype), out_dtype=out_dtype).to(dtype)
            out = torch._scaled_mm(xq, w_t, scale_a=a_scale, scale_b=self.w_scale_row, out_dtype=out_dtype)
        else:
            out = torch._scaled_mm(xq, w_t, scale_a=self.act_scale, scale_b=self.one, out_dtype=torch.float32)
            out = out * self.w_scale_row
        if self.bias is not None:
            out = out + self.bias
        return out.to(dtype)

    def channel_scales(self) -> torch.Tensor:
        """Per-output-channel weight scales ``[N]`` (what ``FusedMlp``'s kernel takes)."""
        return self.w_scale_row.reshape(-1)

    # the fused epilogues run the Triton FP8 GEMM instead of cuBLAS's (default: FUSED_FAMILIES)
    epilogue_format = "fp8"

    def codes_gelu_quant(self, xq: torch.Tensor, q_mul: torch.Tensor | None, q_scale: torch.Tensor) -> torch.Tensor:
        return torch.ops.dtq.mm8_gelu_quant(xq, self.weight_fp8, self.act_scale, self.channel_scales(), self.bias,
                                            q_mul, q_scale)

    def input_codes(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fp8_codes(x2)

    def codes_gate_residual(self, xq: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor,
                            a_scale: torch.Tensor | None = None) -> torch.Tensor:
        a_scale = self.act_scale if a_scale is None else a_scale  # [M]: per-token codes (ROW_SCALE)
        return torch.ops.dtq.mm8_gate_residual(xq, self.weight_fp8, a_scale, self.channel_scales(), self.bias,
                                               gate, residual)


@functools.lru_cache(maxsize=None)
def probe_rowwise(device: torch.device) -> str:
    """Row-wise scaled FP8 GEMM where torch has it for this GPU (Hopper+), else tensor-wise;
    ``rowwise+bias`` where it also adds a bias in its epilogue (checked against the unfused sum:
    saves a pass over the output, and after qkv the copies that SDPA's layout then needs)."""
    try:
        a = torch.ones(16, 32, device=device, dtype=torch.float8_e4m3fn)
        b = torch.ones(16, 32, device=device, dtype=torch.float8_e4m3fn).t()
        sa, sb = torch.ones(16, 1, device=device), torch.full((1, 16), 0.5, device=device)
        torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return "tensorwise"
    try:
        bias = torch.arange(16, device=device, dtype=torch.bfloat16)
        out = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16)
        return "rowwise+bias" if torch.equal(out.float(), (16.0 + bias.float()).expand(16, 16)) else "rowwise"
    except (RuntimeError, NotImplementedError):
        return "rowwise"


class Int8Linear(EngineLinear):
    """INT8 W8A8: static per-tensor activation, per-channel weight; Triton GEMM (or ``torch._int_mm``)."""

    def __init__(self, q: QuantLinear, kernel: Kernel = "auto", int8_kernel: str = "auto"):
        super().__init__(q, kernel)
        if int8_kernel not in INT8_KERNELS:
            raise ValueError(f"int8_kernel must be one of {', '.join(INT8_KERNELS)}, got {int8_kernel!r}")
        if q.weight_granularity == "group":
            raise ValueError("INT8 weights take per-tensor or per-channel scales")
        self.register_buffer("weight_int8", q.quantized_weight().contiguous())  # [N, K]
        self.register_buffer("w_scale_n", _per_channel(q.weight_scale.float(), q.out_features))
        self.int8_kernel = int8_kernel

    def weight_codes(self) -> torch.Tensor:
        return self.weight_int8

    def kernel_name(self) -> str:
        return "reference" if self.kernel == "reference" else f"Int8Linear[{self.int8_kernel}]"

    def channel_scales(self) -> torch.Tensor:
        return self.w_scale_n

    def kernel_for_rows(self, m: int) -> str:
        """The GEMM the GPU path runs on ``m`` input rows: "int_mm" or "triton" (``int8_kernel="auto"``
        picks by ``INT8_INT_MM_MAX_M``; torch._int_mm needs more than 16 rows, K and N multiples of 8)."""
        if self.int8_kernel != "auto":
            return self.int8_kernel
        fits = 16 < m <= INT8_INT_MM_MAX_M and self.in_features % 8 == 0 and self.out_features % 8 == 0
        return "int_mm" if fits else "triton"

    epilogue_format = "int8"

    def fuses_epilogue(self, rows: int | None = None) -> bool:
        """Triton at these rows (``torch._int_mm`` has no custom epilogue)."""
        triton_rows = self.int8_kernel != "int_mm" if rows is None else self.kernel_for_rows(rows) == "triton"
        return super().fuses_epilogue(rows) and triton_rows

    def codes_gelu_quant(self, xq: torch.Tensor, q_mul: torch.Tensor | None, q_scale: torch.Tensor) -> torch.Tensor:
        return torch.ops.dtq.mm8_gelu_quant(xq, self.weight_int8, self.act_scale, self.w_scale_n, self.bias,
                                            q_mul, q_scale)

    def input_codes(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.int8_codes(x2)

    def codes_gate_residual(self, xq: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor,
                            a_scale: torch.Tensor | None = None) -> torch.Tensor:
        a_scale = self.act_scale if a_scale is None else a_scale  # [M]: per-token codes (ROW_SCALE)
        return torch.ops.dtq.mm8_gate_residual(xq, self.weight_int8, a_scale, self.w_scale_n, self.bias,
                                               gate, residual)

    def quantize_input(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.round(self._balanced_float(x2) / self.act_scale).clamp_(-128, 127).to(torch.int8)

    def kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        xq, a_scale = self.int8_codes(x2)
        return self.codes_forward(xq, x2.dtype, a_scale)

    def codes_forward(self, xq: torch.Tensor, dtype: torch.dtype, a_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The GEMM on INT8 codes of this layer's (balanced) input -> ``dtype``; ``a_scale``: the
        codes' scale, static ``[]`` (default: the layer's) or per row ``[M]`` (dynamic)."""
        a_scale = self.act_scale if a_scale is None else a_scale
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if self.kernel_for_rows(xq.shape[0]) == "int_mm":  # (under torch.compile: a guard on the rows)
            acc = torch._int_mm(xq, self.weight_int8.t())
            out = acc.float() * (a_scale.reshape(-1, 1) * self.w_scale_n)
            if self.bias is not None:
                out = out + self.bias
            return out.to(dtype)
        return torch.ops.dtq.int8_mm(xq, self.weight_int8, a_scale, self.w_scale_n, self.bias,
                                     out_dtype).to(dtype)


class FusedMlp(nn.Module):
    """A DiT MLP (``fc1 -> GELU(tanh) -> fc2``) whose layers share a fused-epilogue family (both INT8 on
    Triton, both two-level W4A8, or both FP8): on the GPU, fc1 runs as a Triton GEMM whose epilogue applies GELU, fc2's run-time
    balancing Mul and fc2's input quantization and writes 8-bit codes, so fc1's output never exists
    in bf16 (one write + read of a 4x-hidden tensor and one elementwise pass fewer per block); fc2
    is the layer's own GEMM on those codes. The arithmetic is the simulation's up to where it rounds:
    fc1's output and the GELU stay in float32 instead of passing through bf16. On the CPU it is
    ``fc2(act(fc1(x)))``, bit-identical to the simulation.

    A per-token INT8 fc2 (``token_quant="pass-fused"``) needs its row's amax before any code, which one
    N tile of fc1 cannot see: fc1 runs its own GEMM (bf16 out) and fc2's quantization pass applies the
    GELU (``gelu_quant_rows_int8``): one pass over the 4x-hidden tensor instead of two, codes and
    per-row scales as the unfused GELU + pass give them."""

    def __init__(self, fc1: EngineLinear, act: nn.Module, fc2: EngineLinear):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    @staticmethod
    def fusable(mlp: nn.Module, formats: tuple[str, ...] = ("int8",)) -> bool:
        fc1, act, fc2 = (getattr(mlp, k, None) for k in ("fc1", "act", "fc2"))
        if FusedMlp.token_fusable(fc1, act, fc2, formats):
            return True
        return (isinstance(fc1, EngineLinear) and isinstance(fc2, EngineLinear)
                and fc1.epilogue_format in formats and fc1.epilogue_format == fc2.epilogue_format
                # kernels with the GELU + quantize epilogue (fc1) and a GEMM on given codes (fc2)
                and callable(getattr(fc1, "codes_gelu_quant", None)) and callable(getattr(fc2, "codes_forward", None))
                and fc1.fuses_epilogue() and fc2.fuses_epilogue()  # a Triton kernel, no low-rank branch
                # static scales: fc1's epilogue sees one N tile of a row, not the row's amax for fc2's
                # input (per-token MLPs: GELU + quantize fused by Inductor, fc2 gated-residual epilogue)
                and fc1.act_granularity == fc2.act_granularity == "tensor"
                and not fc2.input_rotation  # nor a Hadamard rotation of fc2's input (yet)
                and isinstance(act, nn.GELU) and act.approximate == "tanh")

    @staticmethod
    def token_fusable(fc1, act, fc2, formats: tuple[str, ...]) -> bool:
        """A per-token INT8-code fc2 with ``token_quant="pass-fused"`` after any engine fc1: GELU folded
        into fc2's quantization pass."""
        return (isinstance(fc1, EngineLinear) and isinstance(fc2, EngineLinear) and fc2.dynamic
                and fc2.token_quant in ("pass-fused", "gemm", "epilogue") and fc2.act_format == "int8"
                and fc2.epilogue_format in formats and fc2.fuses_epilogue()
                and callable(getattr(fc2, "codes_forward", None)) and not fc2.input_rotation
                and isinstance(act, nn.GELU) and act.approximate == "tanh")

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        if not self.fc1.runs_kernels(x):
            return self.fc2(self.act(self.fc1(x)))
        return self.fused_forward(x)

    def rowquant_fusable(self, rows: int, token_quant: str = "gemm") -> bool:
        """``token_quant`` ("gemm" or "epilogue") for this MLP at ``rows``: both layers INT8 on the Triton GEMM
        (fc1 per token or static), fc2 per token without a low-rank branch or rotation (``token_fusable``);
        "epilogue" also needs one row group of fc1's tiles on the GPU at once (``token_gemm.row_group_fits``)."""
        fc1, fc2 = self.fc1, self.fc2
        if not (fc2.token_quant == token_quant and type(fc1) is Int8Linear and type(fc2) is Int8Linear
                and fc1.act_format == "int8" and fc1.fuses_epilogue(rows) and fc2.fuses_epilogue(rows)):
            return False
        if token_quant == "epilogue":
            from . import token_gemm

            return token_gemm.row_group_fits(fc1.out_features, fc1.weight_int8.device)
        return True

    def _fc1_codes(self, x: torch.Tensor | QuantizedActivation, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fc1's input codes and scale: those of the kernel that produced ``x``, or quantized here."""
        return (x.codes, x.scale) if isinstance(x, QuantizedActivation) else self.fc1.input_codes(x.reshape(rows, -1))

    def fused_forward(self, x: torch.Tensor | QuantizedActivation, gate: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
        """The GPU path (any device that runs the Triton kernels: the tests use the interpreter).
        ``gate`` and ``residual`` given: ``residual + gate.unsqueeze(1) * mlp(x)`` with the add in fc2's
        epilogue (``FusedResidualBlock``). ``x`` may be fc1's input codes from the kernel that produced
        them (:class:`QuantizedActivation`). INT8 with ``int8_kernel="auto"`` at rows where fc1 would run
        on ``torch._int_mm``: unfused."""
        shape = x.shape
        fc1, fc2 = self.fc1, self.fc2
        rows = shape.numel() // shape[-1]
        if fc2.dynamic and self.rowquant_fusable(rows):  # per token, "gemm": no pass over fc1's output
            xq, a_scale = self._fc1_codes(x, rows)
            h, amax = torch.ops.dtq.mm8_gelu_rowmax(xq, fc1.weight_int8, a_scale, fc1.w_scale_n, fc1.bias,
                                                   fc2.input_mul, x.dtype)
            res2 = None if residual is None else residual.reshape(-1, fc2.out_features)
            y = torch.ops.dtq.mm8_rowquant(h, amax, fc2.input_mul, fc2.weight_int8, fc2.w_scale_n, fc2.bias, x.dtype,
                                           gate, res2)
            return y.reshape(*shape[:-1], fc2.out_features) if gate is None else y.reshape(residual.shape)
        if fc2.dynamic:  # per token: fc2's row scales and codes from fc1's epilogue, or from one pass over its output
            # the kernel rounds fc1's output and the GELU to a 16-bit activation type, as the pass sees them
            if self.rowquant_fusable(rows, "epilogue") and x.dtype in (torch.bfloat16, torch.float16):
                xq, a_scale = self._fc1_codes(x, rows)
                codes, scales = torch.ops.dtq.mm8_gelu_token_codes(xq, fc1.weight_int8, a_scale, fc1.w_scale_n, fc1.bias,
                                                                   fc2.input_mul, x.dtype, True)
            else:
                h = fc1(x).reshape(rows, fc1.out_features)
                codes, scales = torch.ops.dtq.gelu_quant_rows_int8(h, fc2.input_mul, fc2.input_mul_pairs)
            if gate is None:
                return fc2.codes_forward(codes, x.dtype, scales).reshape(*shape[:-1], fc2.out_features)
            return fc2.codes_gate_residual(codes, gate, residual.reshape(-1, fc2.out_features),
                                           scales).reshape(residual.shape)
        if not (fc1.fuses_epilogue(rows) and fc2.fuses_epilogue(rows)):
            y = fc2(self.act(fc1(x)))
            return y if gate is None else residual + gate.unsqueeze(1) * y
        xq = x.codes if isinstance(x, QuantizedActivation) else fc1.quantize_input(x.reshape(-1, shape[-1]))
        h = fc1.codes_gelu_quant(xq, fc2.input_mul, fc2.act_scale)
        if gate is None:
            return fc2.codes_forward(h, x.dtype).reshape(*shape[:-1], fc2.out_features)
        return fc2.codes_gate_residual(h, gate, residual.reshape(-1, fc2.out_features)).reshape(residual.shape)


class GeluEpilogueMlp(nn.Module):
    """A DiT MLP (``fc1 -> GELU(tanh) -> fc2``) whose fc1 is a staged W4A16 layer: on the GPU fc1's dense
    GEMM applies bias + GELU in cuBLASLt's epilogue (``Int4Linear.gelu_forward``), so the 4x-hidden tensor
    is written once, by the GEMM, not by the GEMM and then by a GELU kernel that reads it back
    (bf16 torch.compile's MLP: cuBLAS, then Inductor's GELU). The GELU is computed on the float32
    accumulator, one rounding, where the simulation rounds fc1's output first. fc2 is called as it is.
    On the CPU it is ``fc2(act(fc1(x)))``, bit-identical to the simulation."""

    def __init__(self, fc1: "Int4Linear", act: nn.Module, fc2: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    @staticmethod
    def fusable(mlp: nn.Module) -> bool:
        fc1, act, fc2 = (getattr(mlp, k, None) for k in ("fc1", "act", "fc2"))
        return (type(mlp) is Mlp and isinstance(fc1, Int4Linear) and fc1.fuses_gelu()
                and isinstance(act, nn.GELU) and act.approximate == "tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fc1.runs_kernels(x):
            return self.fc2(self.act(self.fc1(x)))
        return self.fc2(self.fc1.gelu_forward(x))


class FusedResidualBlock(DiTBlock):
    """A DiT block with the engine's fusions around its GEMMs. ``proj`` / ``fc2``: the attention proj and
    / or MLP fc2 add the adaLN-gated residual in their GEMM's epilogue (``x + gate * layer(h)`` written
    once, as the new residual stream, instead of the layer's output in bf16 followed by a multiply and
    an add). ``norm``: qkv's and fc1's inputs, ``modulate(LayerNorm(x))``, come as the layer's 8-bit
    codes from one Triton pass (``quantized_input.norm_quantized``) where the layer takes them. Takes
    over the block's submodules (same names, same state); on the CPU its forward is ``DiTBlock``'s,
    bit-identical to the simulation. The arithmetic is the block's up to rounding: the gated add runs
    in float32 before one rounding."""

    def __init__(self, block: DiTBlock, proj: bool, fc2: bool, norm: bool = False):
        nn.Module.__init__(self)
        for name, child in block.named_children():
            self.add_module(name, child)
        self.fuse_proj, self.fuse_fc2, self.fuse_norm = proj, fc2, norm

    @staticmethod
    def fusable(block: nn.Module, formats: tuple[str, ...]) -> tuple[bool, bool]:
        """(proj, fc2): which of the block's two gated residual adds can move into a GEMM epilogue."""
        if type(block) is not DiTBlock or not hasattr(block.attn, "attend"):  # attend: attention before proj
            return False, False
        proj, mlp = block.attn.proj, block.mlp
        fc2 = getattr(mlp, "fc2", None)
        ok = lambda lin: isinstance(lin, EngineLinear) and lin.epilogue_format in formats and lin.fuses_epilogue()  # noqa: E731
        return ok(proj), ok(fc2) and (type(mlp) is Mlp or isinstance(mlp, FusedMlp))  # fc2(act(fc1(h)))

    @staticmethod
    def norm_fusable(block: nn.Module) -> bool:
        """Whether qkv or fc1 can take its input codes from the LayerNorm + modulate pass."""
        if type(block) is not DiTBlock or not hasattr(block.attn, "attend"):
            return False
        layers = (block.attn.qkv, getattr(block.mlp, "fc1", None))
        return any(isinstance(lin, EngineLinear) and lin.norm_codes_format() for lin in layers)

    # runtime.weight_prefetch: the W4A16 weights of this block dequantized ahead (set by fuse_dit_blocks)
    prefetcher = None
    prefetch_index = 0

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        layers = (self.attn.qkv, self.attn.proj, getattr(self.mlp, "fc1", None), getattr(self.mlp, "fc2", None))
        if not next(lin for lin in layers if isinstance(lin, EngineLinear)).runs_kernels(x):
            return super().forward(x, c)
        if self.prefetcher is None:
            return self.fused_forward(x, c)
        self._begin_prefetch(x, c)
        out = self.fused_forward(x, c)
        self._end_prefetch()
        return out

    # eager (graph breaks under the block's torch.compile): the index is read here, not by dynamo, which
    # would guard on each block's integer and recompile per block
    @torch.compiler.disable
    def _begin_prefetch(self, x: torch.Tensor, c: torch.Tensor) -> None:
        self.prefetcher.begin_block(self.prefetch_index, x, c)

    @torch.compiler.disable
    def _end_prefetch(self) -> None:
        self.prefetcher.end_block(self.prefetch_index)

    def block_input(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, norm: nn.Module,
                    layer: nn.Module) -> torch.Tensor | QuantizedActivation:
        """``modulate(norm(x), shift, scale)``, as ``layer``'s input codes where the block fuses it."""
        codes = norm_quantized(x, shift, scale, norm, layer) if self.fuse_norm else None
        return modulate(norm(x), shift, scale) if codes is None else codes

    def fused_forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The GPU path (the tests run it in Triton's interpreter). A layer that cannot fuse at these
        rows (INT8 on ``torch._int_mm``) takes the block's own formula."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        rows = x.numel() // x.shape[-1]
        # the residual stream row-major: DiT's patch embedding hands it over as a transposed view
        # (flatten(2).transpose(1, 2)), a layout the torch adds keep, and the norm pass would copy it
        # twice per block (an H200 profile of the per-token engine: 2 x 256 us per block). A no-op on a
        # row-major stream: after the first block, and in blocks whose proj epilogue writes it
        x = x.contiguous()
        h = self.attn.attend(self.block_input(x, shift_msa, scale_msa, self.norm1, self.attn.qkv))
        proj = self.attn.proj
        if self.fuse_proj and proj.fuses_epilogue(rows):
            x = proj.fused_gate_residual(h, gate_msa, x)
        else:
            x = x + gate_msa.unsqueeze(1) * proj(h)
        mlp = self.mlp
        h = self.block_input(x, shift_mlp, scale_mlp, self.norm2, getattr(mlp, "fc1", None))
        if not self.fuse_fc2:
            return x + gate_mlp.unsqueeze(1) * mlp(h)
        if isinstance(mlp, FusedMlp):
            return mlp.fused_forward(h, gate_mlp, x)
        if mlp.fc2.fuses_epilogue(rows):
            return mlp.fc2.fused_gate_residual(mlp.act(mlp.fc1(h)), gate_mlp, x)
        return x + gate_mlp.unsqueeze(1) * mlp(h)

    def extra_repr(self) -> str:
        prefetch = "" if self.prefetcher is None else f"; W4A16 weights prefetched (block {self.prefetch_index})"
        return (f"fused gated residual: proj={self.fuse_proj}, fc2={self.fuse_fc2}; norm + quantize: {self.fuse_norm}"
                f"{prefetch}")


class Int4Linear(EngineLinear):
    """INT4 weights (per group along C_in, or per channel), packed two per byte; Triton GEMM."""

    def __init__(self, q: QuantLinear, kernel: Kernel = "auto", staged_min_rows: int | None = None):
        super().__init__(q, kernel)
        if q.in_features % 2:
            raise ValueError("INT4 packing needs an even C_in")
        # W4A16 only (the W4A8 group-scale kernel ignores it): from this many rows, dequantize to the
        # activation type once per call and run a dense GEMM (build_qengine's w4a16_staged_rows)
        self.staged_min_rows = staged_min_rows
        from .kernels_ref import pack_int4

        self.register_buffer("weight_packed", pack_int4(q.quantized_weight()))
        gran, g = q.weight_granularity, q.weight_group_size
        n, k = q.out_features, q.in_features
        s = q.weight_scale.float()
        self.group = g if gran == "group" else k
        self.register_buffer("w_scale_groups", (s.reshape(n, k // self.group) if gran != "tensor"
                                                else s.reshape(1, 1).expand(n, 1)).contiguous())
        # the staged weight dequantized ahead of the call by runtime.weight_prefetch (a view into its
        # slot; scratch, not part of the engine's weights) and used while the prefetcher has armed the layer
        self.register_buffer("prefetched_weight", None, persistent=False)
        # a layer whose input is the same for every block (a DiT's adaLN, on the conditioning): its output,
        # computed ahead on the prefetcher's stream from that same input (runtime.weight_prefetch)
        self.register_buffer("prefetched_output", None, persistent=False)
        # the bias in the activation type, made once by the weight prefetch (a cast per call was a kernel
        # of its own on the critical path, 3 per block, at batch 1 under CUDA graphs)
        self.register_buffer("bias_cast", None, persistent=False)
        self.prefetch_armed = False

    def _apply(self, fn, recurse=True):
        """A move drops the prefetched views (they would become copies of their own): the prefetcher remakes them."""
        self._buffers["prefetched_weight"] = self._buffers["prefetched_output"] = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        out = self.prefetched_output
        if self.prefetch_armed and out is not None:  # computed ahead from this input (runtime.weight_prefetch)
            return out
        return super().forward(x)

    def output_into(self, x2: torch.Tensor, out: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``kernel_forward(x2)`` (the W4A16 path) written into ``out``, with the staged ``weight`` given (the
        prefetcher's slot, just filled on its stream) or the INT4 kernel: the same operations, the same numbers."""
        a, b = self._weight_only_input(x2)
        if weight is not None:
            return out.copy_(F.linear(a, weight, b))
        from . import kernels

        res = kernels.w4a16_mm(a, self.weight_packed, self.w_scale_groups, self.group, self.bias,
                               out=out if out.dtype == a.dtype else None)
        return res if res is out else out.copy_(res)

    def fuses_gelu(self) -> bool:
        """Whether the GPU path can apply a following GELU in this layer's GEMM (``gelu_forward`` at staged
        rows): a prefetchable W4A16 layer without an input rotation or a low-rank branch."""
        return self.prefetchable() and not self.input_rotation and self.lowrank_up is None

    def prefetchable(self) -> bool:
        """Whether ``runtime.weight_prefetch`` can dequantize this layer's weight ahead of its call: the
        W4A16 path (not the W4A8 int8-MMA kernel), staged from some row count, K a multiple of 64."""
        return (self.kernel != "reference" and not self.w4a8_kernel() and self.staged_min_rows is not None
                and self.in_features % W4_MIN_K == 0)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The staged weight ``[N, K]`` in ``dtype``: the prefetched one while armed, else unpacked now
        (``q4 * s`` in float32, rounded once to ``dtype``, as the INT4 kernel's tiles)."""
        w = self.prefetched_weight
        if self.prefetch_armed and w is not None and w.dtype == dtype:
            return w
        return torch.ops.dtq.unpack_int4_dequant(self.weight_packed, self.w_scale_groups, self.group, dtype)

    def weight_codes(self) -> torch.Tensor:
        from .kernels_ref import unpack_int4

        return unpack_int4(self.weight_packed)

    def w4a8_kernel(self) -> bool:
        """INT8 activations x INT4 weights on int8 tensor cores: needs K tiles inside one group."""
        return (self.act_format == "int8" and self.in_features % W4_MIN_K == 0
                and self.group % W4_MIN_K == 0)

    def kernel_name(self) -> str:
        if self.kernel == "reference":
            return "reference"
        if self.w4a8_kernel():
            return "Int4Linear[w4a8 int8-MMA]"
        staged = "" if self.staged_min_rows is None else f", dequantized per call from {self.staged_min_rows} rows"
        return f"Int4Linear[w4a16{staged}]"

    @property
    def epilogue_format(self) -> str | None:
        """The W4A8 int8-MMA kernel has the 8-bit GEMMs' gated-residual epilogue as its own family
        "w4a8-group" (not in build_qengine's default fuse_residual: unmeasured on the GPU, opt-in by
        name); it has no GELU + quantize epilogue (its MLPs are not ``FusedMlp``)."""
        return "w4a8-group" if self.w4a8_kernel() else None

    def input_codes(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.int8_codes(x2)

    def codes_gate_residual(self, xq: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor,
                            a_scale: torch.Tensor | None = None) -> torch.Tensor:
        a_scale = self.act_scale if a_scale is None else a_scale  # [M]: per-token codes (ROW_SCALE)
        return torch.ops.dtq.w4a8_gate_residual(xq, self.weight_packed, self.w_scale_groups, self.group, a_scale,
                                                self.bias, gate, residual)

    def kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        out_dtype = x2.dtype if x2.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if self.w4a8_kernel():
            xq, a_scale = self.int8_codes(x2)
            return torch.ops.dtq.w4a8_mm(xq, self.weight_packed, self.w_scale_groups, self.group, a_scale,
                                         self.bias, out_dtype).to(x2.dtype)
        a, b = self._weight_only_input(x2)
        if self.in_features % W4_MIN_K:  # the kernel tiles K by 64: dequantize and use a dense GEMM
            return F.linear(a, self.dequantized_weight().to(a.dtype), b).to(x2.dtype)
        if self.staged(a.shape[0]):  # the dequantized weight and cuBLAS
            return F.linear(a, self.dense_weight(a.dtype), b).to(x2.dtype)
        return torch.ops.dtq.w4a16_mm(a, self.weight_packed, self.w_scale_groups, self.group, self.bias).to(x2.dtype)

    def _weight_only_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The W4A16 path's GEMM input (balanced; W4A8 without its kernel: fake-quantized) in bf16 / fp16,
        and the bias in that type."""
        half = x2.dtype in (torch.bfloat16, torch.float16)
        if half and self.input_mul is None and self.act_format == "none":
            a = x2  # W4A16 without balancing: x2.float().to(x2.dtype) would be x2 again, one kernel later
        else:
            xf = self._balanced_float(x2)
            if self.act_format != "none":  # W4A8 without the kernel: activation fake-quant, weight-only GEMM
                xf = quant.fake_quant_act(xf, self.act_scale, self.act_format, self.act_granularity)
            a = xf.to(x2.dtype if half else torch.bfloat16)
        cast = self.bias_cast
        if cast is not None and cast.dtype == a.dtype:
            return a, cast
        return a, None if self.bias is None else self.bias.to(a.dtype)

    def gelu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``GELU_tanh(self(x))`` on the GPU path (:class:`GeluEpilogueMlp`'s fc1): at staged rows one dense
        GEMM with bias + GELU in cuBLASLt's epilogue (``dtq::linear_gelu_tanh``), so the 4x-hidden tensor is
        written once, by the GEMM, instead of by the GEMM and again by a GELU kernel; else the layer then GELU."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.fuses_gelu() and self.staged(x2.shape[0]):
            a, b = self._weight_only_input(x2)
            out = torch.ops.dtq.linear_gelu_tanh(a, self.dense_weight(a.dtype), b).to(x2.dtype)
            return out.reshape(*shape[:-1], self.out_features)
        return F.gelu(self(x), approximate="tanh")


class Int4ProgressiveLinear(EngineLinear):
    """W4A8 with two-level INT4 weights (QServe's progressive quantization, symmetric): the recipe's
    INT4 weight (its dequantized simulation weight) is requantized at build time to
    ``s1[n] * s2[n, g] * q4`` with integer ``s2`` in [1, 16] (``quant.progressive_int4``), so the GPU
    kernel unpacks ``q4 * s2`` to exact int8 in registers and accumulates int8 MMAs in int32 over the
    whole K; one float epilogue applies ``a_scale * s1[n]`` and the bias. The weights differ from the
    simulation's by that requantization (layer weight SQNR vs the simulation: docs/engines.md); the
    CPU / reference path computes with the requantized weight, so it is this engine's exact reference."""

    def __init__(self, q: QuantLinear, kernel: Kernel = "auto", staged_min_rows: int | None = None):
        super().__init__(q, kernel)
        if not self.eligible(q):
            raise ValueError(f"two-level W4A8 needs INT4 weights, INT8 activations and C_in % {W4_MIN_K} == 0")
        # from this many input rows on, q4 * s2 is unpacked to int8 once per call and the INT8 GEMM runs
        # (same int32 sums, same epilogue, same output); None: always unpacked in the GEMM's registers
        self.staged_min_rows = staged_min_rows
        from .kernels_ref import pack_int4

        self.group = q.weight_group_size if q.weight_granularity == "group" else q.in_features
        q4, s1, s2 = quant.progressive_int4(q.fake_quant_weight().detach().float(), self.group)
        self.register_buffer("weight_packed", pack_int4(q4))
        self.register_buffer("w_s1", s1)
        self.register_buffer("w_s2", s2.contiguous())

    @staticmethod
    def eligible(q: QuantLinear) -> bool:
        """INT4 weights x INT8 activations, static or per token, ``C_in % 64 == 0`` (any group size:
        a group smaller than the K tile loads its integer scales per K row)."""
        return q.weight_format == "int4" and q.act_format == "int8" and q.in_features % W4_MIN_K == 0

    def weight_codes(self) -> torch.Tensor:
        from .kernels_ref import unpack_int4

        return unpack_int4(self.weight_packed)

    def dequantized_weight(self) -> torch.Tensor:
        return quant.dequantize_progressive(self.weight_codes(), self.w_s1, self.w_s2)

    def kernel_name(self) -> str:
        staged = "" if self.staged_min_rows is None else f", staged to int8 from {self.staged_min_rows} rows"
        return "reference" if self.kernel == "reference" else f"Int4ProgressiveLinear[w4a8 int8-MMA, int32 over K{staged}]"

    def int8_weight(self) -> torch.Tensor:
        """``q4 * s2`` as int8 ``[N, K]`` (a temporary of the call; the layer keeps 4-bit weights)."""
        return torch.ops.dtq.unpack_progressive_int8(self.weight_packed, self.w_s2, self.group)

    epilogue_format = "w4a8"

    def quantize_input(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.round(self._balanced_float(x2) / self.act_scale).clamp_(-128, 127).to(torch.int8)

    def kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        xq, a_scale = self.int8_codes(x2)
        return self.codes_forward(xq, x2.dtype, a_scale)

    def codes_forward(self, xq: torch.Tensor, dtype: torch.dtype, a_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The GEMM on INT8 codes of this layer's (balanced) input -> ``dtype``; ``a_scale``: the
        codes' scale, static ``[]`` (default: the layer's) or per row ``[M]`` (dynamic)."""
        a_scale = self.act_scale if a_scale is None else a_scale
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if self.staged(xq.shape[0]):
            return torch.ops.dtq.int8_mm(xq, self.int8_weight(), a_scale, self.w_s1, self.bias, out_dtype).to(dtype)
        return torch.ops.dtq.w4a8_progressive_mm(xq, self.weight_packed, self.w_s2, self.group, self.w_s1,
                                                 a_scale, self.bias, out_dtype).to(dtype)

    def codes_gelu_quant(self, xq: torch.Tensor, q_mul: torch.Tensor | None, q_scale: torch.Tensor) -> torch.Tensor:
        if self.staged(xq.shape[0]):
            return torch.ops.dtq.mm8_gelu_quant(xq, self.int8_weight(), self.act_scale, self.w_s1, self.bias,
                                                q_mul, q_scale)
        return torch.ops.dtq.w4a8_progressive_gelu_quant(xq, self.weight_packed, self.w_s2, self.group, self.w_s1,
                                                         self.act_scale, self.bias, q_mul, q_scale)

    def input_codes(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.int8_codes(x2)

    def codes_gate_residual(self, xq: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor,
                            a_scale: torch.Tensor | None = None) -> torch.Tensor:
        a_scale = self.act_scale if a_scale is None else a_scale  # [M]: per-token codes (ROW_SCALE)
        if self.staged(xq.shape[0]):
            return torch.ops.dtq.mm8_gate_residual(xq, self.int8_weight(), a_scale, self.w_s1, self.bias, gate,
                                                   residual)
        return torch.ops.dtq.w4a8_progressive_gate_residual(xq, self.weight_packed, self.w_s2, self.group, self.w_s1,
                                                            a_scale, self.bias, gate, residual)


class Int8WeightOnlyLinear(EngineLinear):
    """INT8 weight-only (W8A16): int8 codes (half the bf16 weight memory), per-channel or per-tensor
    scale applied to the GEMM's output. The CUDA path converts the codes to the activation type per
    call and runs a dense GEMM (no fused weight-only kernel yet: memory, not speed)."""

    def __init__(self, q: QuantLinear, kernel: Kernel = "auto"):
        super().__init__(q, kernel)
        if q.weight_granularity == "group":
            raise ValueError("INT8 weights take per-tensor or per-channel scales")
        self.register_buffer("weight_int8", q.quantized_weight().contiguous())  # [N, K]
        self.register_buffer("w_scale_n", _per_channel(q.weight_scale.float(), q.out_features))

    def weight_codes(self) -> torch.Tensor:
        return self.weight_int8

    def kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        a = self._balanced_float(x2).to(x2.dtype if x2.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16)
        out = F.linear(a, self.weight_int8.to(a.dtype)).float() * self.w_scale_n
        if self.bias is not None:
            out = out + self.bias
        return out.to(x2.dtype)


W4A8Kernel = Literal["group", "progressive"]
W4A8_KERNELS: tuple[str, ...] = typing.get_args(W4A8Kernel)

# one engine layer per quantized precision of the table (dtq.formats.PRECISIONS); w4a8 may instead
# take Int4ProgressiveLinear (build_qengine(w4a8="progressive"))
ENGINE_LAYERS = {"fp8": FP8Linear, "int8": Int8Linear, "w8a16": Int8WeightOnlyLinear,
                 "w4a16": Int4Linear, "w4a8": Int4Linear}
assert set(ENGINE_LAYERS) == set(formats.QUANTIZED_PRECISIONS), "a precision without an engine layer"


def engine_layer(q: QuantLinear, kernel: Kernel = "auto", int8_kernel: str = "auto",
                 w4a8: W4A8Kernel = "group", w4a8_staged_rows: int | None = W4A8_STAGED_MIN_ROWS,
                 w4a16_staged_rows: int | None = W4A16_STAGED_MIN_ROWS) -> EngineLinear:
    """The engine layer of ``q``'s precision (each layer its own: mixed recipes work)."""
    if w4a8 == "progressive" and Int4ProgressiveLinear.eligible(q):
        return Int4ProgressiveLinear(q, kernel, w4a8_staged_rows)
    check_w4a8_kernel(w4a8)
    precision = formats.precision_of(q.weight_format, q.act_format)
    cls = ENGINE_LAYERS.get(precision)
    if cls is None:
        raise ValueError(f"no engine layer for precision {precision}; supported: {', '.join(ENGINE_LAYERS)}")
    if cls is Int8Linear:
        return cls(q, kernel, int8_kernel)
    return cls(q, kernel, w4a16_staged_rows) if cls is Int4Linear else cls(q, kernel)


# The epilogue families whose GEMMs take the fused epilogues by default. FP8 joined once its epilogue
# math was cheap (issue #13, session 13, H200, DiT-XL/2, 50 steps with guidance): the fused Triton FP8
# engine ran 27.68 img/s at batch 64, 20.31 at 8 and 7.22 at 1, where cuBLAS + Inductor's ran 24.09,
# 16.42 and 4.90 (benchmarks/results/speed/bench_speed_h200_s13{b,c}_edde009.json).
# "w4a16": a staged W4A16 fc1 applies GELU in cuBLASLt's epilogue (GeluEpilogueMlp; fuse_mlp only, W4A16 has
# no gated-residual epilogue).
FUSED_FAMILIES: tuple[str, ...] = ("int8", "w4a8", "fp8", "w4a16")


def build_qengine(model: nn.Module, recipe: Recipe, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, kernel: Kernel = "auto", int8_kernel: str = "auto",
                  fuse_mlp: tuple[str, ...] = FUSED_FAMILIES, w4a8: W4A8Kernel = "group",
                  fuse_residual: tuple[str, ...] = FUSED_FAMILIES, attention: AttentionBackend = "sdpa",
                  token_quant: TokenQuant = DEFAULT_TOKEN_QUANT, gelu: GeluForm = "tanh",
                  w4a8_staged_rows: int | None = W4A8_STAGED_MIN_ROWS,
                  w4a16_staged_rows: int | None = W4A16_STAGED_MIN_ROWS, w4a16_prefetch: bool = True,
                  fuse_norm: bool = True, check: bool = True) -> nn.Module:
    """The engine for ``recipe`` (``model`` is not modified). ``dtype``: the activations' and the
    unquantized layers' type (default: bf16 on CUDA, float32 on the CPU, where the engine is
    bit-identical to ``apply_recipe(model, recipe)``). ``fuse_mlp``: the epilogue families ("int8",
    "w4a8" = two-level W4A8, "fp8") whose MLPs become :class:`FusedMlp` (GELU + fc2's input
    quantization in fc1's GEMM epilogue). ``fuse_residual``: the families whose attention proj / MLP
    fc2 add the block's adaLN-gated residual in their GEMM epilogue (:class:`FusedResidualBlock`);
    "w4a8-group" (the group-scale W4A8 kernel's, unmeasured on the GPU) only when named. Both default
    to :data:`FUSED_FAMILIES`; a fused FP8 block runs the Triton FP8 GEMM instead of cuBLAS's.
    ``()`` for both: every epilogue unfused (the benchmark's ablation). ``fuse_norm``: qkv's and fc1's
    8-bit input codes come from one Triton pass over the residual stream (LayerNorm + modulate + the
    layer's quantizer, ``kernels.norm_quant``; static INT8 / FP8 and per-token INT8) instead of torch
    ops and the layer's own quantizer (:class:`FusedResidualBlock`). ``w4a8``: "group" runs W4A8 layers with the
    recipe's float group scales (bit-identical to the simulation on the CPU); "progressive"
    requantizes them to two-level INT4 (:class:`Int4ProgressiveLinear`: integer group scales, int32
    accumulation over the whole K), which changes the weights slightly; ``w4a8_staged_rows``: from how
    many input rows its layers unpack ``q4 * s2`` to int8 once per call and run the INT8 GEMM (None:
    never; :data:`W4A8_STAGED_MIN_ROWS`); ``w4a16_staged_rows``: the same for W4A16 layers (dequantized to
    the activation type once per call, then a dense GEMM; :data:`W4A16_STAGED_MIN_ROWS`; None: the INT4
    Triton kernel); ``w4a16_prefetch``: a DiT's staged W4A16 token-stream layers (qkv, proj, fc1, fc2) get
    their weight dequantized one block ahead on a side stream (``runtime.weight_prefetch``) instead of
    inside the layer. ``attention``: the blocks'
    attention kernel (``runtime.attention``): "sdpa" (torch's, bf16 flash / cuDNN on the GPU) or
    "sage" (SageAttention's INT8 QK^T / fp16 PV, head dim zero-padded to 64 / 96 / 128; on the CPU
    its torch reference). ``token_quant`` (:data:`TokenQuant`): per-token INT8 layers' quantizer and
    epilogues, "pass" (the Triton pass, also under compile; no fused epilogue), "inductor"
    (torch ops fused by Inductor under compile, its ``TOKEN_INDUCTOR_OPTIONS``, the gated-residual
    epilogue of the families in ``fuse_residual``) or "pass-fused" (the Triton pass, fc2's GELU inside
    fc2's pass for the families in ``fuse_mlp``, the gated-residual epilogue with per-row scales for
    those in ``fuse_residual``) or "epilogue" (the default, :data:`DEFAULT_TOKEN_QUANT`: as "pass-fused",
    but an all-INT8 MLP's fc1 writes fc2's per-token codes) or "gemm" (an ablation); static layers ignore it.

    ``kernel``: "auto" (the GPU path on CUDA inputs, the simulation's operations on the CPU),
    "reference" (the simulation's operations everywhere) or "gpu" (the GPU path on any device: on the
    CPU the Triton kernels run in Triton's interpreter, ``TRITON_INTERPRET=1``; what the tests use).

    ``fuse_mlp``, ``fuse_residual`` and ``attention`` rewrite DiT blocks: a model of another family
    (its adapter's ``family``, e.g. PixArt) gets its engine layers only and runs unfused, and
    ``attention="sage"`` is refused for it (its own attention code runs)."""
    check_backend(attention)
    check_token_quant(token_quant)
    check_gelu_form(gelu)
    family = adapter_for(model).family
    if family != "dit" and attention != "sdpa":
        raise ValueError(f"attention={attention!r} replaces DiT attention; a {family} engine runs its model's "
                         "own attention (use sdpa)")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda" and kernel != "reference":
        from . import kernel_ops  # noqa: F401  (registers torch.ops.dtq.*; needs triton)
    engine = apply_recipe(model, recipe, check=check)
    fp8_scaling = probe_rowwise(device) if device.type == "cuda" else "tensorwise"
    swap_engine_layers(engine, recipe, kernel=kernel, int8_kernel=int8_kernel, w4a8=w4a8, fp8_scaling=fp8_scaling,
                       token_quant=token_quant, w4a8_staged_rows=w4a8_staged_rows,
                       w4a16_staged_rows=w4a16_staged_rows)
    if family == "dit":
        fuse_dit_blocks(engine, fuse_mlp=fuse_mlp, fuse_residual=fuse_residual, attention=attention,
                        fuse_norm=fuse_norm, w4a16_prefetch=w4a16_prefetch)
    use_gelu(engine, gelu)
    return engine.to(device=device, dtype=dtype).eval()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def check_w4a8_kernel(w4a8: str) -> None:
    if w4a8 not in W4A8_KERNELS:
        raise ValueError(f"w4a8 kernel must be one of {', '.join(W4A8_KERNELS)}, got {w4a8!r}")


def check_token_quant(token_quant: str) -> None:
    if token_quant not in TOKEN_QUANTS:
        raise ValueError(f"token_quant must be one of {', '.join(TOKEN_QUANTS)}, got {token_quant!r}")


def swap_engine_layers(sim: nn.Module, recipe: Recipe, *, kernel: Kernel = "auto", int8_kernel: str = "auto",
                       w4a8: W4A8Kernel = "group", fp8_scaling: str = "tensorwise",
                       token_quant: TokenQuant = DEFAULT_TOKEN_QUANT, w4a8_staged_rows: int | None = W4A8_STAGED_MIN_ROWS,
                       w4a16_staged_rows: int | None = W4A16_STAGED_MIN_ROWS) -> nn.Module:
    """Replace each quantized recipe layer of the simulated model ``sim`` (``apply_recipe``'s
    ``QuantLinear`` at the layer's name) by its engine layer, in place; returns ``sim``. Model-family
    agnostic: the names are the recipe's, which calibration took from the model adapter's quantizable
    Linears. Balancing-only layers (weight format "none": a run-time Mul before an FP Linear) stay.
    ``token_quant``: :data:`TokenQuant`, recorded on every engine layer (per-token layers act on it);
    ``w4a8_staged_rows`` / ``w4a16_staged_rows``: ``staged_min_rows`` of the two-level W4A8 / the W4A16 layers."""
    check_token_quant(token_quant)
    for name in recipe.layers:
        q = sim.get_submodule(name)
        if not isinstance(q, QuantLinear):
            raise TypeError(f"{name}: expected the simulation's QuantLinear, found {type(q).__name__}")
        if q.weight_format == "none":
            continue
        layer = engine_layer(q, kernel, int8_kernel, w4a8, w4a8_staged_rows, w4a16_staged_rows)
        layer.token_quant = token_quant
        if isinstance(layer, FP8Linear):
            layer.scaling = fp8_scaling
        _set_submodule(sim, name, layer)
    return sim


def fuse_dit_blocks(engine: nn.Module, *, fuse_mlp: tuple[str, ...] = FUSED_FAMILIES,
                    fuse_residual: tuple[str, ...] = FUSED_FAMILIES,
                    attention: AttentionBackend = "sdpa", fuse_norm: bool = True,
                    w4a16_prefetch: bool = True) -> nn.Module:
    """The DiT-only rewrites of an engine, in place: MLPs to :class:`FusedMlp` (or, a staged W4A16 fc1,
    :class:`GeluEpilogueMlp`), the attention backend, blocks to :class:`FusedResidualBlock`, and the W4A16
    weight prefetcher (``build_qengine`` documents the arguments)."""
    if fuse_mlp:
        for name, mlp in list(engine.named_modules()):
            if FusedMlp.fusable(mlp, tuple(fuse_mlp)):
                _set_submodule(engine, name, FusedMlp(mlp.fc1, mlp.act, mlp.fc2))
            elif "w4a16" in fuse_mlp and GeluEpilogueMlp.fusable(mlp):
                _set_submodule(engine, name, GeluEpilogueMlp(mlp.fc1, mlp.act, mlp.fc2))
    use_attention(engine, attention)  # before the blocks are fused: theirs is the attention they call
    for name, block in list(engine.named_modules()):
        proj, fc2 = FusedResidualBlock.fusable(block, tuple(fuse_residual))
        norm = fuse_norm and FusedResidualBlock.norm_fusable(block)
        prefetch = w4a16_prefetch and bool(prefetched_layers(block))
        if proj or fc2 or norm or prefetch:
            _set_submodule(engine, name, FusedResidualBlock(block, proj, fc2, norm))
    if w4a16_prefetch:
        use_weight_prefetch(engine)
    return engine


def prefetched_layers(block: nn.Module) -> list[Int4Linear]:
    """A DiT block's layers whose staged W4A16 weight ``runtime.weight_prefetch`` dequantizes ahead: adaLN,
    qkv, proj, fc1, fc2 (in the order the block calls them)."""
    if not (type(block) is DiTBlock or isinstance(block, FusedResidualBlock)) or not hasattr(block.attn, "attend"):
        return []
    layers = (block.adaLN_modulation[-1], block.attn.qkv, block.attn.proj, getattr(block.mlp, "fc1", None),
              getattr(block.mlp, "fc2", None))
    return [lin for lin in layers if isinstance(lin, Int4Linear) and lin.prefetchable()]


def use_weight_prefetch(engine: nn.Module) -> WeightPrefetcher | None:
    """One :class:`~runtime.weight_prefetch.WeightPrefetcher` for a DiT engine's blocks (in the order
    its forward runs them) that have staged W4A16 layers; each such block (a :class:`FusedResidualBlock`)
    arms it around its forward. Returns it, or None when no block has such a layer."""
    blocks = [b for b in getattr(engine, "blocks", ()) if isinstance(b, FusedResidualBlock) and prefetched_layers(b)]
    if not blocks:
        return None
    prefetcher = WeightPrefetcher([prefetched_layers(b) for b in blocks],
                                  per_sample=tuple(b.adaLN_modulation[-1] for b in blocks))
    for i, block in enumerate(blocks):  # the prefetcher's index: among the blocks it serves, in order
        block.prefetcher, block.prefetch_index = prefetcher, i
    return prefetcher


def engine_layers(model: nn.Module) -> dict[str, EngineLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, EngineLinear)}


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights: the quantized layers' codes + scales, the rest of the model's parameters."""
    layers = engine_layers(model)
    q = sum(m.weight_bytes() for m in layers.values())
    seen = {id(b) for m in layers.values() for b in m.buffers()}
    rest = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) if id(t) not in seen)
    return {"quantized_layers": q, "other": rest, "total": q + rest}
