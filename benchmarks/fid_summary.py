"""Summarise FID runs: the ``fid_reference.json`` files (what was sampled, how, how long) and the
``dtq-fid --out`` files (FID, precision, recall) -> one JSON and one markdown table with each
setting's difference to FP at the same step count (the table is printed, for the results page).

    python benchmarks/fid_summary.py benchmarks/results/fid_raw --out benchmarks/results/fid_dit-s2-fmnist_gpu \
        --meta date=2026-11-21 --meta driver=580.159.04
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(raw: Path) -> tuple[list[dict], dict]:
    sampled = {}  # file name -> (setting, steps, seconds, calibration entry, run meta)
    runs = {}
    metas = {path: json.loads(path.read_text()) for path in sorted(raw.glob("fid_reference_*.json"))}
    # recipes saved by one run's --calibrate (recipes/<name with / as _>) and sampled by another's --recipe
    saved = {k.replace("/", "_"): {"candidate": k, **v} for m in metas.values() for k, v in (m.get("calibrated") or {}).items()}
    for path, meta in metas.items():
        run = path.stem.removeprefix("fid_reference_")
        runs[run] = {k: meta[k] for k in
                                                          ("device_name", "torch", "compile", "uint8", "autocast",
                                                           "per_class", "cfg_scale", "seed")}
        calibrated = meta.get("calibrated") or {}
        by_group = {v.get("sampled_as"): {"candidate": k, **v} for k, v in calibrated.items() if v.get("sampled_as")}
        recipes = dict(r.split("=", 1) for r in meta.get("recipes", []))
        for key, s in meta["settings"].items():
            name = key.rsplit("-", 1)[0]
            sampled[s["file"]] = {"setting": name, "steps": s["steps"], "sampling_s": s["seconds"],
                                  "run": run,
                                  "calibration": by_group.get(name) or saved.get(Path(recipes.get(name, "")).name),
                                  "recipe_dir": recipes.get(name)}
    rows = []
    for path in sorted(raw.glob("fid_*.json")):
        if path.name.startswith("fid_reference_"):
            continue
        for r in json.loads(path.read_text())["results"]:
            name = Path(r["samples"]).name
            if name not in sampled:
                raise SystemExit(f"{path}: {name} is in no fid_reference_*.json")
            rows.append({**sampled[name], "file": name, "fid": round(r["fid"], 3), "precision": r.get("precision"),
                         "recall": r.get("recall"), "n": r["n_samples"]})
    fp = {r["steps"]: r["fid"] for r in rows if r["setting"] == "fp"}
    for r in rows:
        r["delta_vs_fp"] = round(r["fid"] - fp[r["steps"]], 3) if r["steps"] in fp else None
    rows.sort(key=lambda r: (-r["steps"], r["setting"] != "fp", r["fid"]))
    return rows, runs


GOALS = {"w8a8": 0.1, "w4a8": 1.0}  # the goals: FID within this much of FP at the same steps


def goals(rows: list[dict]) -> dict:
    """Best difference to FP per precision and step count, over settings that quantize every block
    Linear (``overrides``, or the older ``keep`` list, make a mixed-precision setting: reported, not counted here)."""
    out = {}
    for prefix, limit in GOALS.items():
        best = {}
        for r in rows:
            cfg = (r["calibration"] or {}).get("config", {})
            full = not (cfg.get("keep") or cfg.get("overrides"))
            if r["setting"].startswith(prefix) and full and r["delta_vs_fp"] is not None:
                if r["steps"] not in best or r["delta_vs_fp"] < best[r["steps"]]["delta_vs_fp"]:
                    best[r["steps"]] = {"setting": r["setting"], "delta_vs_fp": r["delta_vs_fp"]}
        out[prefix] = {"within": limit, "best": best, "met": bool(best) and all(b["delta_vs_fp"] <= limit
                                                                               for b in best.values())}
    return out


def markdown(rows: list[dict]) -> str:
    out = ["| setting | how | steps | FID | vs FP | precision | recall | held-out noise SQNR dB | sampling s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cal = r["calibration"] or {}
        how = f"`{cal['spec']}`" if cal else ""
        sq = cal.get("heldout_noise_sqnr_db", {}).get("all", "")
        delta = "" if r["setting"] == "fp" else f"{r['delta_vs_fp']:+.2f}"
        out.append(f"| {r['setting']} | {how} | {r['steps']} | {r['fid']:.2f} | {delta} | {r['precision']} | "
                   f"{r['recall']} | {sq} | {r['sampling_s']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", type=Path, help="folder with fid_reference_*.json and fid_*.json")
    p.add_argument("--out", type=Path, required=True, help="output stem: writes STEM.json")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="facts the raw files lack (date, driver, what was compared), repeatable")
    args = p.parse_args(argv)
    rows, runs = load(args.raw)
    summary = {**dict(m.split("=", 1) for m in args.meta), "results": rows, "goals": goals(rows), "runs": runs}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(rows) + "\ngoals: " + json.dumps(summary["goals"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
