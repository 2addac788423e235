"""``QuantLinear``: the module that replaces an ``nn.Linear`` in a simulated (fake-quant) model.

It is an ``nn.Linear`` subclass so the state-dict names stay those of the DiT
(``blocks.0.attn.qkv.weight``); the extra buffers are what a Q/DQ graph holds for the layer:

- ``input_mul`` (optional, ``[C_in]``): a run-time multiply of the input by ``1 / b`` where a
  balancing vector cannot be folded (fc2 after GELU); the ONNX ``Mul`` before the Q/DQ pair.
- ``act_scale`` (``[]``): static per-tensor activation scale of the (balanced) input; None when
  ``act_granularity`` is "token" (a scale per token, ``quant.token_scale``, computed in forward).
- ``weight_scale``: per-tensor ``[]``, per-channel ``[C_out]`` or per-group ``[C_out, C_in/g]``
  scale of ``weight``, which is already the balanced weight ``W diag(b)``.

- ``input_rotation`` (optional int ``k``): the input is first rotated by the block-diagonal normalized
  Hadamard ``B`` of block ``k`` (``runtime.rotation``), before ``input_mul``; ``weight`` then holds
  ``W B^T diag(b)``. The graph's Reshape -> MatMul(H) -> Reshape before the balancing ``Mul``.
- ``lowrank_down`` R ``[r, C_in]`` and ``lowrank_up`` L ``[C_out, r]`` (optional): DiTAS' FP16 side
  branch on the balanced, unquantized input ``x' = rotate(x) * input_mul``.

Forward = ``linear(fq_act(x'), fq_w(weight), bias) [+ linear(linear(x', R), L)]``, nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import quant
from .rotation import hadamard, rotated_input


class QuantLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_format: str = "none", weight_granularity: str = "channel",
                 weight_group_size: int | None = None, act_format: str = "none",
                 act_granularity: str = "tensor", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        quant.check_format(weight_format)
        quant.check_format(act_format)
        self.weight_format = weight_format
        self.weight_granularity = weight_granularity
        self.weight_group_size = weight_group_size
        self.act_format = act_format
        if act_granularity not in quant.ACT_GRANULARITIES:
            raise ValueError(f"unknown activation granularity {act_granularity!r}")
        self.act_granularity = act_granularity
        self.register_buffer("act_scale", None)
        self.register_buffer("weight_scale", None)
        self.register_buffer("input_mul", None)
        self.register_buffer("lowrank_down", None)
        self.register_buffer("lowrank_up", None)
        self.input_rotation = None  # Hadamard block size of the online input rotation (a property)
        self._wq: torch.Tensor | None = None  # cached fake-quantized weight

    @property
    def input_rotation(self) -> int | None:
        return self._input_rotation

    @input_rotation.setter
    def input_rotation(self, k: int | None) -> None:
        # H lives with the layer (moved by .to(), not in the state dict): building it on the host and
        # copying it to the GPU on every call is what CUDA-graph capture refuses
        self._input_rotation = k
        w = self._parameters.get("weight")
        device = w.device if w is not None and w.device.type != "meta" else None
        self.register_buffer("rotation_matrix", hadamard(k, torch.float64, device) if k else None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, weight_format: str = "none", weight_granularity: str = "channel",
                    weight_group_size: int | None = None, act_format: str = "none", act_granularity: str = "tensor",
                    weight_scale: torch.Tensor | None = None, act_scale: torch.Tensor | float | None = None,
                    input_mul: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
                    input_rotation: int | None = None) -> "QuantLinear":
        """``weight``: replaces the Linear's (balanced) weight (a recipe's GPTQ / residual weight);
        ``lowrank``: ``(L [C_out, r], R [r, C_in])`` of the side branch; ``input_rotation``: the
        Hadamard block of an online input rotation (the weight is already rotated)."""
        w = linear.weight if weight is None else weight.to(linear.weight.device, linear.weight.dtype)
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_format=weight_format,
                weight_granularity=weight_granularity, weight_group_size=weight_group_size, act_format=act_format,
                act_granularity=act_granularity, device="meta")
        q.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        q.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        q.set_quant(weight_scale=weight_scale, act_scale=act_scale, input_mul=input_mul)
        q.input_rotation = input_rotation
        if lowrank is not None:
            up, down = lowrank
            q.lowrank_up = up.detach().float().to(w.device)
            q.lowrank_down = down.detach().float().to(w.device)
        return q

    def set_quant(self, *, weight_scale=None, act_scale=None, input_mul=None) -> None:
        """Attach scales (missing ones: weight min-max; a quantized activation must have one)."""
        dev = self.weight.device
        if self.weight_format != "none" and weight_scale is None:
            weight_scale = quant.weight_scale(self.weight, self.weight_format, self.weight_granularity,
                                              self.weight_group_size)
        dynamic = self.act_granularity == "token"
        if self.act_format != "none" and not dynamic and act_scale is None:
            raise ValueError("a quantized activation needs a calibrated act_scale")
        if dynamic and act_scale is not None:
            raise ValueError("a per-token (dynamic) activation takes no static act_scale")
        self.weight_scale = None if weight_scale is None else torch.as_tensor(weight_scale).float().to(dev)
        self.act_scale = None if act_scale is None else torch.as_tensor(act_scale, dtype=torch.float32).reshape(()).to(dev)
        self.input_mul = None if input_mul is None else input_mul.detach().float().to(dev)
        self._wq = None

    def fake_quant_weight(self) -> torch.Tensor:
        """The dequantized weight used in forward (float32); cached until ``set_quant``/``_apply``."""
        if self._wq is None or self._wq.device != self.weight.device:
            self._wq = quant.fake_quant_weight(self.weight.float(), self.weight_scale, self.weight_format,
                                               self.weight_granularity, self.weight_group_size)
        return self._wq

    def quantized_weight(self) -> torch.Tensor:
        """Integer (int8 container, also INT4) or float8 codes of the weight, for export."""
        return quant.quantize_weight(self.weight, self.weight_scale, self.weight_format,
                                     self.weight_granularity, self.weight_group_size)

    def _apply(self, fn, *args, **kwargs):
        self._wq = None  # .to()/.half() invalidate the cache
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = rotated_input(self, x)
        if self.input_mul is not None:
            x = x * self.input_mul.to(dtype)
        xb = x
        if self.act_format != "none":
            x = quant.fake_quant_act(x, self.act_scale, self.act_format, self.act_granularity)
        w = self.fake_quant_weight() if self.weight_format != "none" else self.weight
        b = self.bias
        y = F.linear(x.to(w.dtype), w, b if b is None else b.to(w.dtype))
        if self.lowrank_up is not None:  # the graph's order: (quantized path + bias) + branch
            y = y + F.linear(F.linear(xb.to(w.dtype), self.lowrank_down.to(w.dtype)), self.lowrank_up.to(w.dtype))
        return y.to(dtype)

    def extra_repr(self) -> str:
        g = f"{self.weight_granularity}{self.weight_group_size or ''}"
        return (f"{super().extra_repr()}, w={self.weight_format}/{g}, a={self.act_format}"
                f"{'/token' if self.act_granularity == 'token' else ''}"
                f"{f', input_rotation={self.input_rotation}' if self.input_rotation else ''}"
                f"{', input_mul' if self.input_mul is not None else ''}"
                f"{f', lowrank={self.lowrank_up.shape[1]}' if self.lowrank_up is not None else ''}")
