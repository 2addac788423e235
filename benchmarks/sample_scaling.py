"""Scaling of data-parallel sampling: ``torchrun --nproc-per-node N -m dtq.tools.sample`` for each N.

Each N runs twice, with a small and a large image count; throughput is the difference of images
over the difference of wall times, which cancels what every run pays once (process start, model
load, CUDA initialisation, writing the files). Speedup and efficiency are against the first N. The
samples of every N are checked equal to N = 1's (same seed and batch size: the same .npz).

    python benchmarks/sample_scaling.py --gpus 1,2,4,8 --model DiT-XL/2 --num-images 64,512 \\
        --batch-size 32 --steps 50 --out benchmarks/results/sample_scaling.json
    python benchmarks/sample_scaling.py --gpus 1,2 --device cpu --num-images 4,8 --batch-size 2 --steps 2 \\
        --model dit-tiny-fmnist   # a CPU rehearsal over gloo

``--model`` takes a built-in model (trained weights) or a DiT size (``DiT-XL/2``: random weights,
for speed only); ``--extra`` passes further dtq-sample options (e.g. "--dtype bf16").
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(n_proc: int, num_images: int, args: argparse.Namespace, out: Path) -> float:
    """Wall seconds of one torchrun sampling job."""
    model = ["--model", args.model] + ([] if args.model.startswith("dit-") else ["--random-weights"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n_proc),
           "-m", "dtq.tools.sample", *model, "--num-images", str(num_images), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--device", args.device, "--seed", "0", "--no-progress",
           *shlex.split(args.extra), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="1,2,4,8", help="process counts to measure, comma-separated")
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--num-images", default="64,512", help="SMALL,LARGE image counts (their difference is timed)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--extra", default="", help="further dtq-sample options, one string")
    p.add_argument("--out", type=Path, default=Path("sample_scaling.json"))
    args = p.parse_args(argv)
    counts = [int(v) for v in args.gpus.split(",")]
    small, large = (int(v) for v in args.num_images.split(","))
    if large <= small:
        print("error: --num-images SMALL,LARGE needs LARGE > SMALL", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if max(counts) > torch.cuda.device_count():
            print(f"error: {max(counts)} processes but {torch.cuda.device_count()} GPUs", file=sys.stderr)
            return 2
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            t_small = run_once(n, small, args, Path(tmp) / f"s{n}")
            t_large = run_once(n, large, args, Path(tmp) / f"l{n}")
            npz = (Path(tmp) / f"l{n}" / "samples.npz").read_bytes()
            reference = npz if reference is None else reference
            rows.append({"processes": n, "seconds_small": round(t_small, 2), "seconds_large": round(t_large, 2),
                         "images_per_s": round((large - small) / max(t_large - t_small, 1e-9), 3),
                         "same_samples_as_first": npz == reference})
            print(json.dumps(rows[-1]), flush=True)
    first = rows[0]
    for r in rows:  # against the first count (N = 1 when --gpus starts with 1)
        r["speedup"] = round(r["images_per_s"] / first["images_per_s"], 2)
        r["efficiency"] = round(r["speedup"] * first["processes"] / r["processes"], 3)
    result = {"command": shlex.join([sys.executable, *sys.argv]), "model": args.model, "steps": args.steps,
              "batch_size": args.batch_size, "num_images": [small, large], "device": args.device,
              "host": os.uname().nodename, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["same_samples_as_first"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
