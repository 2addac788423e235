"""dtq-sensitivity: pick which layers of a low-precision (e.g. W4A8) model get a higher precision.

A per-layer sensitivity sweep (ViDiT-Q's metric-decoupled mixed precision): each layer (or block)
of the simulated low-precision model is raised alone to ``--high-precision`` and the held-out output
SQNR / cosine against FP is measured per timestep group; the layers with the largest gain per
parameter are raised under ``--budget``. Writes the mixed recipe and ``sensitivity.json`` (all
numbers) to ``--out`` and prints the picked layers as ``CalibConfig.overrides`` strings. The logic
is ``dtq.calibrate.sensitivity.mixed_calibrate``; this module parses and does the file IO.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from dtq.calibrate.api import CalibrateJob
from dtq.calibrate.config import CalibConfig, CalibDataConfig
from dtq.calibrate.sensitivity import MixedConfig
from dtq.tools.cli import EXIT_OK, add_dataclass_arguments, dataclass_from_args, run_cli

REPORT = "sensitivity.json"
EPILOG = """examples:
  dtq-sensitivity --precision w4a8 --weight-granularity group128 --budget 0.1 --out recipes/tiny-mixed
  dtq-sensitivity --ckpt dit-s2/model.safetensors --method smoothquant --alpha 0.5 --precision w4a8 \\
      --weight-granularity group128 --budget 4 --budget-unit layers --eval-n 8 --out r

--out receives the mixed recipe (recipe.json + tensors.safetensors), sensitivity.json and
calibration_set.safetensors. exit codes: 0 success, 2 bad usage or input."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtq-sensitivity", description=__doc__.split(":", 1)[1].strip().split("\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser.add_argument_group("job"), CalibrateJob)
    add_dataclass_arguments(parser.add_argument_group("mixed precision"), MixedConfig)
    add_dataclass_arguments(parser.add_argument_group("quantization (the low precision)"), CalibConfig)
    add_dataclass_arguments(parser.add_argument_group("calibration data"), CalibDataConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    def _run() -> int:
        import torch

        from dtq.artifacts import CALIBRATION_SET
        from dtq.calibrate.data import CalibrationSet, collect_calibration_set
        from dtq.calibrate.evaluate import record_heldout_sqnr
        from dtq.calibrate.sensitivity import mixed_calibrate
        from dtq.checks import check_output_path
        from dtq.runtime.checkpoint import load_checkpoint
        from dtq.runtime.recipe import RECIPE_JSON
        from dtq.runtime.zoo import DEFAULT_MODEL, builtin_checkpoint
        from dtq.staging import staged_directory

        args = build_parser().parse_args(argv)
        job, config = dataclass_from_args(CalibrateJob, args), dataclass_from_args(CalibConfig, args)
        data_cfg, mixed = dataclass_from_args(CalibDataConfig, args), dataclass_from_args(MixedConfig, args)
        if job.eval_n < 1:
            raise ValueError("the sweep needs held-out samples: --eval-n >= 1")
        check_output_path(job.out, "dir", marker=RECIPE_JSON)
        if config.device == "auto":
            config = replace(config, device="cuda" if torch.cuda.is_available() else "cpu")
        model = load_checkpoint(job.ckpt if job.ckpt is not None else builtin_checkpoint(job.model or DEFAULT_MODEL))
        model = model.to(config.device).eval()
        sample = lambda cfg: collect_calibration_set(model, cfg, device=config.device, progress=config.progress)  # noqa: E731
        data = CalibrationSet.load(job.cali_data) if job.cali_data is not None else sample(data_cfg)
        held = sample(replace(data_cfg, cali_n=job.eval_n, seed=data_cfg.seed + 1))
        recipe, sens, overrides = mixed_calibrate(model, data, held, config, mixed)
        # the mixed recipe's own held-out SQNR, as dtq-calibrate reports it (the sweep measured one raise at a time)
        record_heldout_sqnr(model, recipe, held, batch_size=config.batch_size, device=config.device)
        with staged_directory(job.out, marker=RECIPE_JSON) as tmp:
            recipe.write_files(tmp)
            (tmp / REPORT).write_text(json.dumps({**sens.to_json(), "overrides": overrides}, indent=1) + "\n")
            if job.cali_data is None:
                data.save(tmp / CALIBRATION_SET)
        print(f"sweep: {len(sens.units)} {mixed.unit}s in {sens.seconds:.1f} s; held-out noise SQNR mean over "
              f"timestep groups: all-low {sens.low['sqnr_mean_db']:.2f} dB, all-{mixed.high_precision} "
              f"{sens.high['sqnr_mean_db']:.2f} dB")
        print(f"overrides ({len(overrides)}): {','.join(overrides)}")
        print("mixed recipe's held-out noise SQNR (dB): " + json.dumps(recipe.info["heldout_noise_sqnr_db"]))
        print(f"wrote mixed recipe and {REPORT} to {job.out}")
        return EXIT_OK

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
