"""diffusers' ``PixArtTransformer2DModel`` as a dtq model, used as-is (no forked model code).

:class:`PixArtDenoiser` holds the diffusers transformer and gives it dtq's tensor-only denoiser
signature ``(x, t, context, mask) -> output`` (``context``: text embeddings ``[B, tokens,
caption_channels]``, ``mask``: ``[B, tokens]``, 1 = token, 0 = padding). Its
:class:`PixArtAdapter` tells calibration, recipes and export which Linears are quantizable and
their roles; every balancing vector folds into a run-time ``Mul``: adaLN-single's modulation Linear
is shared by all blocks, so a per-block balance cannot fold into it (docs/model-adapters.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import formats
from .adapters import LinearSite

PIXART_CLASS = "PixArtTransformer2DModel"
BLOCK_PREFIX = "transformer.transformer_blocks."
# per-block Linears in model order: (module path inside a block, role)
_BLOCK_LINEARS = (
    ("attn1.to_q", "attn.qkv"), ("attn1.to_k", "attn.qkv"), ("attn1.to_v", "attn.qkv"),  # split q/k/v, one input
    ("attn1.to_out.0", "attn.proj"),
    ("attn2.to_q", "cross.q"), ("attn2.to_k", "cross.kv"), ("attn2.to_v", "cross.kv"),  # k/v read the text tokens
    ("attn2.to_out.0", "cross.proj"),
    ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
)
_ROLE_OF = dict(_BLOCK_LINEARS)


class PixArtAdapter:
    """Quantizable Linears of a :class:`PixArtDenoiser`: every block's self-attention (q/k/v,
    out), cross-attention (q, k/v, out) and MLP Linears. Embedders, adaLN-single, the caption
    projection and the output projection stay in FP (role ``cond``, as DiT's adaLN)."""

    family = "pixart"

    def roles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r for _, r in _BLOCK_LINEARS))

    def quantizable(self, model: nn.Module, roles=None) -> list[LinearSite]:
        roles = self.roles() if roles is None else roles
        depth = len(model.transformer.transformer_blocks)
        return [LinearSite(f"{BLOCK_PREFIX}{i}.{path}", role, i)
                for i in range(depth) for path, role in _BLOCK_LINEARS if role in roles]

    def role(self, name: str) -> str:
        if not name.startswith(BLOCK_PREFIX):
            return name
        _, _, path = name.removeprefix(BLOCK_PREFIX).partition(".")
        return _ROLE_OF.get(path, name)

    def fold(self, name: str) -> str:
        # adaLN-single: the shift/scale before attn1 and ff come from one Linear shared by all blocks
        # (plus a per-block table), so a per-block b cannot fold there; attn2's query input has no
        # norm before it; to_out / fc2 could fold into to_v rows / not at all: a Mul before the layer.
        return "runtime"


@dataclass(frozen=True)
class PixArtConfig:
    """What dtq's stages read of a PixArt transformer (the diffusers config is kept whole)."""

    in_channels: int
    out_channels: int
    input_size: int  # latent height = width (diffusers' sample_size)
    caption_channels: int
    learn_sigma: bool
    diffusers: dict = field(default_factory=dict)
    family: str = "pixart"
    space: str = "latent"
    null_class: int | None = None  # always None: guidance's null condition is the empty prompt (runtime/prompts.py)

    @classmethod
    def from_diffusers(cls, cfg) -> "PixArtConfig":
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items()}
        out = d.get("out_channels") or d["in_channels"]
        return cls(d["in_channels"], out, d["sample_size"], d["caption_channels"], out == 2 * d["in_channels"], d)

    def to_dict(self) -> dict:
        return {"family": self.family, **self.diffusers}

    @property
    def text_conditioned(self) -> bool:
        return True


class PixArtDenoiser(nn.Module):
    """``(x [B,C,H,W], t [B] int64, context [B,T,D], mask [B,T]) -> [B, out_channels, H, W]``."""

    dtq_adapter = PixArtAdapter()

    def __init__(self, transformer: nn.Module):
        super().__init__()
        if type(transformer).__name__ != PIXART_CLASS:
            raise TypeError(f"expected a diffusers {PIXART_CLASS}, got {type(transformer).__name__}")
        if transformer.config.get("use_additional_conditions"):
            raise ValueError("PixArt with resolution/aspect-ratio conditions (PixArt-alpha 1024) is not supported yet")
        self.transformer = transformer
        self.config = PixArtConfig.from_diffusers(transformer.config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, encoder_hidden_states=context.to(x.dtype), timestep=t,
                                encoder_attention_mask=mask.to(x.dtype),
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]

    def for_export(self) -> "PixArtDenoiser":
        """A copy whose attention runs diffusers' ``AttnProcessor`` (explicit matmuls): with
        ``AttnProcessor2_0`` torch.export cannot prove the shape of the mask view before SDPA
        under a dynamic batch. Same function; the graph has MatMul/Softmax/MatMul either way."""
        import copy

        from diffusers.models.attention_processor import AttnProcessor

        out = copy.deepcopy(self)
        out.transformer.set_attn_processor(AttnProcessor())
        return out.eval()

    def example_inputs(self, batch: int, tokens: int = 8) -> tuple[torch.Tensor, ...]:
        """Inputs of the right shapes (export traces with them); mask has its last token padded."""
        c = self.config
        gen = torch.Generator().manual_seed(0)
        mask = torch.ones(batch, tokens)
        mask[:, -1] = 0
        return (torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=gen),
                torch.arange(batch, dtype=torch.int64) * 7 % 1000,
                torch.randn(batch, tokens, c.caption_channels, generator=gen), mask)


def is_pixart_folder(path: str | os.PathLike) -> bool:
    """A diffusers folder whose transformer is a ``PixArtTransformer2DModel``."""
    from .diffusers_dit import DiffusersModelError, transformer_dir

    try:
        cfg = json.loads((transformer_dir(path) / "config.json").read_text())
    except (DiffusersModelError, OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("_class_name") == PIXART_CLASS


def load_pixart(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> PixArtDenoiser:
    """A PixArt transformer from a local diffusers folder (pipeline or transformer; nothing is downloaded)."""
    from diffusers import PixArtTransformer2DModel

    from .diffusers_dit import transformer_dir

    model = PixArtTransformer2DModel.from_pretrained(str(transformer_dir(path)), local_files_only=True,
                                                     torch_dtype=dtype)
    return PixArtDenoiser(model.eval()).eval()


def small_pixart(seed: int = 0, **overrides) -> PixArtDenoiser:
    """A tiny random-weight PixArt (2 layers, 2 heads x 8, sample 8): tests and examples. The
    zero-initialised output projection and adaLN-single table of diffusers are re-drawn, so the
    model computes something non-trivial."""
    from diffusers import PixArtTransformer2DModel

    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
               cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12, num_embeds_ada_norm=1000,
               norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
               activation_fn="gelu-approximate", use_additional_conditions=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0 and p.ndim >= 1:  # zero-init heads: give them values
                p.normal_(0, 0.05 if p.ndim > 1 else 0.02)
    return PixArtDenoiser(model.eval()).eval()


