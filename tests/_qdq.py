"""Test helper: put INT8 per-output-channel weight Q/DQ (TensorRT's layout: an int8 initializer,
DequantizeLinear with a 1-D scale on the output-channel axis) on Linears of a dtq FP graph, with
an optional deliberately wrong scale on one layer. Not a product feature: export/ owns Q/DQ export."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dtq.export.onnx_export import find_linears


def weight_qdq(model: onnx.ModelProto, layers: list[str], broken: dict[str, float] | None = None) -> onnx.ModelProto:
    """``broken[layer] = f`` dequantizes that layer's weight with ``f`` times its true scale."""
    broken = broken or {}
    graph = gs.import_onnx(model)
    sites = find_linears(graph)
    nodes = {n.name: n for n in graph.nodes}
    for name in layers:
        site = sites[name]
        node = nodes[site.node]
        w = np.asarray(node.inputs[1].values, dtype=np.float32)
        axis = site.out_axis
        amax = np.abs(w).max(axis=1 - axis)
        scale = np.maximum(amax / 127.0, 1e-12).astype(np.float32)
        shape = [1, 1]
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -128, 127).astype(np.int8)
        dq_scale = (scale * broken.get(name, 1.0)).astype(np.float32)
        wq = gs.Constant(f"{name}.weight_quantized", q)
        out = gs.Variable(f"{name}.weight_dq", dtype=np.float32, shape=list(w.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", f"{name}/weight/DequantizeLinear",
                                   attrs={"axis": axis},
                                   inputs=[wq, gs.Constant(f"{name}.weight_scale", dq_scale),
                                           gs.Constant(f"{name}.weight_zero_point", np.zeros_like(q, shape=scale.shape))],
                                   outputs=[out]))
        node.inputs[1] = out
    out_model = gs.export_onnx(graph.cleanup().toposort())
    out_model.ir_version = model.ir_version
    return out_model


def tie_aligned_comparison(sim, proto: onnx.ModelProto, x, t, y, eps: float = 1e-4):
    """End-to-end graph vs simulation with rounding ties resolved the graph's way.

    Runs ``proto`` in ONNX Runtime with every activation ``L/input_dq`` exposed, then the simulation
    with each activation quantizer computing its own codes (``quant.fake_quant``, x / scale, round
    half to even, saturate) and taking the graph's code only where the two differ and the graph's
    code is what the simulation's quantizer gives for an input within ``eps * (|x / scale| + 1)``
    steps of its own (a rounding tie that fp32 noise in an upstream op may legitimately flip). Any
    other difference is counted as ``real``. Returns ``(sim_out, graph_out, ties, real, total)``:
    ``total`` quantized activation values compared."""
    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    from dtq.runtime import quant
    from dtq.runtime.rotation import rotated_input

    graph = gs.import_onnx(proto)
    nodes = {n.name: n for n in graph.nodes}
    names = [n[:-len("/input_dq")] for n in nodes if n.endswith("/input_dq")]
    taps = [nodes[f"{n}/input_dq"].outputs[0] for n in names]
    for v in taps:
        v.dtype = np.float32
    graph.outputs = graph.outputs + taps
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(gs.export_onnx(graph).SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = sess.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})
    graph_out, dq = torch.from_numpy(values[0]), {n: torch.from_numpy(v) for n, v in zip(names, values[1:])}
    stats = {"ties": 0, "real": 0, "total": 0}

    def pre_quant_hook(name):
        def hook(mod, args):
            xx = rotated_input(mod, args[0])  # an fc2 Hadamard rotation comes before the balancing Mul
            xx = xx if mod.input_mul is None else xx * mod.input_mul
            s, fmt = mod.act_scale, mod.act_format
            mine, theirs = quant.fake_quant(xx, s, fmt), dq[name]
            differ = mine != theirs
            if differ.any():
                v = xx / s
                delta = eps * (v.abs() + 1)
                tie = differ & ((theirs == quant.fake_quant((v - delta) * s, s, fmt))
                                | (theirs == quant.fake_quant((v + delta) * s, s, fmt)))
                stats["ties"] += int(tie.sum())
                stats["real"] += int((differ & ~tie).sum())
                mine = torch.where(tie, theirs, mine)
            stats["total"] += mine.numel()
            return mine
        return hook

    hooks = []
    for name in names:
        mod = sim.get_submodule(name)
        # the hook hands forward the aligned dequantized input; the layer then only does the GEMM
        hooks.append(mod.register_forward_hook(
            lambda m, args, out, h=pre_quant_hook(name): F.linear(h(m, args), m.fake_quant_weight(), m.bias)))
    try:
        with torch.no_grad():
            sim_out = sim(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    return sim_out, graph_out, stats["ties"], stats["real"], stats["total"]
