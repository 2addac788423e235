"""Summarise one GPU quality batch (the $OUT folder of benchmarks/run_quality_*_gpu.sh, copied back):
every sampled set's FID next to FP at the same step count, with the recipe it was drawn from (held-out
noise SQNR, calibration seconds, mixed-precision picks) -> one JSON and one markdown table.

    python benchmarks/quality_summary.py OUT_DIR [OUT_DIR ...] --fp tiny:50=8.34 --fp ref:50=8.72 \
        --meta gpu="NVIDIA H200" --json run.json --md table.md

Inputs, all optional, read from each OUT_DIR: times.tsv (name, exit code, seconds), fid/*.json and
fid*.json (dtq-fid --out), s/*/sample_config.json (dtq-sample's settings, which name the recipe),
keep/*/recipe.json and keep/*/sensitivity.json (or r/*/, recipes/*/), else the held-out SQNR
in log/cal-NAME.log or log/sens-NAME.log. A committed results folder (benchmarks/results/quality_s*)
is read the same way: logs/, recipes/, sample_configs/NAME.json. The model of a set is the checkpoint's folder name
("dit-tiny-fmnist" -> tiny, anything else -> ref); pass the FP FIDs as model:steps=FID (seed 0) or
model:steps:seed=FID. A set is compared with FP of its own model, step count and seed (from its
sample_config.json, else from its name: "...-50-seed1" is 50 steps, seed 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def model_of(ckpt: str) -> str:
    return "tiny" if "dit-tiny" in ckpt else "ref"


def backend_of(cfg: dict) -> tuple[str, str | None]:
    """("engine" | "sim" | "torch", recipe folder name or None) from a sample_config.json."""
    kind, _, where = (cfg.get("backend") or "torch").partition(":")
    name = Path(where).name if where else None
    how = {"recipe": "engine", "sim": "sim"}.get(kind, kind)
    if cfg.get("autocast"):
        how += " amp"
    if cfg.get("w4a8_kernel") not in (None, "group"):
        how += f" {cfg['w4a8_kernel']}"
    if cfg.get("attention") not in (None, "sdpa"):
        how += f" {cfg['attention']}"
    return how, name


def steps_and_seed(name: str, cfg: dict) -> tuple[int, int]:
    """(steps, seed) of a set: its sample_config.json's, else parsed from its name ("x-eng-50-seed1")."""
    parts = name.split("-")
    steps = cfg.get("steps") or next(int(p) for p in reversed(parts) if p.isdigit())
    seed = cfg["seed"] if "seed" in cfg else next((int(p[4:]) for p in parts if p.startswith("seed") and p[4:].isdigit()), 0)
    return steps, seed


def read_fids(out: Path) -> dict[str, float]:
    """set name (the samples.npz's folder) -> FID, from every dtq-fid JSON in OUT_DIR."""
    fids = {}
    for path in sorted(out.glob("fid*.json")) + sorted((out / "fid").glob("*.json")):
        for r in json.loads(path.read_text()).get("results", []):
            fids[Path(r["samples"]).parent.name] = r["fid"]
    return fids


def read_steps(out: Path) -> dict[str, dict]:
    steps = {}
    if (out / "times.tsv").exists():
        for line in (out / "times.tsv").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                steps[parts[0]] = {"rc": int(parts[1]), "seconds": int(parts[2])}
    return steps


def read_recipes(out: Path, steps: dict[str, dict]) -> dict[str, dict]:
    """recipe folder name -> held-out SQNR, calibration seconds, method options, mixed-precision picks."""
    recipes = {}
    # keep/ is written when a batch ends; r/ holds the same files, also for recipes made after that
    folders = {p.name: p for sub in ("r", "keep", "recipes") for p in (out / sub).glob("*") if p.is_dir()}
    for folder in (folders[n] for n in sorted(folders)):
        entry: dict = {}
        if (folder / "recipe.json").exists():
            r = json.loads((folder / "recipe.json").read_text())
            entry.update(method=r.get("method"), precision=r.get("precision"), options=r.get("options"),
                         heldout_noise_sqnr_db=(r.get("info") or {}).get("heldout_noise_sqnr_db"))
        if (folder / "sensitivity.json").exists():
            s = json.loads((folder / "sensitivity.json").read_text())
            entry["overrides"] = s.get("overrides")
            entry["sweep_seconds"] = s.get("seconds")
        for prefix in ("cal-", "sens-"):
            if prefix + folder.name in steps:
                entry["calibration_seconds"] = steps[prefix + folder.name]["seconds"]
        recipes[folder.name] = entry
    # recipes whose JSON did not come back: the held-out SQNR their calibration log printed last
    for log in sorted(out.glob("log*/*.log")):
        prefix, _, name = log.stem.partition("-")
        if prefix in ("cal", "sens") and name not in recipes:
            lines = [ln for ln in log.read_text().splitlines() if "held-out noise SQNR (dB): " in ln]
            if lines:
                recipes[name] = {"heldout_noise_sqnr_db": json.loads(lines[-1].split("(dB): ", 1)[1]),
                                 "calibration_seconds": steps.get(log.stem, {}).get("seconds")}
    return recipes


def summarise(outs: list[Path], fp: dict[tuple, float]) -> dict:
    """One row per sampled or scored set; each OUT_DIR's recipes are its own (names repeat across batches).
    ``fp``: (model, steps, seed) or (model, steps) (seed 0) -> FID of FP."""
    rows, recipes, steps = [], {}, {}
    for out in outs:
        s, fids = read_steps(out), read_fids(out)
        mine = read_recipes(out, s)
        steps.update({f"{out.name}/{k}": v for k, v in s.items()})
        recipes.update({f"{out.name}/{k}": v for k, v in mine.items()})
        configs = {p.parent.name: json.loads(p.read_text()) for p in out.glob("s*/**/sample_config.json")}
        configs.update({p.stem: json.loads(p.read_text()) for p in out.glob("sample_configs/*.json")})
        for name in sorted(set(fids) | set(configs)):
            cfg = configs.get(name, {})
            model = model_of(cfg["ckpt"]) if "ckpt" in cfg else ("tiny" if name.startswith("tiny") else "ref")
            how, recipe = backend_of(cfg) if cfg else ("?", None)
            n_steps, seed = steps_and_seed(name, cfg)
            base = fp.get((model, n_steps, seed), fp.get((model, n_steps)) if seed == 0 else None)
            fid, rec = fids.get(name), mine.get(recipe or "", {})
            rows.append({"batch": out.name, "set": name, "model": model, "steps": n_steps, "seed": seed, "backend": how,
                         "recipe": recipe, "fid": None if fid is None else round(fid, 3),
                         "vs_fp": None if fid is None or base is None else round(fid - base, 2),
                         "heldout_noise_sqnr_db": rec.get("heldout_noise_sqnr_db"),
                         "calibration_seconds": rec.get("calibration_seconds"),
                         "sampling_seconds": s.get(f"s-{name}", {}).get("seconds")})
    return {"rows": rows, "recipes": recipes, "steps": steps,
            "fp": {":".join(map(str, k)): v for k, v in fp.items()}}


def table(summary: dict) -> str:
    out = ["| model | batch | set | backend | steps | seed | FID | vs FP | held-out SQNR all / late (dB) "
           "| calibration s | sampling s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(summary["rows"], key=lambda r: (r["model"], r["steps"], r["set"])):
        sq = r["heldout_noise_sqnr_db"] or {}
        sqs = f"{sq['all']:.2f} / {sq['late']:.2f}" if sq else ""
        fid = "not scored" if r["fid"] is None else f"{r['fid']:.2f}"
        vs = "" if r["vs_fp"] is None else f"{r['vs_fp']:+.2f}"
        out.append(f"| {r['model']} | {r['batch']} | {r['set']} | {r['backend']} | {r['steps']} | {r['seed']} | {fid} | {vs} "
                   f"| {sqs} | {r['calibration_seconds'] or ''} | {r['sampling_seconds'] or ''} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outs", nargs="+", type=Path, help="OUT folders of GPU quality batches")
    ap.add_argument("--fp", action="append", default=[], help="model:steps[:seed]=FID of FP (e.g. ref:50=8.72, ref:50:1=8.72)")
    ap.add_argument("--meta", action="append", default=[], help="key=value added to the JSON (gpu, driver, ...)")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--md", type=Path, help="write the markdown table here")
    args = ap.parse_args(argv)
    fp = {}
    for item in args.fp:
        key, value = item.split("=", 1)
        model, n, *seed = key.split(":")
        fp[(model, int(n), int(seed[0]) if seed else 0)] = float(value)
    summary = {**dict(m.split("=", 1) for m in args.meta), **summarise(args.outs, fp)}
    md = table(summary)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    if args.md:
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
