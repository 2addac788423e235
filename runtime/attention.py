"""Attention backends for the quantized PyTorch engine (issue #13): which kernel computes a DiT
block's ``softmax(q k^T / sqrt(d)) v``.

- ``"sdpa"``: ``F.scaled_dot_product_attention`` (flash / cuDNN on the GPU), the model's own op.
- ``"sage"``: SageAttention 1.0.6 (``pip install sageattention==1.0.6``; pure Triton, CUDA only):
  ``k`` smoothed by subtracting its mean over the tokens (softmax is unchanged: ``q . mean(k)`` is
  one constant per query row), ``q`` (pre-multiplied by ``sm_scale * log2 e``) quantized to int8
  per block of 128 tokens and ``k`` per block of 64 tokens (scale ``amax / 127``, round half away
  from zero), ``q k^T`` on int8 tensor cores rescaled by the two block scales, online softmax in
  base 2, ``P V`` with fp16 ``P`` and ``V`` and fp16 accumulation inside each 64-token block.

SageAttention's kernels take head dims 64 / 96 / 128 only. Other head dims (DiT-XL/2: 72) are
zero-padded to the next one: zero columns of ``q`` and ``k`` add nothing to ``q . k``, zero columns
of ``v`` give zero output columns that are sliced away. The softmax scale is passed explicitly as
``1 / sqrt(72)``: the library's default would be ``1 / sqrt(96)`` of the padded width.

On the CPU (and for tests) :func:`sage_attention_reference` computes the same scheme in torch; the
GPU path calls the library through the custom op ``torch.ops.dtq.sage_attention_padded`` (opaque to
``torch.compile``, captured by CUDA graphs), with the smoothing and padding left to torch (compiled,
they fuse into the ops around the attention).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionBackend = Literal["sdpa", "sage"]
ATTENTION_BACKENDS = ("sdpa", "sage")
SAGE_HEAD_DIMS = (64, 96, 128)  # what sageattention 1.0.6's kernels take
SAGE_BLOCK_Q, SAGE_BLOCK_K = 128, 64  # tokens per q / k quantization block (its kernels' tiles)
SAGE_INSTALL = "pip install sageattention==1.0.6"
LOG2E = 1.44269504  # the constant sageattention folds into q's scale (its softmax uses exp2)


def check_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    return backend


def sage_head_dim(d: int) -> int:
    """The head dim sageattention computes ``d`` at: the smallest of 64 / 96 / 128 that holds it."""
    for width in SAGE_HEAD_DIMS:
        if d <= width:
            return width
    raise ValueError(f"sageattention takes head dims up to {SAGE_HEAD_DIMS[-1]}, got {d}")


def pad_head_dim(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` with its last dim zero-padded to ``width``: a new contiguous tensor, also when no padding is needed."""
    d = x.shape[-1]
    return F.pad(x, (0, width - d)) if width > d else x.clone(memory_format=torch.contiguous_format)


def smooth_k(k: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """``k`` minus its mean over the tokens (per batch and head): shrinks the int8 range k needs
    (DiT keys share a large common component) without changing softmax(q k^T)."""
    return k - k.mean(dim=seq_dim, keepdim=True)


def quantize_per_block(x: torch.Tensor, block: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """sageattention's per-block int8 quantization of ``x * scale`` (``[B, H, N, D]``): one scale
    ``amax / 127`` per ``block`` tokens of each (batch, head), codes rounded half away from zero.
    Returns int8 codes ``[B, H, N, D]`` and float32 scales ``[B, H, ceil(N / block), 1]``, the
    kernel's layouts."""
    b, h, n, d = x.shape
    nblk = -(-n // block)
    xf = F.pad(x.float() * scale, (0, 0, 0, nblk * block - n))  # the kernel's masked rows read as 0
    blocks = xf.reshape(b, h, nblk, block, d)
    s = blocks.abs().amax(dim=(-2, -1), keepdim=True) / 127.0
    y = blocks / s
    codes = (y + 0.5 * torch.where(y >= 0, 1.0, -1.0)).trunc().to(torch.int8)  # round half away from 0
    return codes.reshape(b, h, nblk * block, d)[:, :, :n], s.reshape(b, h, nblk, 1)


def sage_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             sm_scale: float | None = None) -> torch.Tensor:
    """SageAttention 1.0.6's arithmetic in torch (``[B, H, N, D]`` in, ``q``'s dtype out; any head
    dim, non-causal): smoothed ``k``, per-block int8 ``q`` / ``k``, exact integer ``q k^T`` rescaled by
    the block scales (log2 domain), online softmax over 64-token blocks with ``P`` and ``V`` in fp16
    and each block's ``P V`` rounded to fp16 (the kernel accumulates it in fp16), float32 running sums."""
    d = q.shape[-1]
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    qi, qs = quantize_per_block(q, SAGE_BLOCK_Q, sm_scale * LOG2E)
    ki, ks = quantize_per_block(smooth_k(k.float(), seq_dim=2), SAGE_BLOCK_K)
    n_q, n_k = q.shape[2], k.shape[2]
    qs_rows = qs.repeat_interleave(SAGE_BLOCK_Q, dim=2)[:, :, :n_q]  # [B, H, N, 1]: each token's block scale
    qf = qi.float()
    v16 = v.to(torch.float16)
    m = torch.full(q.shape[:3] + (1,), -math.inf, dtype=torch.float32, device=q.device)
    l = torch.zeros_like(m)  # noqa: E741
    acc = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=torch.float32, device=q.device)
    for j, start in enumerate(range(0, n_k, SAGE_BLOCK_K)):
        stop = min(start + SAGE_BLOCK_K, n_k)
        # |integer dot| <= 127^2 * D < 2^24 for D <= 1040: exact in float32
        s = (qf @ ki[:, :, start:stop].float().transpose(-1, -2)) * qs_rows * ks[:, :, j:j + 1, :].transpose(-1, -2)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        p = torch.exp2(s - m_new)
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(dim=-1, keepdim=True)  # noqa: E741
        pv = (p.to(torch.float16).float() @ v16[:, :, start:stop].float()).to(torch.float16)
        acc = acc * alpha + pv.float()
        m = m_new
    return (acc / l).to(q.dtype)


def _import_sageattn():
    """``sageattention.sageattn``, or :class:`dtq.extras.MissingExtra` (the CLIs' exit 2) naming the install."""
    from ..extras import MissingExtra

    try:
        from sageattention import sageattn
    except ImportError as exc:
        raise MissingExtra(f"sageattention is not installed (attention='sage' on CUDA): {SAGE_INSTALL} "
                           f"(or pip install 'dtq[sage]'; pure Python, needs triton)") from exc
    return sageattn


@torch.library.custom_op("dtq::sage_attention_padded", mutates_args=())
def sage_attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """sageattention on ``[B, N, H, Dp]`` inputs of one dtype, already padded to a head dim it takes,
    ``k`` already smoothed; output ``[B, N, H, Dp]`` in ``q``'s dtype."""
    sageattn = _import_sageattn()
    # smooth_k=False: done outside (sageattn's own smoothing subtracts in place from its input)
    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=sm_scale, smooth_k=False)


@sage_attention_padded.register_fake
def _(q, k, v, sm_scale):
    return torch.empty_like(q)


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """SageAttention on ``[B, N, H, D]`` (the layout qkv's output reshapes to) -> ``[B, N, H, D]``:
    the library's kernels on CUDA (:func:`sage_attention_library`), its torch reference on the CPU."""
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    if not q.is_cuda:
        hnd = lambda t: t.transpose(1, 2)  # noqa: E731
        return hnd(sage_attention_reference(hnd(q), hnd(k), hnd(v), sm_scale))
    return sage_attention_library(q, k, v, sm_scale)


def sage_attention_library(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """sageattention for any head dim <= 128 (``[B, N, H, D]``): smooth k, zero-pad q / k / v to the
    kernel's head dim, call it with the softmax scale of the true head dim, slice the padding away."""
    if not torch.compiler.is_compiling():  # (traced: checked when the graph was built, no import in the graph)
        _import_sageattn()  # the install message before any work
    d = q.shape[-1]
    width = sage_head_dim(d)
    qp = pad_head_dim(q, width)
    kp = pad_head_dim(smooth_k(k, seq_dim=1), width)
    vp = pad_head_dim(v, width)  # q's dtype: sageattn asserts one dtype and casts v to fp16 itself
    return torch.ops.dtq.sage_attention_padded(qp, kp, vp, sm_scale)[..., :d]


class EngineAttention(nn.Module):
    """A DiT ``Attention`` (``qkv`` -> heads -> attention -> ``proj``) with a chosen attention kernel.
    It takes over the model's ``qkv`` / ``proj`` modules (engine layers included) and replaces the
    ``Attention`` from outside (:func:`use_attention`); the model's code is untouched."""

    def __init__(self, attn: nn.Module, backend: AttentionBackend = "sdpa"):
        super().__init__()
        self.qkv, self.proj, self.num_heads = attn.qkv, attn.proj, attn.num_heads
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(x))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before ``proj`` (``model.Attention.attend``'s contract: the engine's fused blocks
        call ``proj`` with the gated residual in its epilogue themselves)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        if self.backend == "sage":
            return sage_attention(*qkv.unbind(2)).reshape(b, n, c)  # [B, N, H, D]: heads merge without a transpose
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, n, c)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, attention={self.backend}"


def use_attention(model: nn.Module, backend: AttentionBackend) -> nn.Module:
    """Every DiT ``Attention`` of ``model`` (a ``runtime.model.Attention`` or an :class:`EngineAttention`)
    set to compute with ``backend``; in place, returns ``model``. ``"sdpa"`` leaves plain
    ``Attention`` modules as they are."""
    from .model import Attention

    check_backend(backend)
    if backend == "sage" and any(p.is_cuda for p in model.parameters()):
        _import_sageattn()  # a missing package fails here, not minutes later inside a compiled forward
    for name, mod in list(model.named_modules()):
        if isinstance(mod, EngineAttention):
            mod.backend = backend
        elif isinstance(mod, Attention) and backend != "sdpa":
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, EngineAttention(mod, backend))
    return model
