"""Per-image agreement of sample sets drawn with the same seeds (dtq-sample's noise is the same for
every backend): mean PSNR / SSIM (uint8, data range 255), the fraction of identical images, and the
mean absolute uint8 difference, for each ``CANDIDATE:REFERENCE`` pair of ``samples.npz`` files.
Separates what a backend changes (engine vs simulation, bf16 vs fp32 autocast) from what FID sees.

    python benchmarks/pair_psnr.py --pair O/s/w8a8-eng-50/samples.npz:O/s/w8a8-sim-50/samples.npz ... --out pairs.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dtq.tools.metrics import image_pair_report


def pair_report(candidate: Path, reference: Path, limit: int | None) -> dict:
    with np.load(candidate) as c, np.load(reference) as r:
        a, b = c["arr_0"][:limit], r["arr_0"][:limit]
        if not np.array_equal(c["arr_1"][:limit], r["arr_1"][:limit]):
            raise ValueError(f"{candidate} and {reference} have different labels: not drawn with the same seeds")
    rep = image_pair_report(b, a)
    return {"candidate": str(candidate), "reference": str(reference), "n": len(a),
            "mean_psnr_db": round(rep["mean_psnr_db"], 3), "mean_ssim": round(rep["mean_ssim"], 5),
            "identical": rep["n_identical"], "mean_abs_uint8": round(float(np.abs(a.astype(np.int16) - b).mean()), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", action="append", required=True, metavar="CANDIDATE:REFERENCE")
    p.add_argument("--limit", type=int, default=2000, help="images per pair (SSIM is per-image numpy)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    for spec in args.pair:
        cand, sep, ref = spec.partition(":")
        if not sep:
            print(f"error: --pair expects CANDIDATE:REFERENCE, got {spec!r}", file=sys.stderr)
            return 2
        rows.append(pair_report(Path(cand), Path(ref), args.limit))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
