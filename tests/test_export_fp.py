"""FP export: the graph computes what PyTorch computes, every Linear is findable by name,
the writer is atomic and records metadata."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

from dtq.export.onnx_export import ExportError, export_torch, find_linears, linear_names, weight_matrix
from dtq.artifacts import read_onnx_metadata as read_metadata
from dtq.export.writer import write_model
from dtq.runtime.zoo import load_builtin

from conftest import fp_export


@pytest.fixture(scope="module")
def tiny():
    return load_builtin("dit-tiny-fmnist")


@pytest.fixture(scope="module")
def fp32_proto(tiny):
    # export_torch's own call, made once a session (conftest.fp_export: test_backends', test_compare's)
    return fp_export(tiny, dtype=torch.float32, opset=18, max_batch=8)


def _inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 32, 32, generator=g)
    t = torch.tensor([0, 500, 999, 250, 10, 700, 42, 900][:batch])
    y = torch.tensor([0, 5, 10, 3, 9, 1, 2, 7][:batch])
    return x, t, y


def _run(proto, x, t, y):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0]


def test_fp32_matches_torch(tiny, fp32_proto):
    onnx.checker.check_model(fp32_proto, full_check=True)
    for batch in (1, 3, 8):  # dynamic batch
        x, t, y = _inputs(batch)
        with torch.no_grad():
            ref = tiny(x, t, y).numpy()
        out = _run(fp32_proto, x, t, y)
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < 1e-4, np.abs(out - ref).max()


def test_fp16_close_to_torch(tiny):
    proto = fp_export(tiny, dtype=torch.float16, opset=21, max_batch=4)  # the Q/DQ tests' fp16 export (fp32 covers 18)
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name: i for i in proto.graph.initializer}
    assert inits["blocks.0.attn.qkv.weight"].data_type == onnx.TensorProto.FLOAT16
    x, t, y = _inputs(3)
    with torch.no_grad():
        ref = tiny(x, t, y).numpy()
    out = _run(proto, x, t, y)
    assert out.dtype == np.float32
    err = np.abs(out - ref).max()
    assert err < 2e-2 * np.abs(ref).max(), err


def test_every_linear_is_findable(tiny, fp32_proto):
    graph = gs.import_onnx(fp32_proto)
    sites = find_linears(graph)
    names = linear_names(tiny)
    assert sorted(sites) == sorted(names) and len(names) == 2 + 5 * 6 + 2
    sd = tiny.state_dict()
    for name, site in sites.items():
        np.testing.assert_array_equal(weight_matrix(graph, site), sd[f"{name}.weight"].numpy())
        assert np.array_equal(np.asarray(graph.tensors()[site.bias].values), sd[f"{name}.bias"].numpy())
    assert sites["blocks.3.mlp.fc2"].op == "MatMul" and sites["blocks.3.mlp.fc2"].node == "blocks.3.mlp.fc2/MatMul"
    assert sites["blocks.3.adaLN_modulation.1"].op == "Gemm"


def test_opset_17_refused(tiny):
    with pytest.raises(ExportError, match="opset 17"):
        export_torch(tiny, opset=17)


def test_writer_atomic_external_and_metadata(tiny, fp32_proto, tmp_path):
    out = tmp_path / "m.onnx"
    write_model(onnx.ModelProto.FromString(fp32_proto.SerializeToString()), out,
                metadata={"precision": "fp32", "recipe_sha256": "abc"}, external_data=True)
    data = [p.name for p in tmp_path.iterdir() if p.name.endswith(".data")]
    assert len(data) == 1 and out.stat().st_size < 200_000
    meta = read_metadata(out)
    assert meta["precision"] == "fp32" and meta["recipe_sha256"] == "abc" and meta["version"]
    x, t, y = _inputs(2)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    first = sess.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0]
    # a failed write (invalid model) leaves the previous model and its data untouched
    bad = onnx.ModelProto.FromString(fp32_proto.SerializeToString())
    bad.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(Exception):
        write_model(bad, out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", *data])
    again = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0]
    np.testing.assert_array_equal(first, again)
    # rewriting replaces the data file and removes the old one
    write_model(onnx.ModelProto.FromString(fp32_proto.SerializeToString()), out, external_data=True)
    data2 = [p.name for p in tmp_path.iterdir() if p.name.endswith(".data")]
    assert len(data2) == 1 and data2 != data
