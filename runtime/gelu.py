"""GELU(tanh) computed as ``x * sigmoid(2 z)``: the same function, fewer instructions on the GPU.

``0.5 * (1 + tanh(z)) == sigmoid(2 z)``, so DiT's ``GELU(approximate="tanh")``,
``0.5 x (1 + tanh(z))`` with ``z = sqrt(2 / pi) (x + 0.044715 x^3)``, is ``x * sigmoid(2 z)``.
Inductor lowers ``tanh`` to libdevice's ``tanhf`` (a branchy polynomial / exp formula) and
``sigmoid`` to one ``exp`` (``ex2.approx``) and a division: in the FP8 engine the pass that applies
GELU and quantizes fc2's input over the 4x-hidden tensor took 6.8 ms of a 48.7 ms DiT-XL/2
forward at batch 64 on an H200, about twice its memory-bandwidth time (docs/engines.md, session 11
profile). dtq's Triton GEMM epilogues (``runtime.kernels``) already use this form.

:func:`use_gelu` swaps the form from outside, like ``runtime.attention.use_attention``: every
``nn.GELU(approximate="tanh")`` of a model (DiT's ``Mlp.act``, an engine's ``FusedMlp.act``)
becomes a :class:`SigmoidGELU` (a subclass, so code that checks for a tanh GELU still finds one),
or back. On the CPU :class:`SigmoidGELU` computes ``nn.GELU``'s own formula, so engines and the
simulation stay bit-identical there; the sigmoid form runs on CUDA tensors (``always=True``: on
any device, for the tests).
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import torch
from torch import nn

GeluForm = Literal["tanh", "sigmoid"]
GELU_FORMS: tuple[str, ...] = typing.get_args(GeluForm)
_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh_via_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``GELU(tanh)`` as ``x * sigmoid(2 z)``, in float32 (bf16 / fp16 inputs are upcast, the result
    cast back): for large ``|z|`` the sigmoid saturates to exactly 0 or 1, no overflow to NaN."""
    xf = x.float()
    return (xf * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class SigmoidGELU(nn.GELU):
    """``nn.GELU(approximate="tanh")`` whose GPU path is :func:`gelu_tanh_via_sigmoid`."""

    def __init__(self, always: bool = False):
        super().__init__(approximate="tanh")
        self.always = always

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or self.always:
            return gelu_tanh_via_sigmoid(x)
        return super().forward(x)

    def extra_repr(self) -> str:
        return "approximate='tanh', form=sigmoid" + (", always" if self.always else "")


def check_gelu_form(form: str) -> None:
    if form not in GELU_FORMS:
        raise ValueError(f"gelu form must be one of {', '.join(GELU_FORMS)}, got {form!r}")


def use_gelu(model: nn.Module, form: GeluForm) -> nn.Module:
    """Every tanh-approximate GELU of ``model`` in ``form`` ("sigmoid": :class:`SigmoidGELU`; "tanh":
    plain ``nn.GELU``), in place; returns ``model``. Exact GELUs (``approximate="none"``) and other
    activations are left alone."""
    check_gelu_form(form)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not (isinstance(child, nn.GELU) and child.approximate == "tanh"):
                continue
            if form == "sigmoid" and type(child) is nn.GELU:
                setattr(module, child_name, SigmoidGELU())
            elif form == "tanh" and isinstance(child, SigmoidGELU):
                setattr(module, child_name, nn.GELU(approximate="tanh"))
    return model
