"""Weight SQNR of two-level INT4 (QServe-style progressive: ``s1[n] * s2[n, g] * q4``, integer s2 in
[1, 16]) against one-level INT4 with a float scale per group, on a model's real block weights.

    PYTHONPATH=... python benchmarks/progressive_int4_sqnr.py [--checkpoint PATH] [--group 128]

Per layer role (qkv, proj, fc1, fc2; all blocks pooled): SQNR of the weight vs float for
(a) group INT4 min-max scales (quick recipes), (b) group INT4 MSE-searched scales (dtq-calibrate's
``weight_search=mse``), (c) two-level from the float weight, (d) two-level requantized from (b)'s
dequantized weight (what the engine does to a recipe's INT4 weights) and (d) vs (b): the change the
engine's progressive kernel makes to the simulation's weights. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

from dtq.calibrate.search import search_weight_scale
from dtq.runtime import quant

ROLES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def load(checkpoint: str | None):
    if checkpoint is None:
        from dtq.runtime.zoo import load_builtin

        return "dit-tiny-fmnist", load_builtin()
    from dtq.runtime.checkpoint import load_checkpoint

    return checkpoint, load_checkpoint(checkpoint)


def weight_sqnr(model, group: int) -> dict:
    sums = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))  # role -> variant -> [signal, noise]

    def add(role, key, ref, test):
        sums[role][key][0] += float(ref.double().pow(2).sum())
        sums[role][key][1] += float((ref.double() - test.double()).pow(2).sum())

    for i, _ in enumerate(model.blocks):
        for role in ROLES:
            w = model.get_submodule(f"blocks.{i}.{role}").weight.detach().float()
            g = min(group, w.shape[1])
            mm = quant.fake_quant_weight(w, quant.weight_scale(w, "int4", "group", g), "int4", "group", g)
            mse = quant.fake_quant_weight(w, search_weight_scale(w, "int4", "group", g, method="mse"), "int4", "group", g)
            prog = quant.fake_quant_progressive(w, g)
            prog_of_mse = quant.fake_quant_progressive(mse, g)
            add(role, "group_minmax", w, mm)
            add(role, "group_mse", w, mse)
            add(role, "two_level", w, prog)
            add(role, "two_level_from_group_mse", w, prog_of_mse)
            add(role, "two_level_from_group_mse_vs_group_mse", mse, prog_of_mse)
    db = lambda s, n: round(10 * torch.log10(torch.tensor(s / max(n, 1e-300))).item(), 2)  # noqa: E731
    out = {role: {k: db(*v) for k, v in d.items()} for role, d in sums.items()}
    tot = defaultdict(lambda: [0.0, 0.0])
    for d in sums.values():
        for k, (s, n) in d.items():
            tot[k][0] += s
            tot[k][1] += n
    out["all"] = {k: db(*v) for k, v in tot.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a DiT checkpoint (default: the built-in tiny model)")
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args(argv)
    name, model = load(args.checkpoint)
    print(json.dumps({"model": name, "group": args.group, "weight_sqnr_db": weight_sqnr(model, args.group)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
