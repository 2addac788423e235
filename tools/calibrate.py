"""dtq-calibrate: calibrate a DiT with a PTQ method and write a recipe directory.

The options are the fields of ``CalibConfig`` (what and how to quantize), ``CalibDataConfig``
(how the calibration set is sampled) and ``CalibrateJob`` (model, input and output paths): the
same objects the Python API takes (``dtq.calibrate.api.calibrate``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dtq.calibrate.api import calibrate
from dtq.calibrate.config import CalibConfig, CalibDataConfig
from dtq.calibrate.data import CalibrationSet, collect_calibration_set
from dtq.calibrate.evaluate import noise_sqnr
from dtq.runtime.checkpoint import load_checkpoint
from dtq.checks import check_output_path
from dtq.runtime.recipe import RECIPE_JSON, apply_recipe
from dtq.staging import staged_directory
from dtq.runtime.zoo import BUILTIN_MODELS, DEFAULT_MODEL, builtin_checkpoint
from dtq.tools.cli import EXIT_OK, add_dataclass_arguments, dataclass_from_args, run_cli

CALI_FILE = "calibration_set.safetensors"

EPILOG = """examples:
  dtq-calibrate --method ditas --out recipes/tiny-ditas-w8a8          # built-in model, W8A8
  dtq-calibrate --ckpt dit-s2/model.safetensors --method ptq4dit --weight-bits 4 \\
      --weight-granularity group128 --cali-steps 25 --cali-n 32 --steps 100 --device cuda --out r
  dtq-calibrate --cali-data r/calibration_set.safetensors --method smoothquant --alpha 0.6 --out r2

--out receives recipe.json + tensors.safetensors and calibration_set.safetensors (reusable with
--cali-data). exit codes: 0 success, 2 bad usage or input."""


@dataclass
class CalibrateJob:
    ckpt: Path | None = field(default=None, metadata={"help": ".pt / .safetensors DiT checkpoint (config.json beside it is read) or diffusers DiT folder"})
    model: str | None = field(default=None, metadata={"help": f"built-in model when no --ckpt ({', '.join(BUILTIN_MODELS)})"})
    cali_data: Path | None = field(default=None, metadata={"help": "reuse a saved calibration set instead of sampling one"})
    eval_n: int = field(default=4, metadata={"help": "held-out samples (seed+1) for the SQNR report; 0: none"})
    out: Path = field(default=Path("recipe"), metadata={"help": "recipe directory to write"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtq-calibrate", description=__doc__.split(":", 1)[1].strip().split("\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser.add_argument_group("job"), CalibrateJob)
    add_dataclass_arguments(parser.add_argument_group("quantization"), CalibConfig)
    add_dataclass_arguments(parser.add_argument_group("calibration data"), CalibDataConfig)
    return parser


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return device


def run(job: CalibrateJob, config: CalibConfig, data_cfg: CalibDataConfig) -> dict:
    """The CLI's work, callable from Python: returns the recipe's info dict."""
    check_output_path(job.out, "dir", marker=RECIPE_JSON)  # before an hour of calibration, not after
    if job.ckpt is not None:
        model = load_checkpoint(job.ckpt)
    else:
        model = load_checkpoint(builtin_checkpoint(job.model or DEFAULT_MODEL))
    model = model.to(config.device).eval()
    if job.cali_data is not None:
        data = CalibrationSet.load(job.cali_data)
    else:
        data = collect_calibration_set(model, data_cfg, device=config.device, progress=config.progress)
    recipe = calibrate(model, data, config)
    if job.eval_n > 0:
        held_cfg = CalibDataConfig(**{**data_cfg.__dict__, "cali_n": job.eval_n, "seed": data_cfg.seed + 1})
        held = collect_calibration_set(model, held_cfg, device=config.device, progress=config.progress)
        sqnr = noise_sqnr(model, apply_recipe(model, recipe), held, batch_size=config.batch_size, device=config.device)
        recipe.info["heldout_noise_sqnr_db"] = {k: round(v, 2) for k, v in sqnr.items()}
    # the recipe and its calibration set replace an old --out together, or not at all
    with staged_directory(job.out, marker=RECIPE_JSON) as tmp:
        recipe.write_files(tmp)
        if job.cali_data is None:
            data.save(tmp / CALI_FILE)
        elif Path(job.cali_data).resolve() == (Path(job.out) / CALI_FILE).resolve():
            shutil.copy2(job.cali_data, tmp / CALI_FILE)  # --cali-data out/...: keep it
    return recipe.info


def main(argv: list[str] | None = None) -> int:
    def _run() -> int:
        args = build_parser().parse_args(argv)
        config = dataclass_from_args(CalibConfig, args)
        config.device = resolve_device(config.device)
        info = run(dataclass_from_args(CalibrateJob, args), config, dataclass_from_args(CalibDataConfig, args))
        print(f"wrote recipe ({config.method}, {config.wfmt} weights / {config.afmt} activations) to {args.out}")
        if "heldout_noise_sqnr_db" in info:
            print("held-out noise SQNR (dB): " + json.dumps(info["heldout_noise_sqnr_db"]))
        return EXIT_OK

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
