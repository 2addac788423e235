"""Parity with NVIDIA ModelOpt's INT8 SmoothQuant on the reference DiT-S/2 (ModelOpt is not a dtq
dependency). Run in an environment where ``import modelopt`` works (CPU torch is enough):

    python benchmarks/modelopt_parity.py   # dtq installed with pip install -e . [--ckpt PATH] [--out results.json]

Same calibration rows (the FP sampler's denoiser inputs, dtq.calibrate.data) for both; evaluated
on other rows (another seed). Reports, per candidate, SQNR of the noise+variance prediction vs the
FP model, and the Q/DQ placement (which Linears get input/weight quantizers, where smoothing sits):
- ModelOpt INT8_SMOOTHQUANT_CFG as shipped (every Linear it matches), and restricted to the DiT
  block Linears dtq quantizes (qkv, proj, fc1, fc2), fake-quant in torch;
- dtq recipes (dtq.calibrate; ``DTQ_CANDIDATES``: minmax, smoothquant variants, ptq4dit, ditas)
  exported to an fp32-based Q/DQ ONNX graph, run in ONNX Runtime (basic optimizations), and dtq's
  own simulation of it;
- ModelOpt's calibration transplanted into a dtq recipe and exported the same way;
- ModelOpt's own ONNX export of its block-Linears model (TorchScript exporter, ``dynamo=False``,
  where its TensorQuantizer symbolics emit QuantizeLinear/DequantizeLinear), run in ONNX Runtime.
Q/DQ placement of every exported graph is read from the ONNX file itself (``onnx_placement``).
SQNR is reported overall and at three recorded timesteps (first, middle, last). Separate runs of
one protocol can be merged with ``--merge a.json b.json --out all.json``. Results and commands:
docs/export.md ("Parity with NVIDIA ModelOpt").
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

# the reference DiT-S/2 in ../shared, beside the repository
REFERENCE = str(Path(__file__).resolve().parents[2] / "shared" / "reference" / "dit-s2-fmnist" / "model.safetensors")
# dtq candidates, one CalibConfig each (same calibration rows, same export, same evaluation)
DTQ_CANDIDATES = {
    "minmax": dict(method="minmax"),
    "smoothquant-a0.5-nofc2": dict(method="smoothquant", alpha=0.5, smooth_fc2=False),  # dtq before this change
    "smoothquant-a0.5": dict(method="smoothquant", alpha=0.5),
    "smoothquant-a1.0-nofc2": dict(method="smoothquant", alpha=1.0, smooth_fc2=False),
    "smoothquant-a1.0": dict(method="smoothquant", alpha=1.0),
    "smoothquant": dict(method="smoothquant"),  # CalibConfig defaults
    "smoothquant-mse": dict(method="smoothquant", alpha=1.0, weight_search="mse", act_search="mse"),  # clip search too
    "ptq4dit": dict(method="ptq4dit"),
    "ditas": dict(method="ditas"),
}
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


def sqnr_by_step(ref, out, rows, picks=3):
    """SQNR overall and at ``picks`` recorded timesteps (first, middle, last). Outputs are in the
    order of ``rows.batches`` (rows sorted by trajectory step)."""
    order = torch.argsort(rows.step, stable=True)
    step, t = rows.step[order], rows.t[order]
    recorded = rows.recorded_steps()
    chosen = [recorded[round(i * (len(recorded) - 1) / (picks - 1))] for i in range(picks)]
    res = {"overall": round(sqnr_db(ref, out), 2)}
    for k in chosen:
        m = step == k
        res[f"t={int(t[m][0])}"] = round(sqnr_db(ref[m], out[m]), 2)
    return res


def modelopt_candidate(model, calib, restrict: bool):
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    if restrict:  # dtq's placement: only the four Linears of each DiT block
        for pattern in ("*adaLN_modulation*", "*t_embedder*", "*final_layer*", "*x_embedder*", "*y_embedder*",
                        "*norm*"):  # ModelOpt also puts input quantizers on LayerNorms
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


def recipe_from_modelopt(model, qmodel):
    """ModelOpt's calibration as a dtq recipe: ``pre_quant_scale`` s (ModelOpt computes x * s and
    W / s) is the balancing vector b = 1 / s, folded where dtq can fold it (adaLN for qkv/fc1, V for
    proj) and a run-time Mul elsewhere (fc2); act scale = ModelOpt's per-tensor amax / 127; weight
    scales min-max of the balanced weight (what ModelOpt's max calibration computes)."""
    from dtq.runtime.recipe import LayerRecipe, Recipe, model_fingerprint

    fold = {"attn.qkv": "adaLN", "mlp.fc1": "adaLN", "attn.proj": "v", "mlp.fc2": "runtime"}
    layers, tensors = {}, {}
    for i in range(model.config.depth):
        for role in BLOCK_ROLES:
            name = f"blocks.{i}.{role}"
            m = qmodel.get_submodule(name)
            iq = m.input_quantizer
            layer = LayerRecipe(weight_format="int8", weight_granularity="channel", act_format="int8",
                                act_scale=float(iq.amax.float().max()) / 127.0)
            pqs = getattr(iq, "pre_quant_scale", None)
            if pqs is not None:
                tensors[f"{name}.balance"] = (1.0 / pqs.float()).detach().cpu()
                layer.balance, layer.balance_fold = f"{name}.balance", fold[role]
            layers[name] = layer
    return Recipe("modelopt-smoothquant", model_fingerprint(model), layers, tensors,
                  model_config=model.config.to_dict())


def dtq_placement(recipe):
    return {name: {"input": layer.act_format, "weight": f"{layer.weight_format}/{layer.weight_granularity}",
                   "smoothing": layer.balance_fold} for name, layer in recipe.layers.items()}


def summarize_placement(placement):
    roles = {}
    for name, e in placement.items():
        role = ".".join(name.split(".")[2:]) if name.startswith("blocks.") else name
        roles.setdefault(role, []).append(e)
    return {role: {"count": len(es), **es[0]} for role, es in roles.items()}


def _layer_of(node_name: str) -> str:
    """Module name of a MatMul/Gemm node: dtq names ``blocks.0.attn.qkv/MatMul``, the TorchScript
    exporter ``/blocks.0/attn/qkv/MatMul``."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def onnx_placement(path) -> dict:
    """Q/DQ placement read from an ONNX graph (not from the torch model): per MatMul/Gemm, whether
    its activation input is Q->DQ (per tensor or per axis), whether a run-time Mul by a constant
    vector sits before that Q (smoothing), and the weight's DQ (axis, and whether the weight is
    stored quantized or quantized at run time by a QuantizeLinear on a float initializer)."""
    import onnx

    m = onnx.load(str(path))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    const_out = {o for n in g.node if n.op_type == "Constant" for o in n.output}

    def src(name):
        n = prod.get(name)
        while n is not None and n.op_type in ("Transpose", "Cast", "Reshape", "Identity"):
            n = prod.get(n.input[0])
        return n

    def attr(n, key, default=None):
        for a in n.attribute:
            if a.name == key:
                return onnx.helper.get_attribute_value(a)
        return default

    def is_const(name):
        return name in inits or name in const_out

    def scale_shape(name):
        if name in inits:
            return list(inits[name].dims)
        n = prod.get(name)
        return list(onnx.helper.get_attribute_value(n.attribute[0]).dims) if n is not None and n.op_type == "Constant" else None

    rows = {}
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        a, w = src(n.input[0]), src(n.input[1])
        row = {"op": n.op_type, "input": None, "smoothing_mul": False, "weight": None}
        if a is not None and a.op_type == "DequantizeLinear" and prod.get(a.input[0]) is not None \
                and prod[a.input[0]].op_type == "QuantizeLinear":
            q = prod[a.input[0]]
            shape = scale_shape(q.input[1])
            row["input"] = "Q/DQ per tensor" if shape in ([], [1], None) and attr(q, "axis") is None else f"Q/DQ axis {attr(q, 'axis')}"
            pre = prod.get(q.input[0])
            row["smoothing_mul"] = bool(pre is not None and pre.op_type == "Mul" and any(is_const(i) for i in pre.input))
        if w is not None and w.op_type == "DequantizeLinear":
            wq = prod.get(w.input[0])
            stored = "int8 initializer" if w.input[0] in inits else (
                "QuantizeLinear of the float weight at run time" if wq is not None and wq.op_type == "QuantizeLinear" else "other")
            weight_src = w.input[0] if w.input[0] in inits else (wq.input[0] if wq is not None else None)
            dims = list(inits[weight_src].dims) if weight_src in inits else None
            axis = attr(w, "axis", 1)
            # the DQ'd tensor is [C_out, C_in] when the MatMul reads it through a Transpose (ModelOpt)
            # or a Gemm reads it with transB=1 (dtq's 2-D Linears); [C_in, C_out] when a MatMul reads it
            # directly (dtq's W^T initializers)
            transposed = prod.get(n.input[1]) is not None and prod[n.input[1]].op_type == "Transpose"
            out_axis = 0 if (transposed or (n.op_type == "Gemm" and attr(n, "transB", 0))) else 1
            row["weight"] = {"dq_axis": axis, "weight_shape": dims, "stored": stored,
                             "per": "output channel" if axis == out_axis else "input channel"}
        if row["input"] or row["weight"]:
            rows[_layer_of(n.name)] = row
    counts = {}
    for n in g.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {"layers": rows, "op_counts": {k: counts.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear", "MatMul", "Gemm")},
            "smoothing_muls": sum(r["smoothing_mul"] for r in rows.values())}


def summarize_onnx_placement(pl: dict) -> dict:
    roles = {}
    for name, row in pl["layers"].items():
        if not name.startswith("blocks."):
            roles.setdefault(name, []).append(row)
            continue
        roles.setdefault(".".join(name.split(".")[2:]), []).append(row)
    out = {}
    for role, rs in roles.items():
        distinct = {json.dumps(r, sort_keys=True) for r in rs}
        out[role] = {"count": len(rs), **(rs[0] if len(distinct) == 1 else {"rows_differ": sorted(distinct)})}
    return {"by_role": out, "op_counts": pl["op_counts"], "smoothing_muls": pl["smoothing_muls"]}


def export_modelopt_onnx(qmodel, sample, path, opset: int = 17) -> float:
    """ModelOpt's own ONNX export: the TorchScript exporter (``dynamo=False``), where ModelOpt's
    TensorQuantizer autograd functions emit QuantizeLinear/DequantizeLinear through their
    ``symbolic`` (modelopt.torch.quantization.export_onnx.export_int8). No export-mode context is
    needed for INT8 (``export_torch_mode`` is for torch.export); pre_quant_scale stays a Mul."""
    x, t, y = sample
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(qmodel, (x, t, y), str(path), dynamo=False, opset_version=opset,
                          input_names=["x", "t", "y"], output_names=["out"],
                          dynamic_axes={k: {0: "batch"} for k in ("x", "t", "y", "out")})
    return time.perf_counter() - t0


def dtq_onnx_result(model, recipe, evalset, ref) -> dict:
    """Export ``recipe`` as dtq's int8 Q/DQ graph, run it in ORT and its simulation in torch: the
    SQNRs, Q/DQ counts and placement one candidate row reports."""
    with tempfile.TemporaryDirectory() as tmp:
        res = export_model(ExportConfig(out=f"{tmp}/m.onnx", model="ref", precision="int8", dtype="fp32",
                                        max_batch=64), model=model, recipe=recipe)
        out = run_onnx(res.path, evalset)
        graph_placement = summarize_onnx_placement(onnx_placement(res.path))
    sim = run_torch(apply_recipe(model, recipe), evalset)
    return {"onnx_placement": graph_placement,
            "sqnr_vs_fp_db": round(sqnr_db(ref, out), 2), "sqnr_by_timestep_db": sqnr_by_step(ref, out, evalset),
            "sim_sqnr_vs_fp_db": round(sqnr_db(ref, sim), 2), "onnx_vs_sim_db": round(sqnr_db(sim, out), 2),
            "qdq_nodes": res.report.checked_nodes, "placement": summarize_placement(dtq_placement(recipe))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=REFERENCE)
    ap.add_argument("--cali-n", type=int, default=8)
    ap.add_argument("--cali-steps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", choices=["dtq", "modelopt"], help="run one side only")
    ap.add_argument("--methods", nargs="+", default=list(DTQ_CANDIDATES), choices=list(DTQ_CANDIDATES),
                    help="dtq candidates to run")
    ap.add_argument("--skip-shipped", action="store_true", help="skip ModelOpt's as-shipped (all modules) config")
    ap.add_argument("--merge", nargs="+", help="merge result JSONs of separate runs (same protocol) and exit")
    ap.add_argument("--modelopt-opset", type=int, default=17, help="opset of ModelOpt's TorchScript ONNX export")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        merged = {k: v for part in parts for k, v in part.items() if k != "candidates"}
        if "modelopt_version" in merged:  # one part ran ModelOpt: drop another part's "skipped" note
            merged.pop("modelopt", None)
        merged["candidates"] = {k: v for part in parts for k, v in part["candidates"].items()}
        text = json.dumps(merged, indent=1, default=str)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
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
    t_start = t0

    for method in args.methods if args.only != "modelopt" else ():
        t1 = time.perf_counter()
        recipe = calibrate(model, calib, CalibConfig(**DTQ_CANDIDATES[method], progress=False))
        results["candidates"][f"dtq-{method} (ONNX Q/DQ, ORT)"] = {
            **dtq_onnx_result(model, recipe, evalset, ref),
            "config": DTQ_CANDIDATES[method], "recipe_options": recipe.options, "recipe_info": recipe.info,
            "seconds": round(time.perf_counter() - t1, 1)}
        print(method, results["candidates"][f"dtq-{method} (ONNX Q/DQ, ORT)"]["sqnr_vs_fp_db"], file=sys.stderr)

    try:
        if args.only == "dtq":
            raise ImportError("skipped (--only dtq)")
        import modelopt  # noqa: F401
    except ImportError as exc:
        results["modelopt"] = f"not importable: {exc}"
    else:
        results["modelopt_version"] = modelopt.__version__
        for restrict in (True,) if args.skip_shipped else (False, True):
            qmodel, placement, seconds = modelopt_candidate(model, calib, restrict)
            modelopt_fq = run_torch(qmodel, evalset)
            key = "modelopt INT8_SMOOTHQUANT_CFG" + (" (block Linears only)" if restrict else " (as shipped)")
            results["candidates"][key] = {"sqnr_vs_fp_db": round(sqnr_db(ref, modelopt_fq), 2),
                                          "sqnr_by_timestep_db": sqnr_by_step(ref, modelopt_fq, evalset),
                                          "seconds": round(seconds, 1),
                                          "quantized_modules": len(placement),
                                          "placement": summarize_placement(placement)}
            print(key, results["candidates"][key]["sqnr_vs_fp_db"], file=sys.stderr)
            if restrict:  # the export layer at parity: ModelOpt's own calibration through dtq's export
                key = "dtq export of ModelOpt's calibration (ONNX Q/DQ, ORT)"
                results["candidates"][key] = dtq_onnx_result(model, recipe_from_modelopt(model, qmodel), evalset, ref)
                print(key, results["candidates"][key]["sqnr_vs_fp_db"], file=sys.stderr)
                key = "modelopt INT8_SMOOTHQUANT_CFG (block Linears only), ModelOpt's ONNX export (TorchScript, ORT)"
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "modelopt.onnx"
                    try:
                        seconds = export_modelopt_onnx(qmodel, next(iter(evalset.batches(16))), path,
                                                       opset=args.modelopt_opset)
                        out = run_onnx(path, evalset)
                    except Exception as exc:  # record the exact failure in the results
                        results["candidates"][key] = {"error": f"{type(exc).__name__}: {exc}"}
                    else:
                        results["candidates"][key] = {
                            "sqnr_vs_fp_db": round(sqnr_db(ref, out), 2),
                            "sqnr_by_timestep_db": sqnr_by_step(ref, out, evalset),
                            "onnx_vs_modelopt_torch_db": round(sqnr_db(modelopt_fq, out), 2),
                            "export": f"torch.onnx.export(dynamo=False, opset_version={args.modelopt_opset})",
                            "export_seconds": round(seconds, 1), "onnx_bytes": path.stat().st_size,
                            "onnx_placement": summarize_onnx_placement(onnx_placement(path))}
                print(key, results["candidates"][key].get("sqnr_vs_fp_db", results["candidates"][key].get("error")),
                      file=sys.stderr)
    results["seconds_total"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
