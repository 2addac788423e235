"""End-to-end SQNR of the fp32-based Q/DQ graph (ONNX Runtime) vs the recipe's simulated PyTorch
model on the built-in tiny model, per precision, on many random inputs, next to the floors that
the simulation has against itself when only fp32 rounding changes:

- ``sim b8 vs b1``: the same inputs run as batches of 8 and one by one (GEMM blocking changes);
- ``sim sdpa default vs math``: PyTorch's fused CPU attention kernel vs its math decomposition;
- ``tie_aligned``: the graph vs the simulation with rounding ties (and only those) resolved the
  graph's way (tests/_qdq.py ``tie_aligned_comparison``): SQNR, ties aligned, real differences;
- ``sim reciprocal``: a *wrong* simulation that multiplies by ``1 / scale`` instead of dividing
  (QuantizeLinear divides); it only moves rounding ties, so end to end it looks like a floor too,
  which is why the bit-level check is per layer (tests/test_export_qdq.py).

Recipes are the export tests' (tests/export_recipes.py: random balancing at every foldable place,
min-max activation scales). Inputs: x ~ N(0, 1), t uniform in 0..999, y uniform incl. the null
class, ``--n`` rows per seed, batches of 8. ORT with basic optimizations (as the tests).

    python benchmarks/export_vs_simulation.py --n 256 --seeds 1234 99 --out r.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import onnxruntime as ort
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dtq.export.api import ExportConfig, build_graph  # noqa: E402
from dtq.runtime import quant  # noqa: E402
from dtq.runtime.quant import sqnr_db  # noqa: E402
from dtq.runtime.recipe import apply_recipe  # noqa: E402
from dtq.runtime.zoo import load_builtin  # noqa: E402
from export_recipes import inputs, make_recipe  # noqa: E402
from _qdq import tie_aligned_comparison  # noqa: E402

PRECISIONS = ["int8", "fp8", "w4a16", "w4a8"]
BANDS = [(0, 250), (250, 500), (500, 750), (750, 1000)]


@contextlib.contextmanager
def reciprocal_quantizer():
    """The wrong simulation: x * (1 / scale) instead of x / scale."""
    orig = quant.fake_quant

    def fq(x, scale, fmt):
        if fmt in quant.INT_RANGE:
            lo, hi = quant.INT_RANGE[fmt]
            return torch.round(x.float() * (1.0 / scale)).clamp_(lo, hi) * scale
        return orig(x, scale, fmt)

    quant.fake_quant = fq
    try:
        yield
    finally:
        quant.fake_quant = orig


def batched(fn, x, t, y, bs):
    return torch.cat([fn(x[i:i + bs], t[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precisions", nargs="+", default=PRECISIONS)
    ap.add_argument("--n", type=int, default=256, help="rows per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tiny = load_builtin("dit-tiny-fmnist")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    results = {"n_per_seed": args.n, "seeds": args.seeds, "precisions": {}}
    for p in args.precisions:
        t0 = time.perf_counter()
        recipe = make_recipe(tiny, p)
        cfg = ExportConfig(out="unused.onnx", model="dit-tiny-fmnist", precision=p, dtype="fp32", opset=21,
                           max_batch=8).resolved()
        proto = build_graph(tiny, cfg, recipe)
        sess = ort.InferenceSession(proto.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        sim = apply_recipe(tiny, recipe)
        res = {}
        for seed in args.seeds:
            x, t, y = inputs(tiny, args.n, seed=seed)
            graph = batched(lambda a, b, c: torch.from_numpy(
                sess.run(None, {"x": a.numpy(), "t": b.numpy(), "y": c.numpy()})[0]), x, t, y, 8)
            ref = batched(sim, x, t, y, 8)
            row = {"onnx_vs_sim": sqnr_db(ref, graph),
                   "sim_b8_vs_b1": sqnr_db(ref, batched(sim, x, t, y, 1)),
                   "sim_vs_fp": sqnr_db(batched(tiny, x, t, y, 8), ref)}
            with sdpa_kernel(SDPBackend.MATH):
                row["sim_sdpa_default_vs_math"] = sqnr_db(ref, batched(sim, x, t, y, 8))
            with reciprocal_quantizer():
                row["onnx_vs_wrong_sim_reciprocal"] = sqnr_db(batched(sim, x, t, y, 8), graph)
            row["onnx_vs_sim_by_t"] = {f"{lo}-{hi - 1}": sqnr_db(ref[(t >= lo) & (t < hi)], graph[(t >= lo) & (t < hi)])
                                       for lo, hi in BANDS}
            parts = [tie_aligned_comparison(sim, proto, x[i:i + 32], t[i:i + 32], y[i:i + 32])
                     for i in range(0, len(x), 32)]
            row["tie_aligned_onnx_vs_sim"] = sqnr_db(torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts]))
            row["tie_aligned_ties"], row["tie_aligned_real"], row["tie_aligned_codes"] = (
                sum(q[k] for q in parts) for k in (2, 3, 4))
            res[str(seed)] = row
            print(p, seed, " ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if not isinstance(v, dict)),
                  "| by t:", " ".join(f"{k}: {v:.1f}" for k, v in row["onnx_vs_sim_by_t"].items()), flush=True)
        results["precisions"][p] = res
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
