"""Model adapters: how the quantization stages see a model family, without forking its code.

Calibration, recipes and export ask an adapter which Linears are quantizable, the role of each
(what a method keys on) and where a layer's balancing vector folds; they never spell a model's
module names themselves. Two adapters exist: :class:`DiTAdapter` (dtq's DiT, and diffusers DiT
folders, which load as it) and ``runtime.pixart.PixArtAdapter`` (diffusers'
``PixArtTransformer2DModel`` used as-is). docs/model-adapters.md is the design.

A model names its adapter through a ``dtq_adapter`` attribute (an adapter instance); a model
without one is a DiT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn

from .. import formats

ALL_ROLES = formats.ALL_ROLES  # the role vocabulary: DiT's formats.ROLES and formats.CROSS_ROLES


@dataclass(frozen=True)
class LinearSite:
    """One quantizable Linear: its module name, its role (a name of ``ALL_ROLES``) and its block."""

    name: str
    role: str
    block: int


class ModelAdapter(Protocol):
    family: str  # "dit" | "pixart"

    def roles(self) -> tuple[str, ...]:
        """The roles this family has, in block order."""

    def quantizable(self, model: nn.Module, roles=None) -> list[LinearSite]:
        """The Linears of ``roles`` (default: all of the family's), in model order."""

    def role(self, name: str) -> str:
        """The role of a quantizable layer name."""

    def fold(self, name: str) -> str:
        """Where a method folds this layer's balancing vector (a name of ``formats.FOLDS``)."""


class DiTAdapter:
    """dtq's DiT: ``blocks.N.<role>``; qkv and fc1 fold into the block's adaLN rows, proj into
    the V rows of qkv, fc2 (after GELU) into a run-time Mul. Exactly what the stages did before
    adapters existed (recipes are byte-identical)."""

    family = "dit"

    def roles(self) -> tuple[str, ...]:
        return formats.ROLES

    def quantizable(self, model: nn.Module, roles=None) -> list[LinearSite]:
        roles = [r for r in (formats.ROLES if roles is None else roles) if r in formats.ROLES]
        return [LinearSite(f"blocks.{i}.{r}", r, i) for i in range(len(model.blocks)) for r in roles]

    def role(self, name: str) -> str:
        return formats.layer_role(name)

    def fold(self, name: str) -> str:
        return formats.FOLD_BY_ROLE[self.role(name)]


DIT = DiTAdapter()


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The model's adapter (``model.dtq_adapter``), else the DiT one."""
    return getattr(model, "dtq_adapter", None) or DIT


def quantizable_names(model: nn.Module, roles=None) -> list[str]:
    """Module names of the quantizable Linears of ``roles``, in model order."""
    return [s.name for s in adapter_for(model).quantizable(model, roles)]
