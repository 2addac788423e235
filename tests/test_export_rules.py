"""The TensorRT rule checker: a valid graph per quantized type passes; graphs built to break
each rule are reported with that rule id and the offending node's name."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dtq.export.rules import RULE_IDS, check_model

K, N = 16, 8  # MatMul weight [K, N]


def _graph(*, qtype=TensorProto.INT8, act_scale=(0.05,), act_zp=0, w_scale=None, w_zp=None, axis=1,
           block=None, w_shape=(K, N), act_q=True, opset=None, act_qtype=None, scale_const=True,
           pair_scale=None):
    """x[2,K] -> Q/DQ (act) -> MatMul(DQ(W)) -> y. Knobs break one rule at a time."""
    nodes, inits = [], []
    act_qtype = qtype if act_qtype is None else act_qtype
    if opset is None:
        opset = 21 if (block or qtype == TensorProto.INT4) else (19 if qtype == TensorProto.FLOAT8E4M3FN else 17)
    x_in = "x"
    if act_q:
        inits.append(helper.make_tensor("a_scale", TensorProto.FLOAT, [len(act_scale)] if len(act_scale) > 1 else [], list(act_scale)))
        inits.append(helper.make_tensor("a_zp", TensorProto.INT8 if act_qtype == TensorProto.INT4 else act_qtype, [len(act_scale)] if len(act_scale) > 1 else [], [act_zp] * len(act_scale)))
        scale_in = "a_scale" if scale_const else "a_scale_dyn"
        if not scale_const:
            nodes.append(helper.make_node("Identity", ["a_scale"], ["a_scale_dyn"], name="scale_id"))
        nodes.append(helper.make_node("QuantizeLinear", ["x", scale_in, "a_zp"], ["xq"], name="act_q"))
        if pair_scale is not None:
            inits.append(helper.make_tensor("a_scale2", TensorProto.FLOAT, [], [pair_scale]))
        nodes.append(helper.make_node("DequantizeLinear", ["xq", "a_scale2" if pair_scale is not None else scale_in, "a_zp"], ["xdq"], name="act_dq"))
        x_in = "xdq"
    rng = np.random.default_rng(0)
    if qtype == TensorProto.INT4:
        wv = rng.integers(-8, 8, size=w_shape)
    elif qtype == TensorProto.FLOAT8E4M3FN:
        wv = rng.normal(size=w_shape).astype(np.float32)
    elif qtype == TensorProto.UINT8:
        wv = rng.integers(0, 256, size=w_shape)
    else:
        wv = rng.integers(-127, 128, size=w_shape)
    inits.append(helper.make_tensor("w_q", qtype, list(w_shape), wv.flatten().tolist()))
    if w_scale is None:
        w_scale = np.full((N,), 0.01, np.float32) if not block else np.full((int(np.ceil(w_shape[0] / block)), w_shape[1]), 0.01, np.float32)
    w_scale = np.asarray(w_scale, np.float32)
    inits.append(helper.make_tensor("w_scale", TensorProto.FLOAT, list(w_scale.shape), w_scale.flatten().tolist()))
    dq_inputs = ["w_q", "w_scale"]
    if w_zp is not None:
        inits.append(helper.make_tensor("w_zp", qtype, list(w_scale.shape), np.broadcast_to(w_zp, w_scale.shape).flatten().tolist()))
        dq_inputs.append("w_zp")
    attrs = {"axis": 0 if block and axis == 1 else axis}  # blocks run along K (MatMul weight [K, N])
    if block:
        attrs["block_size"] = block
    nodes.append(helper.make_node("DequantizeLinear", dq_inputs, ["w"], name="w_dq", **attrs))
    nodes.append(helper.make_node("MatMul", [x_in, "w"], ["y"], name="mm"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, w_shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, w_shape[1]])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize("kind", ["int8", "fp8", "int4"])
def test_valid_graphs_pass(kind):
    if kind == "int8":
        m = _graph()
    elif kind == "fp8":
        m = _graph(qtype=TensorProto.FLOAT8E4M3FN)
    else:
        m = _graph(qtype=TensorProto.INT4, block=8, act_q=False)
    onnx.checker.check_model(m, full_check=True)
    report = check_model(m)
    assert report.ok and not report.findings, report.format()
    assert report.checked_nodes == (1 if kind == "int4" else 3)


CASES = {
    "zero-point": (dict(act_zp=3), "act_q"),
    "scale-constant": (dict(w_scale=np.r_[np.full(N - 1, 0.01), -0.01]), "w_dq"),
    "act-per-tensor": (dict(act_scale=(0.1,) * K), "act_q"),
    "weight-scale-shape": (dict(w_scale=np.full(N + 1, 0.01)), "w_dq"),
    "block-shape": (dict(qtype=TensorProto.INT4, block=8, act_q=False, w_scale=np.full((2, N // 2), 0.01)), "w_dq"),
    "int4-even-dim": (dict(qtype=TensorProto.INT4, block=8, act_q=False, w_shape=(K, 7),
                           w_scale=np.full((2, 7), 0.01)), "w_dq"),
    "int4-weight-only": (dict(qtype=TensorProto.INT4, act_q=False, w_scale=np.full(N, 0.01)), "w_dq"),
    "dtype": (dict(qtype=TensorProto.UINT8), "w_dq"),
    "qdq-pair": (dict(pair_scale=0.07), "act_q"),
    "opset": (dict(qtype=TensorProto.FLOAT8E4M3FN, opset=17), "act_q"),
}


@pytest.mark.parametrize("rule", sorted(CASES))
def test_each_rule_is_reported(rule):
    kwargs, node = CASES[rule]
    report = check_model(_graph(**kwargs))
    hits = [f for f in report.errors if f.rule == rule]
    assert hits, report.format()
    assert any(f.node == node for f in hits), report.format()
    assert not report.ok


def test_weight_zero_point_nonzero():
    report = check_model(_graph(w_zp=1))
    assert any(f.rule == "zero-point" and f.node == "w_dq" for f in report.errors), report.format()


def test_dynamic_scale_reported():
    report = check_model(_graph(scale_const=False))
    assert any(f.rule == "scale-constant" and f.node == "act_q" for f in report.errors), report.format()


def test_opset_out_of_range():
    report = check_model(_graph(opset=23))
    assert any(f.rule == "opset" and f.node == "<model>" for f in report.errors)


def test_w4a8_mix_is_a_warning():
    report = check_model(_graph(qtype=TensorProto.INT4, block=8, act_qtype=TensorProto.INT8))
    assert report.ok, report.format()
    assert [f.rule for f in report.warnings] == ["int4-int8-mix"] and report.warnings[0].node == "mm"


def test_per_token_dynamic_scale_is_a_warning():
    """A computed scale blocked along the last axis (dtq's per-token export) is the warning
    act-dynamic-scale, not a scale-constant error (a computed per-tensor scale stays one: above)."""
    nodes = [helper.make_node("Abs", ["x"], ["ax"], name="abs"),
             helper.make_node("ReduceMax", ["ax", "axes"], ["amax"], keepdims=1, name="amax"),
             helper.make_node("Div", ["amax", "qmax"], ["s"], name="div"),
             helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], axis=-1, block_size=K,
                              output_dtype=TensorProto.INT8, name="act_q"),
             helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"], axis=-1, block_size=K, name="act_dq"),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm")]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("qmax", TensorProto.FLOAT, [], [127.0]),
             helper.make_tensor("w", TensorProto.FLOAT, [K, N], [0.1] * (K * N))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])], inits,
                          value_info=[helper.make_tensor_value_info("xq", TensorProto.INT8, [2, K])])
    report = check_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    assert report.ok, report.format()
    assert [(f.rule, f.node) for f in report.warnings] == [("act-dynamic-scale", "act_q")], report.format()


def test_rule_ids_covered():
    covered = set(CASES) | {"int4-int8-mix", "act-dynamic-scale"}
    assert covered == set(RULE_IDS)
