"""Which kernels Inductor makes of a per-token DiT block: is each per-token quantizer inside the kernel
that computes its activation? CPU only, about 45 s for int8, 3 minutes for w4a8 (Inductor's C++ backend; the engine's GPU
path runs with ``kernel="gpu"``, its Triton GEMMs in Triton's interpreter).

    TRITON_INTERPRET=1 python benchmarks/token_fusion_cpu.py [--precision int8|w4a8] [--hidden 1152]

Builds one DiT block (``--hidden`` wide, 16 heads, 4 tokens, batch 2) with a min-max per-token recipe
and ``build_qengine(token_quant="inductor")`` (the opt-in fused quantizer; the default engine's
``dtq::quant_rows_int8`` pass is opaque to Inductor), compiles it as ``compile_blocks`` does, and lists the generated kernels in call order: Inductor's fused
kernels (``cpp_fused_<ops>``: the aten ops each one computes) and the custom ops (GEMMs). Exit 0 when
every per-token quantizer (a fused kernel with ``amax``) is fused with its producer (LayerNorm +
modulate for qkv / fc1, GELU for fc2, the attention output's transpose for proj) and no
``dtq::quant_rows_int8`` pass remains; exit 1 otherwise. On the GPU the same scheduler makes Triton
kernels (``triton_red_fused_...``); ``benchmarks/profile_engines.py`` shows them with their times.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

PRODUCERS = ("native_layer_norm", "gelu", "transpose")  # what computes each quantized layer input


def block_kernels(precision: str, hidden: int) -> list[str]:
    """The kernel calls of the compiled block, in order: ``fused:<name>`` or ``op:<custom op>``."""
    from torch._inductor.utils import run_and_get_code

    from dtq.runtime import kernel_ops  # noqa: F401  (registers torch.ops.dtq.*)
    from dtq.runtime.model import DiT, DiTConfig
    from dtq.runtime.qengine import build_qengine, compile_blocks
    from dtq.tools.quick_recipe import minmax_recipe

    model = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=hidden, depth=1, num_heads=16,
                          num_classes=10)).randomize_(seed=1, std=0.02).eval()
    recipe = minmax_recipe(model, precision, group=128, balance=True, act_granularity="token")
    # token_quant="inductor": the opt-in engine whose quantizer Inductor fuses (the default runs the pass)
    engine = compile_blocks(build_qengine(model, recipe, kernel="gpu", int8_kernel="triton", token_quant="inductor",
                                          fuse_residual=("int8", "w4a8", "w4a8-group")))
    x, c = torch.randn(2, 4, hidden), torch.randn(2, hidden)
    with torch.no_grad():
        _, code = run_and_get_code(engine.blocks[0], x, c)
    src = code[0]
    calls = []
    for line in src[src.index("def call(self, args)"):].splitlines():
        line = line.strip()
        if m := re.match(r"(cpp_fused_\w+|triton_\w+?)(?:\.run)?\(", line):
            calls.append("fused:" + m.group(1))
        elif m := re.search(r"torch\.ops\.dtq\.(\w+)\.default\(", line):
            calls.append("op:" + m.group(1))
    return calls


def unfused_quantizers(calls: list[str]) -> list[str]:
    """Problems: a per-token quantizer pass of its own, or a quantizing kernel without its producer."""
    bad = [c for c in calls if c == "op:quant_rows_int8"]
    bad += [c for c in calls if c.startswith("fused:") and "amax" in c and not any(p in c for p in PRODUCERS)]
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=("int8", "w4a8"), default="int8")
    ap.add_argument("--hidden", type=int, default=1152, help="block width (DiT-XL/2: 1152, wider than a "
                    "persistent reduction)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        print("error: set TRITON_INTERPRET=1 (the block's Triton GEMMs run in Triton's interpreter)", file=sys.stderr)
        return 2
    calls = block_kernels(args.precision, args.hidden)
    for c in calls:
        print(c)
    quantizers = [c for c in calls if "amax" in c]
    bad = unfused_quantizers(calls)
    print(f"{len(quantizers)} per-token quantizers, each fused with its producer: {not bad}")
    for b in bad:
        print("UNFUSED", b)
    return 1 if bad or len(quantizers) != 4 else 0


if __name__ == "__main__":
    sys.exit(main())
