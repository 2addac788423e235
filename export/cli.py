"""``dtq-export``: checkpoint (+ recipe) -> checked ONNX file.

Exit codes: 0 written; 1 a check failed (ONNX checker or TensorRT rules; nothing written);
2 bad usage or input (unknown precision, missing/foreign recipe, unreadable checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..tools.cli import run_cli


def _precisions() -> list[str] | None:
    """The precision names for --precision's choices; on a base install (no onnx) --help still
    works without them, and an export says which extra to install."""
    try:
        from .qdq import PRECISIONS
    except ModuleNotFoundError:
        return None
    return list(PRECISIONS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtq-export", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="DiT checkpoint (.pt/.safetensors, facebookresearch layout) or diffusers DiT folder")
    src.add_argument("--model", help="a built-in model name (e.g. dit-tiny-fmnist)")
    p.add_argument("--recipe", help="recipe directory from dtq-calibrate (required for quantized precisions)")
    p.add_argument("--precision", default="fp16", choices=_precisions())
    p.add_argument("--opset", type=int, help="ai.onnx opset (default: fp32/fp16 18, int8/fp8 19, w4a16/w4a8 21)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], help="float type of a quantized graph (default fp16)")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--fp8-ops", choices=["onnx", "trt"], default="onnx",
                   help="FP8 Q/DQ as opset-19 ONNX ops or TensorRT's trt::TRT_FP8* ops")
    ext = p.add_mutually_exclusive_group()
    ext.add_argument("--external-data", dest="external_data", action="store_true", default=None,
                     help="weights to FILE.onnx.<token>.data (default: when > 1 GiB)")
    ext.add_argument("--no-external-data", dest="external_data", action="store_false")
    p.add_argument("--no-rule-check", dest="check_rules", action="store_false",
                   help="skip the TensorRT rule check (the ONNX checker still runs)")
    p.add_argument("--out", required=True, help="output FILE.onnx")
    return p


def config_from_args(args: argparse.Namespace):
    from .api import ExportConfig

    return ExportConfig(out=args.out, ckpt=args.ckpt, model=args.model, precision=args.precision, recipe=args.recipe,
                        opset=args.opset, dtype=args.dtype, min_batch=args.min_batch, max_batch=args.max_batch,
                        fp8_ops=args.fp8_ops, external_data=args.external_data, check_rules=args.check_rules)


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
        for w in result.report.warnings:
            print(f"dtq-export: {w}", file=sys.stderr)
        print(json.dumps({"out": str(result.path), "seconds": round(result.seconds, 2),
                          "qdq_nodes": result.report.checked_nodes, "warnings": len(result.report.warnings),
                          **{k: result.metadata[k] for k in ("precision", "dtype", "opset", "recipe_sha256")}}))
        return 0

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
