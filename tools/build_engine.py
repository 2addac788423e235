"""dtq-build-engine: build a TensorRT / TensorRT-RTX engine directory from a dtq ONNX export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dtq.engines.build import BuildConfig, BuildError, build_engine
from dtq.engines.trt import TensorRTUnavailable
from dtq.tools.cli import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, add_dataclass_arguments, dataclass_from_args, run_cli

EPILOG = """examples:
  dtq-build-engine model-int8.onnx --out engines/int8 --max-batch 128 --timing-cache trt.cache
  dtq-build-engine model-fp8.onnx --out engines/fp8-rtx --backend tensorrt-rtx --compute-capability SM89,SM120

writes DIR/engine.plan and DIR/engine.json (TensorRT version, GPU, precision, shapes, ONNX hash).
exit codes: 0 built, 1 TensorRT's parser or builder failed, 2 bad usage or input, or no TensorRT installed."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtq-build-engine", description=__doc__.split(":", 1)[1].strip(),
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path, help="the ONNX model (dtq-export output)")
    add_dataclass_arguments(parser, BuildConfig, skip=("onnx", "out", "compute_capability"))
    parser.add_argument("--out", type=Path, required=True, help="engine directory to write (engine.plan + engine.json)")
    parser.add_argument("--compute-capability", dest="compute_capability", default=None,
                        type=lambda s: [v.strip() for v in s.split(",") if v.strip()], metavar="SM89,...",
                        help=BuildConfig.__dataclass_fields__["compute_capability"].metadata["help"])
    return parser


def main(argv: list[str] | None = None) -> int:
    def _run() -> int:
        cfg = dataclass_from_args(BuildConfig, build_parser().parse_args(argv))
        try:
            build_engine(cfg, log=lambda s: print(s, flush=True))
        except TensorRTUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except BuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CHECK_FAILED
        return EXIT_OK

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
