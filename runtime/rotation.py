"""Block-diagonal normalized Hadamard rotation of a Linear's input (QuaRot / ViDiT-Q style).

``y = W x = (W B^T)(B x)`` for any orthonormal ``B``. With ``B = diag(H_k, ..., H_k)`` (``H_k`` the
normalized Sylvester Hadamard matrix of size ``k = 2^m``, entries ``+-1/sqrt(k)``) the rotated
input ``B x`` spreads a channel outlier over its ``k``-channel block, so a per-tensor activation
scale wastes fewer levels; ``W B^T`` is folded into the weight offline and ``B x`` runs online.

In row-vector form (activations ``[..., C]``, weights ``[C_out, C]``) both are the same operation,
:func:`rotate`: each ``k``-segment of the last axis times ``H_k^T``. One function for the online
rotation and the weight fold keeps the simulation, the ONNX initializers and the engine on the
same float32 numbers.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

DEFAULT_MAX_BLOCK = 512


def _check_block(k: int) -> None:
    if k < 2 or k & (k - 1):
        raise ValueError(f"Hadamard block size must be a power of two >= 2, got {k}")


@functools.lru_cache(maxsize=16)
def _hadamard64(k: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < k:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def hadamard(k: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The normalized ``k x k`` Hadamard matrix (orthonormal and symmetric), built in float64."""
    _check_block(k)
    return _hadamard64(k).to(device=device, dtype=dtype)


def block_size(in_features: int, max_block: int = DEFAULT_MAX_BLOCK) -> int:
    """The largest power of two dividing ``in_features``, capped at ``max_block`` (DiT-S/2's
    1536 and DiT-XL/2's 4608 hidden MLP widths: 512; the tiny model's 512: 512)."""
    _check_block(max_block)
    k = in_features & -in_features  # lowest set bit
    k = min(k, max_block)
    if k < 2:
        raise ValueError(f"{in_features} input channels: no power-of-two Hadamard block >= 2 divides it")
    return k


def rotate(x: torch.Tensor, k: int, h: torch.Tensor | None = None) -> torch.Tensor:
    """Each ``k``-segment of the last axis times ``H_k^T`` (in ``x``'s dtype): the online rotation of
    an input ``[..., C]`` and, applied to ``W [C_out, C]``, the folded weight ``W B^T``. ``h``: the
    matrix already on ``x``'s device (an engine layer's buffer), so that a CUDA-graph capture or a
    compiled graph makes no host-to-device copy."""
    c = x.shape[-1]
    if c % k:
        raise ValueError(f"last axis {c} is not a multiple of the Hadamard block {k}")
    h = hadamard(k, x.dtype, x.device) if h is None else h.to(device=x.device, dtype=x.dtype)
    return (x.reshape(*x.shape[:-1], c // k, k) @ h.T).reshape(x.shape)


def rotated_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input a layer's quantizer sees before any balancing ``Mul``: rotated when the layer has an
    ``input_rotation`` (hooks of statistics and GPTQ read the raw input of the Linear), with the
    layer's own ``rotation_matrix`` buffer where it has one (``QuantLinear``, engine layers)."""
    k = getattr(module, "input_rotation", None)
    return x if not k else rotate(x, k, getattr(module, "rotation_matrix", None))
