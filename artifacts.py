"""Names and keys of dtq's artifacts, owned once (stdlib only; ``onnx`` is imported lazily by the
one function that reads a model file).

- recipe directory (``dtq-calibrate``): ``recipe.json`` + ``tensors.safetensors``
- ONNX model (``dtq-export``): ``metadata_props`` keys ``dtq.<key>`` (values: strings, or JSON)
- engine directory (``dtq-build-engine``): ``engine.plan`` + ``engine.json``
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# -- recipe directory ----------------------------------------------------------------------------------
RECIPE_JSON = "recipe.json"
RECIPE_TENSORS = "tensors.safetensors"
RECIPE_SCHEMA = "dtq.recipe"
CALIBRATION_SET = "calibration_set.safetensors"

# -- ONNX model ------------------------------------------------------------------------------------------
ONNX_IN_DIR = "model.onnx"  # the model a directory given where an ONNX file is expected holds

# -- ONNX metadata -------------------------------------------------------------------------------------
META_PREFIX = "dtq."
# keys dtq-export writes (without the prefix); readers use these names
META_VERSION = "version"
META_PRECISION = "precision"  # the graph's precision (a recipe's default precision; fp32/fp16 without one)
META_LAYER_PRECISIONS = "layer_precisions"  # JSON {layer: precision} of the quantized/overridden layers
META_DTYPE = "dtype"
META_OPSET = "opset"
META_RECIPE_SHA256 = "recipe_sha256"
META_RECIPE_METHOD = "recipe_method"
META_RESCALED_OUTPUTS = "rescaled_outputs"
META_INPUTS = "inputs"
META_OUTPUTS = "outputs"
META_BATCH_RANGE = "batch_range"
META_MODEL_CONFIG = "model_config"
META_FP8_OPS = "fp8_ops"

# -- engine directory ----------------------------------------------------------------------------------
ENGINE_PLAN = "engine.plan"
ENGINE_JSON = "engine.json"
ENGINE_SCHEMA = "dtq.engine"


def is_recipe_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / RECIPE_JSON).is_file()


def is_engine_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / ENGINE_PLAN).is_file()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def metadata_from_props(props) -> dict[str, str]:
    """``dtq.*`` entries of an ONNX ``metadata_props`` list (or a ``{key: value}`` dict), prefix removed."""
    items = props.items() if isinstance(props, dict) else ((p.key, p.value) for p in props)
    return {k[len(META_PREFIX):]: v for k, v in items if k.startswith(META_PREFIX)}


def read_onnx_metadata(path_or_model) -> dict[str, str]:
    """The ``dtq.*`` metadata of an ONNX file (weights not loaded) or ``ModelProto``, prefix removed."""
    model = path_or_model
    if not hasattr(model, "metadata_props"):
        import onnx

        model = onnx.load(str(path_or_model), load_external_data=False)
    return metadata_from_props(model.metadata_props)


def metadata_json(metadata: dict[str, str], key: str, default=None):
    """A JSON-valued metadata entry, decoded (``default`` when absent)."""
    return json.loads(metadata[key]) if key in metadata else default
