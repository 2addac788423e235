"""Shared fixtures. Tests that need ../shared (the reference model, the data set) skip with a
reason naming the missing path; everything else runs from the repository alone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from dtq.runtime.model import DiT, DiTConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE_CKPT = SHARED / "reference" / "dit-s2-fmnist" / "model.safetensors"


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as a module, to test its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def triton_available() -> bool:
    """Whether triton imports (its interpreter runs dtq's GPU kernels on the CPU)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def run_in_triton_interpreter(code: str, timeout: int = 600) -> str:
    """Run ``code`` in the suite's Python with ``TRITON_INTERPRET=1`` (set before triton is imported: the
    kernels then run on the CPU; tests/triton_interpreter.py: own globals, torch.compile reset, a new
    process after any failure), require it to finish and print "ok", and return its stdout."""
    from triton_interpreter import WORKER

    ok, stdout, error = WORKER.run(code, timeout)
    assert ok and "ok" in stdout, stdout[-2000:] + error[-5000:]
    return stdout


def run_side_by_side(cmds: list[list[str]], cwd, timeout: int = 300) -> list:
    """Run independent commands concurrently (each writes its own outputs), one torch thread per process
    (so CPU reductions split the same way in a single process and under torchrun), and return their
    ``subprocess.CompletedProcess`` in order; a command past ``timeout`` is killed."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def module_threads(n: int):
    """An autouse fixture for a test module: its tests run with ``n`` torch threads, the previous
    count is restored after. (``torch.set_num_threads`` at import time holds for the whole session:
    pytest imports every module before the first test, so the last one imported set it for all.)
    Bind it to a module-level name: ``_threads = module_threads(1)``."""

    @pytest.fixture(autouse=True, scope="module")
    def _threads():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        yield
        torch.set_num_threads(before)

    return _threads


_FP_EXPORTS: dict = {}
_FP_EXPORT_TIMES: list[tuple[str, float]] = []  # (what, seconds) of each FP export made: the terminal summary


def pytest_terminal_summary(terminalreporter):
    """Where the suite's time goes, by file (setup + call + teardown; the slowest tests alone miss the
    many mid-sized ones), and each FP ONNX export made (the dynamo exporter is the slowest shared step)."""
    per_file: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for r in reports:
            if getattr(r, "when", None) in ("setup", "call", "teardown") and hasattr(r, "duration"):
                f = r.nodeid.split("::")[0]
                per_file[f] = per_file.get(f, 0.0) + r.duration
    if per_file:
        top = sorted(per_file.items(), key=lambda kv: -kv[1])[:15]
        terminalreporter.write_sep("=", f"slowest files ({sum(per_file.values()):.0f} s in all)")
        for f, sec in top:
            terminalreporter.write_line(f"{sec:7.1f}s {f}")
    if _FP_EXPORT_TIMES:
        terminalreporter.write_sep("=", f"FP ONNX exports made ({sum(t for _, t in _FP_EXPORT_TIMES):.0f} s)")
        for what, sec in _FP_EXPORT_TIMES:
            terminalreporter.write_line(f"{sec:7.1f}s {what}")


def fp_export(model: torch.nn.Module, dtype: torch.dtype = torch.float32, opset: int = 18, min_batch: int = 1,
              max_batch: int = 64, **kw):
    """``export_torch(model, dtype, opset, min_batch, max_batch, **kw)`` made once per test session for
    each (weights, config, dtype, opset, other arguments; one for every batch range: see the key) and
    returned as a copy (callers may edit it): several test files build Q/DQ graphs from the same FP
    export of one model, and torch's dynamo export is the slow part (10-25 s a call on a 2-core box).
    In memory only: nothing outlives the session."""
    import hashlib
    import inspect

    import onnx

    from dtq.export.onnx_export import export_torch

    h = hashlib.sha256(f"{type(model).__name__}:{model.config!r}".encode())
    for name, value in model.state_dict().items():
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    # every argument, defaults filled in (text_tokens=120 passed or not is one export), except the
    # batch range: it only bounds torch.export's symbolic "batch" dim, and the ONNX graph has no
    # bounds (exports for 1..4, 1..8 and 1..64 serialize byte-identically; checked with torch 2.13).
    # The example batch export_torch traces with is what could change the graph.
    args = inspect.signature(export_torch).bind(model, dtype=dtype, opset=opset, min_batch=min_batch,
                                                max_batch=max_batch, **kw)
    args.apply_defaults()
    args = {k: v for k, v in args.arguments.items() if k not in ("model", "min_batch", "max_batch")}
    args["example_batch"] = min(max(args["example_batch"], min_batch, 2), max_batch)
    key = (h.hexdigest(), tuple(sorted((k, repr(v)) for k, v in args.items())))
    if key not in _FP_EXPORTS:
        t0 = time.perf_counter()
        _FP_EXPORTS[key] = export_torch(model, dtype=dtype, opset=opset, min_batch=min_batch, max_batch=max_batch, **kw)
        _FP_EXPORT_TIMES.append((f"{model.config.hidden_size}x{model.config.depth} {dtype} opset {opset} "
                                 f"batch {min_batch}-{max_batch}{' ' + str(kw) if kw else ''}", time.perf_counter() - t0))
    out = onnx.ModelProto()
    out.CopyFrom(_FP_EXPORTS[key])
    return out


def fp_export_for(model: torch.nn.Module, cfg, recipe=None):
    """``fp_export`` at the dtype, opset and batch range that the ``ExportConfig`` ``cfg`` resolves to:
    the ``fp_proto`` of ``export_model(cfg, model, recipe, fp_proto)``, shared with other tests."""
    from dtq.export.api import DTYPES

    r = cfg.resolved(recipe)
    return fp_export(model, dtype=DTYPES[r.dtype], opset=r.opset, min_batch=r.min_batch, max_batch=r.max_batch)


@pytest.fixture
def shared_fp_exports(monkeypatch):
    """The FP export inside ``export_model`` (dtq-export's, when no ``fp_proto`` is passed) answered
    by ``fp_export``: for tests of the CLI and checks around that step, which would otherwise spend
    10-15 s on an export another test already made (export_torch's own tests call it directly)."""
    import dtq.export.api as api

    monkeypatch.setattr(api, "export_torch", fp_export)


@pytest.fixture(scope="session")
def tiny_calibration_set():
    """``collect_calibration_set(builtin dit-tiny-fmnist, CalibDataConfig(**kw))``, recorded once per test
    session for each ``kw`` (test_calibrate, test_recon and test_rotation calibrate on the same sets;
    each takes 10-20 s on 2 cores). Shared objects: callers must not edit them (``select`` copies)."""
    from dtq.calibrate.config import CalibDataConfig
    from dtq.calibrate.data import collect_calibration_set
    from dtq.runtime.zoo import load_builtin

    cache = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = collect_calibration_set(load_builtin("dit-tiny-fmnist"), CalibDataConfig(**kw), progress=False)
        return cache[key]

    return get


@pytest.fixture
def reference_ckpt() -> Path:
    if not REFERENCE_CKPT.is_file():
        pytest.skip(f"reference model not present at {REFERENCE_CKPT}")
    return REFERENCE_CKPT


def small_config(**kw) -> DiTConfig:
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    return DiTConfig(**{**base, **kw})


@pytest.fixture
def small_model() -> DiT:
    """A tiny random DiT whose outputs are not zero (adaLN-Zero init would make them zero)."""
    torch.manual_seed(0)
    return DiT(small_config()).randomize_(seed=1).eval()


# -- quantization tests ----------------------------------------------------------------------------
@pytest.fixture
def small_dit() -> DiT:
    """A 2-block pixel DiT with non-zero random weights, for folding and recipe tests."""
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=2, hidden_size=64, depth=2, num_heads=4,
                    num_classes=5, space="pixel")
    return DiT(cfg).randomize_(seed=1, std=0.1).eval()


def dit_inputs(model: DiT, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, c.num_classes + 1, (batch,), generator=g)
    return x, t, y
