"""Text conditioning from precomputed prompt embeddings, behind the sampler's ``(x, t, y)`` interface.

A text-conditioned model (PixArt) takes ``(x, t, context, mask)``. dtq encodes no text itself:
prompts are encoded once, by whatever text encoder the user has, into a ``.safetensors`` file::

    embeddings      [N, tokens, D]  float   the N prompts
    mask            [N, tokens]     0/1     1 = token, 0 = padding
    null_embedding  [tokens, D]     float   the empty prompt (classifier-free guidance)
    null_mask       [tokens]        0/1

The sampler and the calibration set then carry a prompt *index* ``y`` where a class model has a
label: ``y = N`` is the empty prompt, as the null class is for a class model. So the sampling loop,
the calibration set's rows and the guidance concatenation stay as they are;
:class:`PromptDenoiser` turns ``y`` into ``(context, mask)`` in front of the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

KEYS = ("embeddings", "mask", "null_embedding", "null_mask")


class PromptEmbeddingsError(ValueError):
    """A prompt-embeddings file that is missing, unreadable or inconsistent (one-line reason)."""


@dataclass
class PromptEmbeddings:
    embeddings: torch.Tensor  # [N, T, D]
    mask: torch.Tensor  # [N, T]
    null_embedding: torch.Tensor  # [T, D]
    null_mask: torch.Tensor  # [T]

    def __post_init__(self) -> None:
        e, m = self.embeddings, self.mask
        if e.ndim != 3 or e.shape[0] < 1:
            raise PromptEmbeddingsError(f"embeddings must be [N, tokens, dim] with N >= 1, got {tuple(e.shape)}")
        if tuple(m.shape) != tuple(e.shape[:2]):
            raise PromptEmbeddingsError(f"mask must be [N, tokens] = {tuple(e.shape[:2])}, got {tuple(m.shape)}")
        if tuple(self.null_embedding.shape) != tuple(e.shape[1:]) or tuple(self.null_mask.shape) != (e.shape[1],):
            raise PromptEmbeddingsError(f"null_embedding / null_mask must be {tuple(e.shape[1:])} / ({e.shape[1]},), got "
                                        f"{tuple(self.null_embedding.shape)} / {tuple(self.null_mask.shape)}")
        if not torch.isfinite(e).all() or not torch.isfinite(self.null_embedding).all():
            raise PromptEmbeddingsError("embeddings hold NaN or inf")

    @property
    def num_prompts(self) -> int:
        return self.embeddings.shape[0]

    @property
    def null_index(self) -> int:
        """The ``y`` of the empty prompt (guidance's unconditional half)."""
        return self.num_prompts

    @property
    def tokens(self) -> int:
        return self.embeddings.shape[1]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[2]

    def lookup(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context [B, T, D], mask [B, T])`` of prompt indices ``y`` (``null_index``: the empty prompt)."""
        table = torch.cat([self.embeddings, self.null_embedding[None]]).float()
        masks = torch.cat([self.mask, self.null_mask[None]]).float()
        y = y.long().cpu()
        if y.numel() and (y.min() < 0 or y.max() > self.null_index):
            raise IndexError(f"prompt index outside 0..{self.null_index}")
        return table[y], masks[y]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().float().contiguous().cpu() for k in KEYS}

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        save_file(self.tensors(), str(path), metadata={"format": "dtq.prompt_embeddings"})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptEmbeddings":
        path = Path(path)
        if not path.is_file():
            raise PromptEmbeddingsError(f"prompt embeddings not found: {path}")
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise PromptEmbeddingsError(f"{path}: not a readable safetensors file ({exc})") from None
        missing = [k for k in KEYS if k not in tensors]
        if missing:
            raise PromptEmbeddingsError(f"{path}: missing {', '.join(missing)} (expected {', '.join(KEYS)})")
        return cls(**{k: tensors[k] for k in KEYS})


class PromptDenoiser:
    """``(x, t, y) -> out`` over a ``(x, t, context, mask)`` model: y indexes the prompt table."""

    def __init__(self, model, prompts: PromptEmbeddings, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.model = model
        self.prompts = prompts
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        context, mask = self.prompts.lookup(y)
        dev, dt = self.device, self.dtype
        out = self.model(x.to(dev, dt), t.to(dev), context.to(dev, dt), mask.to(dev, dt))
        return out.float().to(x.device)
