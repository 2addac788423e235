"""A truncated .onnx or external-data file given to any reader (dtq-sample --onnx, dtq-compare,
dtq-build-engine, OnnxDenoiser) is refused up front with exit 2 and one line naming the file:
no traceback, no output directory, and for dtq-compare no capture run first."""

import shutil

import onnx
import pytest

from dtq.onnx_file import OnnxFileError, open_onnx
from dtq.runtime.backends import OnnxDenoiser
from dtq.runtime.zoo import load_builtin

from conftest import fp_export


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """The tiny model's FP export, once inline and once with external data (as dtq-export
    --external-data writes it), plus truncated copies of each."""
    from dtq.export.writer import write_model

    d = tmp_path_factory.mktemp("onnx")
    model = load_builtin("dit-tiny-fmnist")
    meta = {"precision": "fp32", "batch_range": [1, 64], "model_config": model.config.to_dict()}
    proto = fp_export(model, opset=18, min_batch=1, max_batch=64)  # test_backends' and test_compare's
    write_model(onnx.load_from_string(proto.SerializeToString()), d / "inline" / "m.onnx", metadata=meta)
    write_model(proto, d / "ext" / "m.onnx", metadata=meta, external_data=True)
    files = {"inline": d / "inline" / "m.onnx", "ext": d / "ext" / "m.onnx"}
    # a truncated .onnx
    (d / "trunc").mkdir()
    data = files["inline"].read_bytes()
    (d / "trunc" / "m.onnx").write_bytes(data[: len(data) // 2])
    files["truncated-onnx"] = d / "trunc" / "m.onnx"
    # the external-data export with its data file cut in half, and with it missing
    shutil.copytree(d / "ext", d / "ext-trunc")
    (data_file,) = (d / "ext-trunc").glob("*.data")
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    files["truncated-data"] = d / "ext-trunc" / "m.onnx"
    shutil.copytree(d / "ext", d / "ext-missing")
    for f in (d / "ext-missing").glob("*.data"):
        f.unlink()
    files["missing-data"] = d / "ext-missing" / "m.onnx"
    return files


BAD = {"truncated-onnx": "is not a valid ONNX model", "truncated-data": "is truncated",
       "missing-data": "is missing"}


def test_good_exports_open(onnx_files):
    for kind in ("inline", "ext"):
        assert len(open_onnx(onnx_files[kind]).graph.node) > 0
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in open_onnx(onnx_files["ext"]).graph.initializer)


@pytest.mark.parametrize("kind", list(BAD))
def test_open_onnx_and_onnx_runtime_backend_refuse(onnx_files, kind):
    with pytest.raises(OnnxFileError, match=BAD[kind]) as exc:
        open_onnx(onnx_files[kind])
    assert str(onnx_files[kind]) in str(exc.value)
    with pytest.raises(OnnxFileError, match=BAD[kind]):
        OnnxDenoiser(onnx_files[kind])


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("kind", list(BAD))
def test_dtq_sample_refuses(onnx_files, tmp_path, capsys, kind):
    from dtq.tools.sample import main

    out = tmp_path / "s"
    assert main(["--backend", f"onnx:{onnx_files[kind]}", "--device", "cpu", "--steps", "2", "--classes", "1",
                 "--per-class", "1", "--out", str(out), "--no-progress"]) == 2
    assert BAD[kind] in _one_line_error(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("kind", list(BAD))
def test_dtq_compare_refuses_before_capturing(onnx_files, tmp_path, capsys, monkeypatch, kind):
    from dtq.tools import compare

    monkeypatch.setattr(compare, "capture", lambda *a, **k: pytest.fail("captured before the ONNX was checked"))
    out = tmp_path / "cmp"
    assert compare.main(["--candidate", str(onnx_files[kind]), "--steps", "2", "--out", str(out)]) == 2
    assert BAD[kind] in _one_line_error(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("kind", list(BAD))
def test_dtq_build_engine_refuses(onnx_files, tmp_path, capsys, kind):
    from dtq.tools.build_engine import main

    out = tmp_path / "engine"
    assert main([str(onnx_files[kind]), "--out", str(out)]) == 2
    assert BAD[kind] in _one_line_error(capsys.readouterr().err)
    assert not out.exists()
