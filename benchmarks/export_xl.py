"""Export DiT-XL/2 (random weights) at one precision; print time and peak memory.

    python benchmarks/export_xl.py --precision fp16 --out /tmp/xl/fp16.onnx
    python benchmarks/export_xl.py --precision int8 --out /tmp/xl/int8.onnx

int8 uses a min-max recipe (random balancing vectors at every foldable place, activation scales
from one calibration batch) made with the recipe API, as the export tests do.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # export_recipes (test helper)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--config", default="DiT-XL/2")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from dtq.export.api import ExportConfig, export_model
    from dtq.runtime.model import DiT, named_config

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = DiT(named_config(args.config)).randomize_(seed=0, std=0.02).eval()
    recipe = None
    t_recipe = 0.0
    if args.precision not in ("fp32", "fp16"):
        from export_recipes import make_recipe

        t1 = time.perf_counter()
        recipe = make_recipe(model, args.precision, group=128, calib_batch=1)
        t_recipe = time.perf_counter() - t1
    t2 = time.perf_counter()
    res = export_model(ExportConfig(out=args.out, model="random", precision=args.precision, max_batch=64),
                       model=model, recipe=recipe)
    t_export = time.perf_counter() - t2
    files = {p.name: p.stat().st_size for p in Path(args.out).parent.iterdir() if p.name.startswith(Path(args.out).name)}
    print(json.dumps({"config": args.config, "precision": args.precision, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                      "export_s": round(t_export, 1), "recipe_s": round(t_recipe, 1), "total_s": round(time.perf_counter() - t0, 1),
                      "peak_rss_GB": round(peak_rss_gb(), 2), "files": files, "qdq_nodes": res.report.checked_nodes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
