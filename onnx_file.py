"""Open an ONNX file given as input and refuse a damaged one up front, naming the file
(torch-free; ``onnx`` is imported on use, so importing this needs no extra).

A truncated ``.onnx`` fails to parse; a truncated or missing external-data file parses fine and
only fails deep inside ONNX Runtime or TensorRT (or, for ``dtq-compare``, after the capture run).
:func:`open_onnx` checks both without reading the weights: every external tensor's byte range
must lie inside its data file.
"""

from __future__ import annotations

import os
from pathlib import Path


class OnnxFileError(ValueError):
    """An ONNX input that is missing, truncated or damaged (bad input: exit 2)."""


def open_onnx(path: str | os.PathLike):
    """The ``onnx.ModelProto`` of ``path`` without its external data, after checking that the file
    parses and that every external-data range exists. Raises :class:`OnnxFileError`."""
    from .extras import require

    onnx = require("onnx", "onnx")
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # google.protobuf DecodeError, ...
        raise OnnxFileError(f"{path} is not a valid ONNX model (truncated or damaged: {type(exc).__name__})") from exc
    if not model.graph.node:
        raise OnnxFileError(f"{path} is not a valid ONNX model (no graph)")
    sizes: dict[Path, int] = {}
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        data = path.parent / info.get("location", "")
        if data not in sizes:
            if not data.is_file():
                raise OnnxFileError(f"{path}: its external data file {data.name} is missing")
            sizes[data] = data.stat().st_size
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        if offset + length > sizes[data]:
            raise OnnxFileError(f"{path}: its external data file {data.name} is truncated (tensor {tensor.name!r} "
                                f"needs bytes {offset}..{offset + length}, the file has {sizes[data]})")
    return model
