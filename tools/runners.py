"""Polygraphy runners for dtq's denoisers, and the layer probes of layerwise diagnosis.

- ``TorchRunner``: a polygraphy ``BaseRunner`` over any PyTorch DiT (FP, or a simulated model
  from ``apply_recipe``) on any device. Polygraphy's own ``PytRunner`` moves inputs to CUDA
  unconditionally, so it cannot run on a CPU-only machine. With ``probe_layers`` it also returns
  each named Linear's input and output, under the names ``"<layer>:in"`` / ``"<layer>:out"``.
- ``onnx_runner``: polygraphy's ``OnnxrtRunner`` on an ONNX file (CPU provider by default); with
  ``probe_layers`` the Linears' input/output tensors are marked as graph outputs and the results
  renamed to the same ``"<layer>:in"`` / ``"<layer>:out"`` keys, so a PyTorch model and an ONNX
  graph (FP or Q/DQ) can be compared layer by layer.
- ``trt_runner``: an engine directory through ``runtime.open.open_denoiser`` (the TensorRT or
  TensorRT-RTX module engine.json names, its compatibility check), wrapped as a runner
  (:class:`DenoiserRunner`); TensorRT is imported lazily, so everything else works without it.

A Linear's *input* is the activation before its Q/DQ pair (and before a run-time balancing
``Mul``); its *output* is after the bias ``Add``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from torch import nn

OUTPUT = "out"  # the denoiser output's name in dtq's ONNX export


def probe_key(layer: str, which: str) -> str:
    return f"{layer}:{which}"


class TorchRunner(BaseRunner):
    """Runs a DiT ``(x, t, y) -> out`` on ``device`` in ``dtype`` (float32 outputs)."""

    def __init__(self, model: nn.Module, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 probe_layers: list[str] | None = None, name: str | None = None):
        super().__init__(name=name, prefix="dtq-torch-runner")
        self._model = model
        self.device = torch.device(device)
        self.dtype = dtype
        self.probe_layers = list(probe_layers or [])
        self.model = None
        self._hooks = []
        self._probed: dict[str, np.ndarray] = {}

    def activate_impl(self):
        self.model = self._model.to(self.device, self.dtype).eval()
        modules = dict(self.model.named_modules())
        missing = [n for n in self.probe_layers if n not in modules]
        if missing:
            raise ValueError(f"layers not in the PyTorch model: {missing[:5]}")
        for name in self.probe_layers:
            self._hooks.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def fn(module, args, output):
            self._probed[probe_key(name, "in")] = args[0].detach().float().cpu().numpy()
            self._probed[probe_key(name, "out")] = output.detach().float().cpu().numpy()
        return fn

    def get_input_metadata_impl(self):
        c = getattr(self._model, "config", None)
        chw = (c.in_channels, c.input_size, c.input_size) if c is not None else (None, None, None)
        meta = TensorMetadata()
        meta.add("x", np.float32, (None, *chw))
        meta.add("t", np.int64, (None,))
        meta.add("y", np.int64, (None,))
        return meta

    def infer_impl(self, feed_dict):
        self._probed = {}
        x = torch.from_numpy(np.asarray(feed_dict["x"], np.float32)).to(self.device, self.dtype)
        t = torch.from_numpy(np.asarray(feed_dict["t"], np.int64)).to(self.device)
        y = torch.from_numpy(np.asarray(feed_dict["y"], np.int64)).to(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(x, t, y)
        self.inference_time = time.perf_counter() - start
        result = OrderedDict([(OUTPUT, out.detach().float().cpu().numpy())])
        result.update(self._probed)
        return result

    def deactivate_impl(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.model = None
        self._probed = {}


# -- ONNX --------------------------------------------------------------------------------------------
def onnx_linear_probes(model) -> dict[str, tuple[str, str]]:
    """``{layer: (input tensor, output tensor)}`` for each canonically named Linear of a dtq graph
    (see ``export.onnx_export.find_linears``), and whether it is quantized (a DequantizeLinear
    feeds its weight)."""
    return {k: (v[0], v[1]) for k, v in _onnx_linears(model).items()}


def onnx_quantized_layers(model) -> list[str]:
    return [k for k, v in _onnx_linears(model).items() if v[2]]


def _onnx_linears(model) -> dict[str, tuple[str, str, bool]]:
    import onnx_graphsurgeon as gs

    from ..export.onnx_export import find_linears

    graph = gs.import_onnx(model)
    nodes = {n.name: n for n in graph.nodes}
    out = {}
    for name, site in find_linears(graph).items():
        node = nodes[site.node]
        act = node.inputs[0]
        # walk back over the activation's DequantizeLinear <- QuantizeLinear and the run-time
        # balancing Mul (export names it "<layer>/input_mul"; its second input is a constant vector).
        # Not over any other Mul: a decomposed GELU ends in one.
        for op in ("DequantizeLinear", "QuantizeLinear", "Mul"):
            prod = act.inputs[0] if act.inputs else None
            if prod is None or prod.op != op or isinstance(prod.inputs[0], gs.Constant):
                continue
            if op == "Mul" and not (prod.name == f"{name}/input_mul" or _is_channel_vector(prod.inputs[1])):
                continue
            act = prod.inputs[0]
        # and over fc2's Hadamard rotation (export's "<layer>/rotate_*" nodes): the Linear's input is
        # the unrotated activation, as in the PyTorch model
        prod = act.inputs[0] if act.inputs else None
        if prod is not None and prod.name == f"{name}/rotate_unflat" and f"{name}/rotate_flat" in nodes:
            act = nodes[f"{name}/rotate_flat"].inputs[0]
        result = nodes[site.bias_node].outputs[0] if site.bias_node else node.outputs[0]
        w = node.inputs[1]
        quantized = bool(w.inputs) and w.inputs[0].op == "DequantizeLinear"
        out[name] = (act.name, result.name, quantized)
    return out


def _is_channel_vector(tensor) -> bool:
    import onnx_graphsurgeon as gs

    return isinstance(tensor, gs.Constant) and len(tensor.shape) == 1 and tensor.shape[0] > 1


def onnx_runner(path: str | Path, *, probe_layers: list[str] | None = None, providers=None, name: str | None = None):
    """Polygraphy ``OnnxrtRunner`` for an ONNX file; probes as described in the module doc."""
    import onnx
    from polygraphy.backend.onnx import ModifyOutputs
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    if not probe_layers:
        return OnnxrtRunner(SessionFromOnnx(str(path), providers=providers or ["cpu"]), name=name)
    model = onnx.load(str(path))
    probes = onnx_linear_probes(model)
    missing = [n for n in probe_layers if n not in probes]
    if missing:
        raise ValueError(f"{path}: layers not found as canonically named Linears: {missing[:5]}")
    tensors = [OUTPUT] + [t for layer in probe_layers for t in probes[layer]]
    marked = ModifyOutputs(model, outputs=list(dict.fromkeys(tensors)))()
    return _RenamingRunner(OnnxrtRunner(SessionFromOnnx(marked.SerializeToString(), providers=providers or ["cpu"]),
                                        name=name), probes, probe_layers)


class _RenamingRunner(BaseRunner):
    """Wraps a runner; renames its outputs (graph tensor names -> ``layer:in``/``layer:out``).
    A tensor that several probes name (the SiLU output every adaLN Gemm reads) appears under each."""

    def __init__(self, inner: BaseRunner, probes, layers):
        super().__init__(name=inner.name, prefix="dtq-onnxrt")
        self.name = inner.name
        self.inner = inner
        self.keys = [(OUTPUT, OUTPUT)]
        for layer in layers:
            tin, tout = probes[layer]
            self.keys += [(tin, probe_key(layer, "in")), (tout, probe_key(layer, "out"))]

    def activate_impl(self):
        self.inner.activate()

    def get_input_metadata_impl(self):
        return self.inner.get_input_metadata(use_numpy_dtypes=False)

    def infer_impl(self, feed_dict):
        raw = self.inner.infer(feed_dict, check_inputs=False)
        self.inference_time = self.inner.last_inference_time()
        return OrderedDict((key, np.array(raw[tensor])) for tensor, key in self.keys)

    def deactivate_impl(self):
        self.inner.deactivate()


class DenoiserRunner(BaseRunner):
    """Any dtq denoiser ``(x, t, y) -> out`` (``runtime.open.open_denoiser``) as a polygraphy runner:
    one output, ``"out"``."""

    def __init__(self, denoiser, config, name: str | None = None):
        super().__init__(name=name, prefix="dtq-denoiser-runner")
        self.denoiser = denoiser
        self.config = config  # the DiT config: the input shapes

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        c = self.config
        meta = TensorMetadata()
        meta.add("x", np.float32, (None, c.in_channels, c.input_size, c.input_size))
        meta.add("t", np.int64, (None,))
        meta.add("y", np.int64, (None,))
        return meta

    def infer_impl(self, feed_dict):
        x, t, y = (torch.from_numpy(np.asarray(feed_dict[k], dt)) for k, dt in (("x", np.float32), ("t", np.int64),
                                                                              ("y", np.int64)))
        start = time.perf_counter()
        out = self.denoiser(x, t, y)
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(OUTPUT, out.detach().float().cpu().numpy())])

    def deactivate_impl(self):
        pass


def trt_runner(engine_dir: str | Path, model: nn.Module, name: str | None = None) -> DenoiserRunner:
    """An engine directory as a runner, opened as dtq-sample opens it (``runtime.open``): engine.json
    names TensorRT or TensorRT-RTX, and is checked against this TensorRT, this GPU and ``model``'s
    config before the plan is deserialized."""
    from ..runtime.denoiser_spec import DenoiserSpec
    from ..runtime.open import open_denoiser

    den = open_denoiser(DenoiserSpec("trt", Path(engine_dir)), model, device="cuda")
    return DenoiserRunner(den, model.config, name=name)
