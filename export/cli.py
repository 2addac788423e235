"""``dtq-export``: checkpoint (+ recipe) -> checked ONNX file.

The options are generated from ``ExportConfig`` (``export/config.py``), the object the Python API
takes (``export.api.export_model``). Exit codes: 0 written; 1 a check failed (ONNX checker or
TensorRT rules; nothing written); 2 bad usage or input (unknown precision, a --precision the recipe
does not have, missing/foreign recipe, unreadable checkpoint, a missing extra).
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import artifacts, formats
from ..tools.cli import add_dataclass_arguments, dataclass_from_args, run_cli
from .config import ExportConfig

EPILOG = f"""precisions (dtq.formats):
{formats.describe()}

examples:
  dtq-export --model dit-tiny-fmnist --out tiny-fp16.onnx
  dtq-export --model dit-tiny-fmnist --recipe recipes/w8a8 --out tiny-int8.onnx   # precision from the recipe
  dtq-export --model dit-tiny-fmnist --recipe recipes/w4a8 --precision w4a16 --out tiny-w4.onnx  # for TensorRT"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtq-export", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, ExportConfig)
    return p


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    return dataclass_from_args(ExportConfig, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def _run() -> int:
        from .api import ExportCheckError, export_model  # needs the onnx extra (run_cli names it)
        from .onnx_export import ExportError

        try:
            result = export_model(config_from_args(args))
        except ExportCheckError as exc:
            print(f"dtq-export: check failed, nothing written:\n{exc}", file=sys.stderr)
            return 1
        except ExportError as exc:
            print(f"dtq-export: export failed: {exc}", file=sys.stderr)
            return 1
        for w in [*result.notes, *result.report.warnings]:
            print(f"dtq-export: {w}", file=sys.stderr)
        keys = (artifacts.META_PRECISION, artifacts.META_DTYPE, artifacts.META_OPSET, artifacts.META_RECIPE_SHA256)
        print(json.dumps({"out": str(result.path), "seconds": round(result.seconds, 2),
                          "qdq_nodes": result.report.checked_nodes, "warnings": len(result.report.warnings),
                          **{k: result.metadata[k] for k in keys}}))
        return 0

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
