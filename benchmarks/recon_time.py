"""Time block reconstruction (``--reconstruct``: BRECQ + AdaRound + LSQ steps, calibrate/recon.py)
on a DiT of random weights, W4A8 group-128 min-max recipe, as many calibration rows as
dtq-calibrate's defaults make (25 timesteps x 32 samples x 2 for guidance = 1600).

    PYTHONPATH=... python benchmarks/recon_time.py --device cuda                # DiT-XL/2, 1000 iters/block
    PYTHONPATH=... python benchmarks/recon_time.py --device cuda --depth 4      # 4 blocks, extrapolated to 28

The issue's target: the whole reconstruction of DiT-XL/2 within 30 minutes on one H200. ``--depth``
builds the named config with fewer blocks (every block costs the same: same shapes, same rows), and
the JSON extrapolates ``seconds_per_block`` to the full depth. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dtq.calibrate.api import calibrate
from dtq.calibrate.config import CalibConfig
from dtq.calibrate.data import CalibrationSet
from dtq.calibrate.recon import reconstruct_blocks
from dtq.runtime.model import DiT, named_config


def random_calibration_set(model: DiT, rows: int, seed: int = 0) -> CalibrationSet:
    """Rows of random latents, timesteps and labels (timing only: the values do not matter)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    y = torch.randint(0, c.num_classes + 1, (rows,), generator=g)
    return CalibrationSet(x, t, y, torch.zeros(rows, dtype=torch.long), steps=1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(config: str = "DiT-XL/2", depth: int | None = None, rows: int = 1600, iters: int = 1000,
        batch: int = 32, act_steps: bool = True, device: str = "cuda") -> dict:
    cfg = named_config(config)
    full_depth = cfg.depth
    if depth is not None:
        cfg = cfg.replace(depth=depth)
    model = DiT(cfg).randomize_(seed=0).to(device).eval()
    data = random_calibration_set(model, rows)
    base = CalibConfig(method="minmax", precision="w4a8", weight_granularity="group128", device=device,
                       progress=False, batch_size=64)
    t0 = time.perf_counter()
    recipe = calibrate(model, data, base)
    _sync(device)
    t1 = time.perf_counter()
    recon = CalibConfig(**{**base.__dict__, "reconstruct": True, "recon_iters": iters, "recon_batch": batch,
                           "recon_act_steps": act_steps})
    reconstruct_blocks(model, recipe, data.forward_loop(base.batch_size, device), recon)
    _sync(device)
    seconds = time.perf_counter() - t1
    per_block = seconds / cfg.depth
    blocks = recipe.info["recon_blocks"]
    return {"config": config, "depth": cfg.depth, "full_depth": full_depth, "rows": rows, "iters": iters,
            "recon_batch": batch, "act_steps": act_steps, "device": str(device),
            "gpu": torch.cuda.get_device_name() if str(device).startswith("cuda") else None,
            "torch": torch.__version__, "calibrate_seconds": round(t1 - t0, 2), "recon_seconds": round(seconds, 2),
            "seconds_per_block": round(per_block, 3),
            "full_depth_minutes_estimate": round(per_block * full_depth / 60, 2),
            "peak_gpu_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                             if str(device).startswith("cuda") else None),
            "rel_mse_first_block": [blocks[0]["rel_mse_before"], blocks[0]["rel_mse_after"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="DiT-XL/2")
    p.add_argument("--depth", type=int, default=None, help="blocks to build (default: the config's)")
    p.add_argument("--rows", type=int, default=1600)
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--no-act-steps", action="store_true")
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    print(json.dumps(run(a.config, a.depth, a.rows, a.iters, a.batch, not a.no_act_steps, a.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
