"""Parity with NVIDIA ModelOpt's INT8 SmoothQuant on the reference DiT-S/2 (ModelOpt is not a dtq
dependency). Run in an environment where ``import modelopt`` works (CPU torch is enough):

    PYTHONPATH=... python benchmarks/modelopt_parity.py [--ckpt PATH] [--out results.json]

Same calibration rows (the FP sampler's denoiser inputs, dtq.calibrate.data) for both; evaluated
on other rows (another seed). Reports, per candidate, SQNR of the noise+variance prediction vs the
FP model, and the Q/DQ placement (which Linears get input/weight quantizers, where smoothing sits):
- ModelOpt INT8_SMOOTHQUANT_CFG as shipped (every Linear it matches), and restricted to the DiT
  block Linears dtq quantizes (qkv, proj, fc1, fc2), fake-quant in torch;
- dtq smoothquant recipe (dtq.calibrate) exported to an fp32-based Q/DQ ONNX graph, run in ONNX
  Runtime (basic optimizations), and dtq's own simulation of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from dtq.calibrate.api import calibrate
from dtq.calibrate.config import CalibConfig, CalibDataConfig
from dtq.calibrate.data import collect_calibration_set
from dtq.export.api import ExportConfig, export_model
from dtq.runtime.checkpoint import load_checkpoint
from dtq.runtime.quant import sqnr_db
from dtq.runtime.recipe import apply_recipe

REFERENCE = "/work/shared/reference/dit-s2-fmnist/model.safetensors"
BLOCK_ROLES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@torch.no_grad()
def run_torch(model, rows, batch=16):
    return torch.cat([model(x, t, y).float() for x, t, y in rows.batches(batch)])


def run_onnx(path, rows, batch=16):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0] for x, t, y in rows.batches(batch)]
    return torch.from_numpy(np.concatenate(outs))


def modelopt_candidate(model, calib, restrict: bool):
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    if restrict:  # dtq's placement: only the four Linears of each DiT block
        for pattern in ("*adaLN_modulation*", "*t_embedder*", "*final_layer*", "*x_embedder*", "*y_embedder*"):
            cfg["quant_cfg"].append({"quantizer_name": pattern, "enable": False})
    t0 = time.perf_counter()
    qmodel = mtq.quantize(copy.deepcopy(model), cfg, forward_loop=calib.forward_loop(batch_size=16))
    seconds = time.perf_counter() - t0
    placement = {}
    for name, m in qmodel.named_modules():
        iq, wq = getattr(m, "input_quantizer", None), getattr(m, "weight_quantizer", None)
        if iq is None and wq is None:
            continue
        entry = {"input": bool(iq is not None and iq.is_enabled), "weight": bool(wq is not None and wq.is_enabled)}
        if not (entry["input"] or entry["weight"]):
            continue
        entry["smoothing"] = "runtime pre_quant_scale (Mul)" if getattr(iq, "pre_quant_scale", None) is not None else None
        entry["weight_axis"] = getattr(wq, "axis", None)
        placement[name] = entry
    return qmodel.eval(), placement, seconds


def dtq_placement(recipe):
    return {name: {"input": layer.act_format, "weight": f"{layer.weight_format}/{layer.weight_granularity}",
                   "smoothing": layer.balance_fold} for name, layer in recipe.layers.items()}


def summarize_placement(placement):
    roles = {}
    for name, e in placement.items():
        role = ".".join(name.split(".")[2:]) if name.startswith("blocks.") else name
        roles.setdefault(role, []).append(e)
    return {role: {"count": len(es), **es[0]} for role, es in roles.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=REFERENCE)
    ap.add_argument("--cali-n", type=int, default=8)
    ap.add_argument("--cali-steps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_checkpoint(args.ckpt).eval()
    t0 = time.perf_counter()
    data_cfg = CalibDataConfig(cali_steps=args.cali_steps, cali_n=args.cali_n, steps=args.steps, seed=0)
    calib = collect_calibration_set(model, data_cfg)
    evalset = collect_calibration_set(model, CalibDataConfig(cali_steps=args.cali_steps, cali_n=max(2, args.cali_n // 2),
                                                             steps=args.steps, seed=1))
    print(f"calibration rows {len(calib)}, eval rows {len(evalset)} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    ref = run_torch(model, evalset)
    results = {"model": args.ckpt, "calib_rows": len(calib), "eval_rows": len(evalset), "candidates": {}}

    for method in ("smoothquant", "minmax"):
        t1 = time.perf_counter()
        recipe = calibrate(model, calib, CalibConfig(method=method, alpha=args.alpha, progress=False))
        with tempfile.TemporaryDirectory() as tmp:
            res = export_model(ExportConfig(out=f"{tmp}/m.onnx", model="ref", precision="int8", dtype="fp32",
                                            max_batch=64), model=model, recipe=recipe)
            out = run_onnx(res.path, evalset)
        sim = run_torch(apply_recipe(model, recipe), evalset)
        results["candidates"][f"dtq-{method} (ONNX Q/DQ, ORT)"] = {
            "sqnr_vs_fp_db": round(sqnr_db(ref, out), 2), "sim_sqnr_vs_fp_db": round(sqnr_db(ref, sim), 2),
            "onnx_vs_sim_db": round(sqnr_db(sim, out), 2), "seconds": round(time.perf_counter() - t1, 1),
            "qdq_nodes": res.report.checked_nodes, "placement": summarize_placement(dtq_placement(recipe))}
        print(method, results["candidates"][f"dtq-{method} (ONNX Q/DQ, ORT)"]["sqnr_vs_fp_db"], file=sys.stderr)

    try:
        import modelopt  # noqa: F401
    except ImportError as exc:
        results["modelopt"] = f"not importable: {exc}"
    else:
        results["modelopt_version"] = modelopt.__version__
        for restrict in (False, True):
            qmodel, placement, seconds = modelopt_candidate(model, calib, restrict)
            out = run_torch(qmodel, evalset)
            key = "modelopt INT8_SMOOTHQUANT_CFG" + (" (block Linears only)" if restrict else " (as shipped)")
            results["candidates"][key] = {"sqnr_vs_fp_db": round(sqnr_db(ref, out), 2), "seconds": round(seconds, 1),
                                          "quantized_modules": len(placement),
                                          "placement": summarize_placement(placement)}
            print(key, results["candidates"][key]["sqnr_vs_fp_db"], file=sys.stderr)
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
