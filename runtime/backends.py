"""Denoiser backends beyond the plain PyTorch module (``denoiser.TorchDenoiser``); all satisfy the
sampler's ``(x, t, y) -> out`` interface, so ``sampler.sample`` runs any of them unchanged.

- :class:`GraphedDenoiser`: an ``nn.Module`` (the quantized engine, a compiled model) with one CUDA
  graph per batch size (static input buffers; the first call of a size warms up and captures).
- :class:`OnnxDenoiser`: ONNX Runtime on the CPU, or its CUDA provider when that is installed.
- :class:`TensorRTDenoiser`: an engine directory (``engines.engine_dir``): engine.json is checked
  against this GPU and TensorRT (:func:`open_engine_dir`, also used by dtq-compare), the plan
  deserialized, torch tensors bound as the I/O
  (``set_tensor_address``), ``execute_async_v3`` on the current torch stream, optionally under a
  CUDA graph per batch size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _as_float_out(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return out.float().to(like.device)


# Priority of the stream a forward is captured on (lower is higher; 0 is CUDA's default and lowest). PyTorch
# instantiates graphs with cudaGraphInstantiateFlagUseNodePriority, so each kernel keeps the priority of the
# stream it was captured from. A higher one for the forward's own kernels than for the W4A16 weight prefetch's
# side stream (runtime.weight_prefetch) changed nothing measurable on the H200 (session 18, DiT-XL/2 batch 1:
# 2.665 ms either way; benchmarks/w4a16_bench.py --prefetch-sweep), so the default stays CUDA's.
CAPTURE_PRIORITY = 0


class GraphedDenoiser:
    """Runs ``model`` (already on ``device`` and in its dtype) with CUDA graphs per batch size.

    ``dtype`` is the input cast (the model's activation type). On the CPU, or with
    ``cuda_graphs=False``, it simply calls the model. ``capture_priority``: the capture stream's priority
    (:data:`CAPTURE_PRIORITY`)."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                 cuda_graphs: bool = True, warmup: int = 2, autocast: torch.dtype | None = None,
                 capture_priority: int = CAPTURE_PRIORITY):
        self.model = model.eval()
        self.device = torch.device(device)
        self.dtype = dtype
        # autocast: the model keeps fp32 weights and residual stream, matmuls run in this dtype
        # (the reference protocol's numerics); the context wraps warm-up, capture and eager calls
        self.autocast = autocast
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.warmup = warmup
        self.capture_priority = capture_priority
        self._graphs: dict[int, tuple] = {}

    def _capture(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        sx, st, sy = x.clone(), t.clone(), y.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):  # compile, autotune and allocator warm-up happen here
                self._forward(sx, st, sy)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device, priority=self.capture_priority)):
            out = self._forward(sx, st, sy)
        return graph, sx, st, sy, out

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            return self.model(x, t, y)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xi = x.to(self.device, self.dtype)
        ti, yi = t.to(self.device), y.to(self.device)
        if not self.cuda_graphs:
            return _as_float_out(self._forward(xi, ti, yi), x)
        key = xi.shape[0]
        if key not in self._graphs:
            self._graphs[key] = self._capture(xi, ti, yi)
        graph, sx, st, sy, out = self._graphs[key]
        sx.copy_(xi)
        st.copy_(ti)
        sy.copy_(yi)
        graph.replay()
        return _as_float_out(out, x)  # a copy: the static output is overwritten by the next replay

    def reset(self) -> None:
        self._graphs.clear()


def ort_session_options(*, threads: int | None = None, float8: bool = False):
    """ONNX Runtime options that run a dtq Q/DQ graph as written, i.e. with the simulation's numbers.

    ``session.disable_quant_qdq``: ORT otherwise fuses each DequantizeLinear pair around a MatMul into
    an integer kernel (MatMulIntegerToFloat / QLinearMatMul). On x86 CPUs without VNNI (AVX2 only, e.g.
    an AMD EPYC of this project's CI) that kernel adds pairs of u8 x s8 products in int16 with
    saturation (vpmaddubsw), so full-range INT8 weights come out several percent off: a PixArt graph
    4% (max error), the tiny DiT's INT8 graph 31.6 dB against the 35+ dB it gives on VNNI CPUs.
    Unfused, ORT dequantizes and runs float MatMuls, the same numbers on every CPU; the ORT backend is
    a reference runner, TensorRT the deployment target. ``float8``: ORT's extended optimizations move
    a Transpose between an FP8 QuantizeLinear and its DequantizeLinear and then reject the graph
    (Transpose has no float8 kernel), so such graphs get the basic level."""
    from ..extras import require

    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if float8:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return opts


class OnnxDenoiser:
    """ONNX Runtime session over a dtq ONNX export (inputs x float32, t/y int64; a text-conditioned
    export: x, t, context float32 [B, tokens, D], mask float32 [B, tokens], called as
    ``(x, t, context, mask)``, e.g. behind ``runtime.prompts.PromptDenoiser``)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None):
        from ..extras import require
        from ..onnx_file import OnnxFileError, open_onnx

        ort = require("onnxruntime")
        path = Path(path)
        open_onnx(path)  # a truncated model or external-data file: a clear OnnxFileError naming it
        self.device = torch.device(device)
        available = ort.get_available_providers()
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise ValueError("ONNX Runtime's CUDA provider is not installed (pip install onnxruntime-gpu); "
                                 "use --device cpu for the ONNX backend")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        opts = ort_session_options(threads=threads, float8=_has_float8(path))
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # onnxruntime's Fail / InvalidGraph / InvalidProtobuf ...
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise OnnxFileError(f"{path}: ONNX Runtime cannot load it ({first[:300]})") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        if self.input_names not in (["x", "t", "y"], ["x", "t", "context", "mask"]):
            raise ValueError(f"{path}: expected inputs x, t, y or x, t, context, mask (a dtq export), "
                             f"got {self.input_names}")
        self.text_conditioned = "context" in self.input_names
        self.providers = self.session.get_providers()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        feeds = {"x": x.detach().float().cpu().numpy(), "t": t.detach().cpu().numpy().astype(np.int64)}
        if self.text_conditioned:
            context, mask = cond
            feeds.update(context=context.detach().float().cpu().numpy(), mask=mask.detach().float().cpu().numpy())
        else:
            (y,) = cond
            feeds["y"] = y.detach().cpu().numpy().astype(np.int64)
        (out,) = self.session.run(None, feeds)
        return torch.from_numpy(out).float().to(x.device)


def _has_float8(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    f8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
    return any(t.data_type in f8 for t in model.graph.initializer)


def open_engine_dir(engine_dir: str | os.PathLike, device: str | torch.device = "cuda", *,
                    strict_gpu_name: bool = True, gpu: tuple[str, str] | None = None):
    """Read ``engine_dir``'s engine.json, import the TensorRT flavour it names (``tensorrt`` or
    ``tensorrt_rtx``) and check the engine against it and this GPU (``engine_dir.check_compatible``),
    before any plan is deserialized. Returns ``(meta, backend)``.

    ``gpu``: ``(name, "9.0")`` instead of asking torch (tests). Errors: EngineDirError (not an
    engine directory), TensorRTUnavailable (one line naming the install command), EngineMismatch
    (another TensorRT version or GPU), ValueError (no CUDA device)."""
    from ..engines.engine_dir import check_compatible, read_meta
    from ..engines.trt import BACKENDS, INSTALL, TensorRTUnavailable, load_backend

    meta = read_meta(engine_dir)  # refuses what is not an engine directory
    try:
        backend = load_backend(meta.backend)
    except TensorRTUnavailable as exc:
        if meta.backend not in INSTALL:
            raise
        raise TensorRTUnavailable(f"{engine_dir} is a {meta.backend} engine and {BACKENDS[meta.backend]} cannot be "
                                  f"imported here ({' '.join(str(exc).split())}); install it: "
                                  f"{INSTALL[meta.backend]}") from None
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"TensorRT engines run on a CUDA device, not {device} (use an onnx: backend on the CPU)")
    if gpu is None and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        gpu = (torch.cuda.get_device_name(index), f"{major}.{minor}")
    # TensorRT version first, then the GPU (none visible: refused with that message)
    check_compatible(meta, backend=backend.name, trt_version=backend.version, gpu_name=gpu[0] if gpu else None,
                     compute_capability=gpu[1] if gpu else None, strict_gpu_name=strict_gpu_name)
    return meta, backend


class TensorRTDenoiser:
    """A dtq engine directory on this GPU (TensorRT or TensorRT-RTX, as engine.json says)."""

    def __init__(self, engine_dir: str | os.PathLike, device: str | torch.device = "cuda", cuda_graphs: bool = False,
                 strict_gpu_name: bool = True, verbose: bool = False):
        from ..engines.engine_dir import PLAN

        self.meta, backend = open_engine_dir(engine_dir, device, strict_gpu_name=strict_gpu_name)
        self.device = torch.device(device)
        trt = backend.trt
        self.trt = trt
        self.runtime = trt.Runtime(backend.logger(verbose))
        self.engine = self.runtime.deserialize_cuda_engine((Path(engine_dir) / PLAN).read_bytes())
        if self.engine is None:
            raise ValueError(f"{engine_dir}: {backend.name} could not deserialize engine.plan")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple] = {}
        self.batch_range = self.meta.batch_range

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
                 trt.int32: torch.int32, trt.bfloat16: torch.bfloat16}
        return table[self.engine.get_tensor_dtype(name)]

    def _bind(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, value in feeds.items():
            self.context.set_input_shape(name, tuple(value.shape))
            self.context.set_tensor_address(name, value.data_ptr())
        (oname,) = self.outputs
        out = torch.empty(tuple(self.context.get_tensor_shape(oname)), dtype=self._torch_dtype(oname), device=self.device)
        self.context.set_tensor_address(oname, out.data_ptr())
        return out

    def _run(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lo, hi = self.batch_range
        if not lo <= x.shape[0] <= hi:
            raise ValueError(f"batch {x.shape[0]} is outside the engine's profile {lo}..{hi} (guidance doubles "
                             "the batch); rebuild with --max-batch or lower --batch-size")
        feeds = {"x": x.to(self.device, self._torch_dtype("x")).contiguous(),
                 "t": t.to(self.device, self._torch_dtype("t")).contiguous(),
                 "y": y.to(self.device, self._torch_dtype("y")).contiguous()}
        if not self.cuda_graphs:
            out = self._bind(feeds)
            self._run()
            return _as_float_out(out, x)
        key = x.shape[0]
        if key not in self._graphs:
            static = {k: v.clone() for k, v in feeds.items()}
            out = self._bind(static)
            self._run()  # TensorRT must enqueue once before a capture
            torch.cuda.current_stream(self.device).synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._run()
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for k, v in feeds.items():
            static[k].copy_(v)
        graph.replay()  # the captured kernels carry their own shapes and addresses
        return _as_float_out(out, x)
