"""dtq-sample: sample images from a DiT (checkpoint, built-in model or random weights)."""

from __future__ import annotations

import argparse
import sys

from dtq.runtime.pipeline import SampleConfig, generate
from dtq.tools.cli import EXIT_OK, EXIT_USAGE, add_dataclass_arguments, dataclass_from_args, run_cli

EPILOG = """examples:
  dtq-sample --out samples                      # built-in Fashion-MNIST DiT, 4 images per class
  dtq-sample --ckpt dit-s2/model.safetensors --steps 100 --cfg-scale 1.5 --per-class 8 --out grid
  dtq-sample --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema --classes 207,360,387 --dtype bf16
  dtq-sample --model DiT-XL/2 --random-weights --image-size 256 --num-images 8 --dtype bf16
  dtq-sample --backend recipe:recipes/int8 --device cuda --dtype bf16 --compile --cuda-graphs  # quantized engine
  dtq-sample --backend recipe:recipes/fp8 --device cuda --dtype bf16 --compile --compile-mode max-autotune --cuda-graphs
  dtq-sample --backend recipe:recipes/w4a8 --w4a8-kernel progressive --device cuda --dtype bf16 --compile --cuda-graphs
  dtq-sample --backend sim:recipes/int8                                  # the recipe's fake-quant simulation
  dtq-sample --backend onnx:model-int8.onnx --device cpu                 # ONNX Runtime
  dtq-sample --backend trt:engines/int8 --device cuda --cuda-graphs      # TensorRT / TensorRT-RTX
  torchrun --nproc-per-node 8 -m dtq.tools.sample --ckpt ... --num-images 50000 --device cuda  # 8 GPUs

--backend SPEC: torch | torch:fp16 | torch:bf16 | sim:DIR | recipe:DIR | onnx:FILE | trt:DIR, or a bare
path (an .onnx file, an engine directory, a recipe directory = recipe:DIR).

outputs in --out: grid.png, images/*.png, samples.npz (ADM layout: arr_0 uint8 NHWC, arr_1 labels),
sample_config.json; latent models without --vae write latents.npz instead of images.
under torchrun the batches are shared among the ranks (batch i on rank i % N) and rank 0 writes
the same files a single process writes for the same seed.
exit codes: 0 success, 2 bad usage or input."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtq-sample", description=__doc__.split(":", 1)[1].strip(),
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, SampleConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    def _run() -> int:
        cfg = dataclass_from_args(SampleConfig, build_parser().parse_args(argv))
        try:
            result = generate(cfg)
        except ImportError as exc:  # an optional backend that is not installed (TensorRT, ONNX Runtime)
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if result.files:  # under torchrun only rank 0 writes
            print(f"wrote {len(result.labels)} samples to {result.out}: " + ", ".join(p.name for p in result.files))
        return EXIT_OK

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
