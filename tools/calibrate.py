"""dtq-calibrate: calibrate a DiT with a PTQ method and write a recipe directory.

The options are the fields of ``CalibConfig`` (what and how to quantize), ``CalibDataConfig``
(how the calibration set is sampled) and ``CalibrateJob`` (model, input and output paths): the
same objects the Python API takes (``dtq.calibrate.api.calibrate_checkpoint``, the stage; this
module only parses the command line).
"""

from __future__ import annotations

import argparse
import json
import sys

from dtq import formats
from dtq.calibrate.api import CalibrateJob, calibrate_checkpoint
from dtq.calibrate.config import CalibConfig, CalibDataConfig
from dtq.runtime.distributed import env_rank
from dtq.tools.cli import EXIT_OK, add_dataclass_arguments, dataclass_from_args, run_cli

EPILOG = """examples:
  dtq-calibrate --method ditas --out recipes/tiny-ditas-w8a8          # built-in model, W8A8
  dtq-calibrate --ckpt dit-s2/model.safetensors --method ptq4dit --precision w4a16 \\
      --weight-granularity group128 --cali-steps 25 --cali-n 32 --steps 100 --device cuda --out r
  dtq-calibrate --cali-data r/calibration_set.safetensors --method smoothquant --alpha 0.6 --out r2
  dtq-calibrate --precision w4a16 --overrides '*.attn.qkv=int8,blocks.5.*=fp16' --out mixed   # per layer
  torchrun --nproc-per-node 8 -m dtq.tools.calibrate --ckpt DiT-XL-2-256x256.pt --method ditas \
      --cali-n 256 --cali-batch 32 --device cuda --out xl-w8a8   # 8 GPUs share the sampling and forwards

precisions (dtq.formats; --overrides PATTERN=PRECISION[:GRANULARITY] takes these and fp16 = unquantized):
{table}

--out receives recipe.json + tensors.safetensors and calibration_set.safetensors (reusable with
--cali-data). exit codes: 0 success, 2 bad usage or input.""".format(table="\n".join(
    line for line in formats.describe().splitlines() if line.split()[0] in formats.QUANTIZED_PRECISIONS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtq-calibrate", description=__doc__.split(":", 1)[1].strip().split("\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser.add_argument_group("job"), CalibrateJob)
    add_dataclass_arguments(parser.add_argument_group("quantization"), CalibConfig)
    add_dataclass_arguments(parser.add_argument_group("calibration data"), CalibDataConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    def _run() -> int:
        args = build_parser().parse_args(argv)
        config = dataclass_from_args(CalibConfig, args)
        info = calibrate_checkpoint(dataclass_from_args(CalibrateJob, args), config,
                                    dataclass_from_args(CalibDataConfig, args)).info
        if env_rank() != 0:
            return EXIT_OK  # under torchrun, rank 0 wrote the recipe and reports it
        mixed = f", {len(config.overrides)} override(s)" if config.overrides else ""
        print(f"wrote recipe ({config.method}, {config.precision}: {config.wfmt} weights / {config.afmt} activations"
              f"{' per token' if config.act_granularity == 'token' else ''}"
              f"{mixed}) to {args.out}")
        if "heldout_noise_sqnr_db" in info:
            print("held-out noise SQNR (dB): " + json.dumps(info["heldout_noise_sqnr_db"]))
        return EXIT_OK

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
