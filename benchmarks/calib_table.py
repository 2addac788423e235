"""Noise-prediction SQNR and sample PSNR of simulated (fake-quant) models vs FP32.

For one model: collect the calibration set (FP sampler, cali_steps x cali_n, guidance 1.5),
hook statistics once, then for each quantization config (W8A8, W4A8 group128, W4A8 per-channel)
and method build the recipe and the simulated model, and measure
- SQNR (dB) of the noise prediction vs FP32 on held-out calibration inputs (another seed),
  per trajectory third (early = noisiest, middle, late) and over all rows;
- PSNR (dB) of final samples vs FP32 from the same noise, labels and sampler noise
  (--num-images images, each of --sample-steps, DDPM, guidance 1.5).
Writes <out>.md (table + the command) and <out>.json.

CPU (built-in tiny model, SQNR + a small PSNR run):
  python benchmarks/calib_table.py --model dit-tiny-fmnist --num-images 16 --sample-steps 50 \
      --out benchmarks/results/tiny_cpu
GPU (both models, the full protocol):
  python benchmarks/calib_table.py --model dit-tiny-fmnist --device cuda --out benchmarks/results/tiny_gpu
  python benchmarks/calib_table.py --ckpt ../shared/reference/dit-s2-fmnist/model.safetensors \
      --device cuda --out benchmarks/results/dit-s2_gpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from dtq.calibrate.api import calibrate, statistics
from dtq.calibrate.config import CalibConfig, CalibDataConfig
from dtq.calibrate.data import collect_calibration_set
from dtq.calibrate.evaluate import generate, noise_sqnr, predict, psnr
from dtq.runtime.checkpoint import load_checkpoint
from dtq.runtime.recipe import apply_recipe
from dtq.runtime.zoo import builtin_checkpoint

# (W4A8 per channel, an earlier row, is no precision of dtq.formats: TensorRT's INT4 is blocked only)
QCONFIGS = {
    "W8A8": dict(precision="int8", weight_granularity="channel"),
    "W4A8-g128": dict(precision="w4a8", weight_granularity="group128"),
    "W4A8-g32": dict(precision="w4a8", weight_granularity="group32"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dit-tiny-fmnist")
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cali-steps", type=int, default=25)
    p.add_argument("--cali-n", type=int, default=32)
    p.add_argument("--steps", type=int, default=100, help="trajectory of the calibration sampler")
    p.add_argument("--eval-n", type=int, default=8, help="held-out samples per recorded timestep")
    p.add_argument("--methods", default="minmax,smoothquant,ptq4dit,ditas")
    p.add_argument("--configs", default=",".join(QCONFIGS))
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--sample-steps", default="50,100", help="comma list; empty: no PSNR")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    t_start = time.time()
    ckpt = a.ckpt or builtin_checkpoint(a.model)
    model = load_checkpoint(ckpt).to(a.device).eval()
    name = a.ckpt.parent.name if a.ckpt else a.model
    data_cfg = CalibDataConfig(cali_steps=a.cali_steps, cali_n=a.cali_n, steps=a.steps, seed=0)
    cali = collect_calibration_set(model, data_cfg, device=a.device, progress=True)
    held = collect_calibration_set(model, CalibDataConfig(cali_steps=a.cali_steps, cali_n=a.eval_n, steps=a.steps,
                                                          seed=1), device=a.device, progress=True)
    fp_eps = predict(model, held, a.batch_size, a.device)
    stats = statistics(model, cali, CalibConfig(device=a.device, batch_size=a.batch_size))
    print(f"data + statistics: {time.time() - t_start:.0f} s", flush=True)
    sample_steps = [int(s) for s in a.sample_steps.split(",") if s]
    gen_kw = dict(num_images=a.num_images, cfg_scale=1.5, seed=0, device=a.device, batch_size=a.batch_size)
    fp_images = {s: generate(model, steps=s, **gen_kw) for s in sample_steps}
    rows = []
    for qname in a.configs.split(","):
        for method in a.methods.split(","):
            t0 = time.time()
            cfg = CalibConfig(method=method, device=a.device, batch_size=a.batch_size, progress=False, **QCONFIGS[qname])
            recipe = calibrate(model, stats, cfg)
            sim = apply_recipe(model, recipe)
            row = {"config": qname, "method": method,
                   "sqnr": noise_sqnr(model, sim, held, batch_size=a.batch_size, device=a.device, fp_out=fp_eps)}
            row["psnr"] = {s: psnr(fp_images[s], generate(sim, steps=s, **gen_kw)) for s in sample_steps}
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(a, name, rows, sample_steps, time.time() - t_start)
    return 0


def write(a, name, rows, sample_steps, seconds) -> None:
    a.out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join(shlex.quote(x) for x in ["benchmarks/calib_table.py", *sys.argv[1:]])
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    head = ["config", "method", "SQNR early", "SQNR middle", "SQNR late", "SQNR all"]
    head += [f"PSNR {s} steps" for s in sample_steps]
    lines = [f"# {name}: simulated quantization vs FP32", "",
             f"Command: `{cmd}` ({dev}, {seconds / 60:.1f} min)", "",
             f"Calibration: {a.cali_steps} timesteps x {a.cali_n} samples (x2 with guidance 1.5) of a {a.steps}-step "
             f"DDPM trajectory, seed 0. SQNR: noise channels on held-out inputs ({a.cali_steps} x {a.eval_n} x2, seed 1), "
             f"per trajectory third. PSNR: {a.num_images} final samples vs FP32 from the same noise, DDPM, guidance 1.5. "
             "All scale searches min-max (per-tensor activations, weights per channel or per group of 128 along C_in); "
             "no reconstruction, no LoRA.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["sqnr"]
        vals = [r["config"], r["method"]] + [f"{s.get(k, float('nan')):.2f}" for k in ("early", "middle", "late", "all")]
        vals += [f"{r['psnr'][st]:.2f}" for st in sample_steps]
        lines.append("| " + " | ".join(vals) + " |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps({"command": cmd, "device": dev, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
