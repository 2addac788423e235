"""Timestep-aware calibration set (Q-Diffusion / PTQ4DiT): the FP sampler runs from noise with
random labels and a sampler callback records the denoiser inputs ``(x_t, t, y)`` at ``cali_steps``
trajectory positions spread uniformly, ``cali_n`` samples each (guidance doubles the rows: the
conditional and the null-label halves). No copy of the sampling loop: ``runtime.sampler.sample``
with ``on_step``.

Under ``torchrun`` both passes are data-parallel (``runtime.distributed``): the sampler batches
(``cali_batch`` samples each) and the forward loop's batches are dealt to the ranks, batch ``i``
to rank ``i % world_size``. A batch's noise, labels and per-step noise depend only on the seed
and its start, so every world size records the same rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..runtime.denoiser import TorchDenoiser
from ..runtime.distributed import SINGLE, DistContext, broadcast_object, map_batches
from ..runtime.diffusion import GaussianDiffusion
from ..runtime.prompts import PromptDenoiser, PromptEmbeddings
from ..runtime.sampler import StepInfo, sample
from .config import CalibDataConfig

ForwardLoop = Callable[[nn.Module], None]


@dataclass
class CalibrationSet:
    """Rows of denoiser inputs; ``step`` is the trajectory index (0 = noisiest) of each row."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    step: torch.Tensor
    steps: int  # length of the trajectory the rows come from
    info: dict = field(default_factory=dict)
    prompts: PromptEmbeddings | None = None  # text-conditioned models: y indexes these (runtime/prompts.py)

    def __len__(self) -> int:
        return self.x.shape[0]

    def select(self, mask: torch.Tensor) -> "CalibrationSet":
        return CalibrationSet(self.x[mask], self.t[mask], self.y[mask], self.step[mask], self.steps, dict(self.info),
                              self.prompts)

    def recorded_steps(self) -> list[int]:
        return sorted(set(self.step.tolist()))

    def phase(self, name: str) -> "CalibrationSet":
        """Rows of the early (noisiest third), middle or late (last third) part of the trajectory."""
        k = ["early", "middle", "late"].index(name)
        lo, hi = k * self.steps / 3, (k + 1) * self.steps / 3
        return self.select((self.step >= lo) & (self.step < hi))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches in trajectory order (rows of one timestep stay together where they fit)."""
        order = torch.argsort(self.step, stable=True)
        for i in range(0, len(self), batch_size):
            idx = order[i:i + batch_size]
            yield self.x[idx], self.t[idx], self.y[idx]

    def forward_loop(self, batch_size: int = 64, device: str | torch.device = "cpu",
                     progress: bool = False, shard: DistContext = SINGLE) -> ForwardLoop:
        """A ModelOpt-style ``forward_loop(model)`` that runs every row through the model; with
        ``shard``, only batch ``i`` with ``i % world_size == rank`` (the caller reduces)."""

        def loop(model: nn.Module) -> None:
            batches = self.batches(batch_size)
            if progress and shard.is_main:
                from tqdm.auto import tqdm

                batches = tqdm(batches, total=-(-len(self) // batch_size), desc="calibration forward", leave=False)
            with torch.no_grad():
                for i, (x, t, y) in enumerate(batches):
                    if i % shard.world_size != shard.rank:
                        continue
                    if self.prompts is None:
                        model(x.to(device), t.to(device), y.to(device))
                    else:  # (x, t, context, mask) of the prompts the rows were sampled with
                        context, mask = self.prompts.lookup(y)
                        model(x.to(device), t.to(device), context.to(device), mask.to(device))

        return loop

    # -- IO -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "dtq.calibration_set", "version": "1", "steps": str(self.steps), "info": json.dumps(self.info)}
        tensors = {"x": self.x.contiguous().float(), "t": self.t.long().contiguous(), "y": self.y.long().contiguous(),
                   "step": self.step.long().contiguous()}
        if self.prompts is not None:
            tensors.update({f"prompts.{k}": v for k, v in self.prompts.tensors().items()})
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationSet":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration set not found: {path}")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "dtq.calibration_set":
                raise ValueError(f"{path}: not a dtq calibration set")
            tensors = {k: f.get_tensor(k) for k in ("x", "t", "y", "step")}
            prompt_keys = [k for k in f.keys() if k.startswith("prompts.")]
            prompts = (PromptEmbeddings(**{k.removeprefix("prompts."): f.get_tensor(k) for k in prompt_keys})
                       if prompt_keys else None)
        return cls(**tensors, steps=int(meta["steps"]), info=json.loads(meta.get("info", "{}")), prompts=prompts)


def recorded_indices(steps: int, cali_steps: int) -> list[int]:
    """Trajectory indices spread uniformly from the first (noisiest) to the last step."""
    return sorted({int(round(v)) for v in np.linspace(0, steps - 1, cali_steps)})


@torch.no_grad()
def collect_calibration_set(model: nn.Module, config: CalibDataConfig = CalibDataConfig(), *,
                            device: str | torch.device = "cpu", progress: bool = False,
                            shard: DistContext = SINGLE, prompts: PromptEmbeddings | None = None) -> CalibrationSet:
    """Run the FP sampler and record the denoiser inputs at ``config.cali_steps`` positions.

    Samples run in batches of ``config.cali_batch`` (all in one by default); rows are ordered by
    batch, then trajectory position. Under torchrun (``shard``) the batches are shared by the ranks
    and every rank gets the whole set. ``prompts``: a text-conditioned model; ``y`` is then a random
    prompt index (the empty prompt is guidance's null condition)."""
    cfg = model.config
    diffusion = GaussianDiffusion.dit(config.steps)
    keep = set(recorded_indices(config.steps, config.cali_steps))
    gen = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(config.cali_n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    num_classes = cfg.num_classes if prompts is None else prompts.num_prompts
    null = cfg.null_class if prompts is None else prompts.null_index
    labels = torch.randint(0, num_classes, (config.cali_n,), generator=gen)
    guided = config.cfg_scale != 1.0
    denoiser = TorchDenoiser(model, device) if prompts is None else PromptDenoiser(model, prompts, device)

    def run_batch(start: int, sl: slice) -> tuple[torch.Tensor, ...]:
        rows: list[tuple[torch.Tensor, ...]] = []

        def record(info: StepInfo) -> None:
            if info.index in keep:
                rows.append((info.x.float().cpu(), info.t.cpu(), info.y.cpu(),
                             torch.full((info.x.shape[0],), info.index, dtype=torch.long)))

        # batch 0 continues the generator of noise and labels (the one-batch set of earlier
        # versions); a later batch's per-step noise is seeded by its start, as dtq-sample's
        step_gen = gen if start == 0 else torch.Generator().manual_seed(config.seed * 1_000_003 + start)
        sample(denoiser, diffusion, noise[sl].to(device), labels[sl], sampler=config.sampler,
               cfg_scale=config.cfg_scale, null_class=null if guided else None,
               clip_denoised=config.clip_denoised, generator=step_gen, on_step=record,
               progress=progress and shard.is_main)
        return tuple(torch.cat(parts) for parts in zip(*rows))

    gathered = map_batches(config.cali_n, config.cali_batch or config.cali_n, run_batch, shard)
    x, t, y, step = broadcast_object(gathered, shard)
    info = {k: getattr(config, k) for k in ("cali_steps", "cali_n", "cali_batch", "steps", "sampler", "cfg_scale", "seed")}
    return CalibrationSet(x, t, y, step, config.steps, info, prompts)
