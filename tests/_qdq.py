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
