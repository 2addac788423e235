"""Held-out noise SQNR of W4A8 weight/balancing variants on the built-in tiny DiT (CPU, minutes).

Picks which generic levers go to the GPU's FID runs without touching the reference checkpoint
(docs/results/quality_s8.md). Base: W4A8 group 32, per-token activations, GPTQ, smoothquant alpha 0.5
without fc2 smoothing; each variant changes a few ``CalibConfig`` fields.

    python benchmarks/w4a8_levers_tiny.py --size medium base act_order ditas+act_order
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dtq.calibrate.api import calibrate
from dtq.calibrate.config import CalibConfig, CalibDataConfig
from dtq.calibrate.data import collect_calibration_set
from dtq.calibrate.evaluate import noise_sqnr, predict
from dtq.runtime.recipe import apply_recipe
from dtq.runtime.zoo import load_builtin

BASE = dict(method="smoothquant", alpha=0.5, smooth_fc2=False, precision="w4a8", weight_granularity="group32",
            act_granularity="token", gptq=True, progress=False)
VARIANTS = {
    "base": {}, "act_order": dict(gptq_act_order=True), "ditas": dict(method="ditas", alpha=1.0),
    "ditas+act_order": dict(method="ditas", alpha=1.0, gptq_act_order=True),
    "act_order+mse": dict(gptq_act_order=True, weight_search="mse"),
    "ditas+act_order+mse": dict(method="ditas", alpha=1.0, gptq_act_order=True, weight_search="mse"),
    "ptq4dit": dict(method="ptq4dit", alpha=1.0), "minmax": dict(method="minmax", alpha=1.0),
    "mse": dict(weight_search="mse"), "rotate_fc2": dict(rotate_fc2=True), "smooth_fc2": dict(smooth_fc2=True),
    "lowrank8": dict(lowrank_rank=8), "lowrank16": dict(lowrank_rank=16), "lowrank32": dict(lowrank_rank=32),
    "act_order+lowrank16": dict(gptq_act_order=True, lowrank_rank=16),
}
# (calibration, held-out) sets: small = tests/test_recon.py's, medium = 4x the rows on a 50-step trajectory
SIZES = {"small": (dict(cali_steps=5, cali_n=4, steps=20, seed=0), dict(cali_steps=8, cali_n=4, steps=20, seed=10)),
         "medium": (dict(cali_steps=10, cali_n=8, steps=50, seed=0), dict(cali_steps=12, cali_n=8, steps=50, seed=10))}


def run(variants: list[str], size: str = "small") -> dict[str, dict[str, float]]:
    model = load_builtin("dit-tiny-fmnist")
    cali_kw, held_kw = SIZES[size]
    cali = collect_calibration_set(model, CalibDataConfig(**cali_kw), progress=False)
    held = collect_calibration_set(model, CalibDataConfig(**held_kw), progress=False)
    held = held.select(~torch.isin(held.step, torch.tensor(cali.recorded_steps())))  # held-out timesteps only
    fp = predict(model, held)
    out = {}
    for name in variants:
        t0 = time.perf_counter()
        recipe = calibrate(model, cali, CalibConfig(**{**BASE, **VARIANTS[name]}))
        sq = noise_sqnr(model, apply_recipe(model, recipe), held, fp_out=fp)
        out[name] = {**{k: round(v, 2) for k, v in sq.items()}, "seconds": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(out[name]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"any of: {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run(args.variants, args.size)


if __name__ == "__main__":
    main()
