"""An activation quantized by the kernel that produced it, handed to the engine layer that consumes it.

A DiT block's qkv and fc1 read ``modulate(LayerNorm(x), shift, scale)``. Computed by torch ops and
then quantized by the layer, that is a bf16 tensor written and read again, or (under
``torch.compile``) one Inductor kernel: 179 us at 32768 x 1152 on an H200, where the same LayerNorm +
modulate writing bf16 took 131 us (docs/engines.md, issue #13). :func:`norm_quantized` computes the layer's 8-bit input
codes (static INT8 / FP8, or per-token INT8 with its row scales) in one Triton pass
(``kernels.norm_quant``) and returns a :class:`QuantizedActivation`, which an engine layer's
``forward`` takes in place of a tensor: its GEMM then runs on the codes (``codes_forward``). The
model's code (``Attention.attend``, ``Mlp.forward``) passes it on unchanged: it has the ``shape`` of
the activation it stands for.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class QuantizedActivation(NamedTuple):
    """The 8-bit codes ``[M, K]`` of an activation of shape ``shape`` (``[..., K]``, M rows), their scale
    (``[]`` static, ``[M]`` per token) and the activation's dtype (the consuming GEMM's output type)."""

    codes: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype


def norm_quantized(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, norm: nn.Module,
                   layer: nn.Module) -> QuantizedActivation | None:
    """``layer``'s input codes of ``modulate(norm(x), shift, scale)`` from one Triton pass, or None where
    that pass does not apply: ``norm`` is not a LayerNorm without affine over the last axis, or
    ``layer`` takes no such codes (``EngineLinear.norm_codes_format``: a reference-path layer, a
    low-rank branch or input rotation, a format without 8-bit activation codes)."""
    fmt = getattr(layer, "norm_codes_format", lambda: None)()
    if (fmt is None or not isinstance(norm, nn.LayerNorm) or norm.weight is not None or norm.bias is not None
            or tuple(norm.normalized_shape) != (x.shape[-1],) or x.dim() != 3):
        return None
    if fmt == "int8-token":
        codes, s = torch.ops.dtq.norm_quant_rows_int8(x, shift, scale, norm.eps, layer.input_mul)
    else:
        codes, s = torch.ops.dtq.norm_quant(x, shift, scale, norm.eps, layer.input_mul, layer.act_scale, fmt), \
            layer.act_scale
    return QuantizedActivation(codes, s, x.shape, x.dtype)
