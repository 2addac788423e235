"""Write an ONNX model atomically, with external data for large weights and dtq metadata.

Atomicity: everything is written into a temporary directory beside the target and checked
(``onnx.checker`` on the path, so >2 GB models work); then the weights file (named with a
unique token, ``model.onnx.<token>.data``) is moved into place, then ``model.onnx`` itself with
one ``os.replace``. A reader sees the old model or the new one, never a half-written file; the
old model's data file is removed only after the new ``.onnx`` is in place. On any failure the
target is untouched and the temporary files are removed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx.external_data_helper import _get_all_tensors, uses_external_data

from .. import __version__ as DTQ_VERSION
from ..artifacts import META_PREFIX, META_VERSION

# above this many bytes of weights, they go to an external data file (protobuf's hard limit is 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1 << 30


class WriteError(RuntimeError):
    pass


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in _get_all_tensors(model) if t.HasField("raw_data"))


def set_metadata(model: onnx.ModelProto, values: dict[str, object]) -> None:
    """Set ``dtq.<key>`` metadata_props (JSON for non-strings), replacing existing keys."""
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in values.items():
        props[META_PREFIX + key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    del model.metadata_props[:]
    for key in sorted(props):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, props[key]


def write_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    metadata: dict[str, object] | None = None,
    external_data: bool | None = None,
    check: bool = True,
) -> Path:
    """Write ``model`` to ``path`` atomically; ``external_data=None`` decides by size.
    ``model`` is modified (metadata; with external data its tensors point to the file)."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise WriteError(f"output must end in .onnx: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    set_metadata(model, {META_VERSION: DTQ_VERSION, **(metadata or {})})
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    old_data = _external_files(path) if path.exists() else set()
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = tmpdir / path.name
        data_name = f"{path.name}.{secrets.token_hex(4)}.data" if external_data else None
        if external_data:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024, convert_attribute=False)
        else:
            onnx.save_model(model, str(tmp_model))
        if check:
            onnx.checker.check_model(str(tmp_model), full_check=False)
        for f in tmpdir.iterdir():
            os.chmod(f, 0o644)
        if data_name:
            os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    except Exception:
        if external_data and data_name and (path.parent / data_name).exists() and _external_files(path) != {data_name}:
            (path.parent / data_name).unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    for name in old_data - ({data_name} if data_name else set()):
        (path.parent / name).unlink(missing_ok=True)
    return path


def _external_files(path: Path) -> set[str]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    names = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    names.add(entry.value)
    return {n for n in names if "/" not in n and n.startswith(path.name)}
