"""Which fusions a TensorRT-RTX build makes, as far as a CPU build shows them (issue #13, docs/engines.md,
session 11, item 5): exports the built-in tiny DiT at a precision, builds it with TensorRT-RTX's builder
(opt level 3) through ``engines.build.build_plan`` with a logger that keeps every message, and prints
the layer counts the builder reports and the fusion messages.

    python benchmarks/trt_rtx_fusion_log.py int8 --log /tmp/rtx-int8.log
"""

import argparse
import dataclasses
import re
import tempfile
from pathlib import Path

import dtq.export.api as api
from dtq.engines.build import build_plan
from dtq.engines.trt import load_backend
from dtq.runtime.zoo import load_builtin
from dtq.tools.quick_recipe import minmax_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("precision", choices=("int8", "fp8"))
    ap.add_argument("--log", type=Path, help="write the builder's whole log here")
    args = ap.parse_args()
    model = load_builtin("dit-tiny-fmnist")
    recipe = minmax_recipe(model, args.precision, balance=True)
    with tempfile.TemporaryDirectory() as d:
        cfg = api.ExportConfig(out=f"{d}/tiny-{args.precision}.onnx", model="dit-tiny-fmnist",
                               precision=args.precision, min_batch=1, max_batch=4)
        path = api.export_model(cfg, model=model, recipe=recipe).path
        backend = load_backend("tensorrt-rtx")
        messages = []

        class KeepAll(backend.trt.ILogger):
            def log(self, severity, msg):
                messages.append(msg)

        @dataclasses.dataclass(frozen=True)
        class Logged(type(backend)):
            def logger(self, verbose=False):
                return KeepAll()

        build_plan(Logged(backend.name, backend.trt), Path(path), (1, 2, 4), opt_level=3)
    if args.log:
        args.log.write_text("\n".join(messages))
    for m in messages:
        if re.search(r"layers$|fusion|Fusing|ForeignNode\[", m) and "metadata" not in m:
            print(m[:200])


if __name__ == "__main__":
    main()
