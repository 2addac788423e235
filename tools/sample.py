"""dtq-sample: sample images from a DiT (checkpoint, built-in model or random weights)."""

from __future__ import annotations

import argparse
import sys

from dtq.runtime.pipeline import SampleConfig, generate
from dtq.tools.cli import EXIT_OK, add_dataclass_arguments, dataclass_from_args, run_cli

EPILOG = """examples:
  dtq-sample --out samples                      # built-in Fashion-MNIST DiT, 4 images per class
  dtq-sample --ckpt dit-s2/model.safetensors --steps 100 --cfg-scale 1.5 --per-class 8 --out grid
  dtq-sample --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema --classes 207,360,387 --dtype bf16
  dtq-sample --model DiT-XL/2 --random-weights --image-size 256 --num-images 8 --dtype bf16

outputs in --out: grid.png, images/*.png, samples.npz (ADM layout: arr_0 uint8 NHWC, arr_1 labels),
sample_config.json; latent models without --vae write latents.npz instead of images.
exit codes: 0 success, 2 bad usage or input."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtq-sample", description=__doc__.split(":", 1)[1].strip(),
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, SampleConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    def _run() -> int:
        cfg = dataclass_from_args(SampleConfig, build_parser().parse_args(argv))
        result = generate(cfg)
        print(f"wrote {len(result.labels)} samples to {result.out}: " + ", ".join(p.name for p in result.files))
        return EXIT_OK

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
