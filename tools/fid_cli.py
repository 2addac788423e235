"""dtq-fid: FID (and precision/recall) of a sample set against a reference set.

Samples: an ADM-style .npz (arr_0 uint8 NHWC, as dtq-sample and benchmarks/fid_reference.py
write) or a folder of images. Reference: fmnist-test / fmnist-train (statistics cached under
$DTQ_CACHE_DIR/fid, default ~/.cache/dtq/fid, on first use), a folder, an ADM .npz of images, or a
statistics .npz (mu, sigma). Every argument is checked before any Inception features are computed.
Protocol and comparability with ADM's evaluator: see dtq/tools/fid.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import fid
from ..checks import check_finite_fields, check_output_path
from .cli import EXIT_CHECK_FAILED, EXIT_OK, add_dataclass_arguments, dataclass_from_args, run_cli


def _meta(text: str) -> dict:
    return {"help": text}


@dataclass
class FidConfig:
    samples: list[str] | None = field(default=None, metadata=_meta(
        "sample sets (.npz or image folders), comma-separated; each gets its own FID"))
    reference: str = field(default="fmnist-test", metadata=_meta(
        "fmnist-test | fmnist-train | folder | ADM .npz of images | statistics .npz (mu, sigma)"))
    make_reference: bool = field(default=False, metadata=_meta(
        "only compute (and for fmnist-* cache) the reference statistics; with --save-stats write them there"))
    save_stats: Path | None = field(default=None, metadata=_meta(
        "write the statistics (mu, sigma as float32) of the reference (--make-reference) or of the one sample set"))
    limit: int | None = field(default=None, metadata=_meta("use only the first N images of each sample set"))
    reference_limit: int | None = field(default=None, metadata=_meta(
        "use only the first N reference images (a built-in name, .npz of images or folder; not cached)"))
    precision_recall: bool = field(default=False, metadata=_meta(
        "also improved precision/recall (k=3; needs reference images, not statistics)"))
    device: str = field(default="cpu", metadata=_meta("device of the Inception network (cpu, cuda)"))
    batch_size: int = field(default=50, metadata=_meta("images per Inception batch"))
    max_fid: float | None = field(default=None, metadata=_meta("exit 1 when any FID is above this"))
    out: Path | None = field(default=None, metadata=_meta("write the results as JSON here"))
    progress: bool = field(default=True, metadata=_meta("show progress bars"))

    def __post_init__(self) -> None:
        check_finite_fields(self)
        if not self.make_reference and not self.samples:
            raise ValueError("give --samples (or --make-reference)")
        if self.save_stats is not None and not self.make_reference and len(self.samples or []) != 1:
            raise ValueError("--save-stats needs --make-reference or exactly one --samples set")
        for name in ("limit", "reference_limit", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_inputs(cfg: FidConfig) -> None:
    """Every argument, before any feature is computed (the fmnist-* statistics take 10k Inception
    passes, ~20 minutes on a CPU): sample sets, reference, and that the output files can be written."""
    for spec in cfg.samples or []:
        fid.check_image_source(spec)
    fid.check_reference(cfg.reference, need_images=cfg.precision_recall, limit=cfg.reference_limit)
    for path in (cfg.out, cfg.save_stats):
        if path is not None:
            check_output_path(path, "file")


def run_fid(cfg: FidConfig) -> dict:
    check_inputs(cfg)
    extractor = fid.FeatureExtractor(cfg.device, cfg.batch_size)
    if cfg.make_reference:
        stats, _ = fid.reference_stats(cfg.reference, extractor, progress=cfg.progress, limit=cfg.reference_limit)
        cached = cfg.reference in fid.BUILTIN_REFERENCES and cfg.reference_limit is None
        where = fid.builtin_stats_path(cfg.reference) if cached else None
        if cfg.save_stats is not None:
            where = stats.save(cfg.save_stats)
        return {"reference": cfg.reference, "n": stats.n, "stats_file": str(where) if where else None,
                "protocol": fid.PROTOCOL}
    results = []
    reference = fid.reference_stats(cfg.reference, extractor, progress=cfg.progress, limit=cfg.reference_limit,
                                    need_features=cfg.precision_recall)  # once for every sample set
    for spec in cfg.samples:
        r = fid.evaluate(spec, cfg.reference, device=cfg.device, batch_size=cfg.batch_size,
                         precision_recall_k=3 if cfg.precision_recall else None, progress=cfg.progress,
                         limit=cfg.limit, extractor=extractor, save_stats=cfg.save_stats, reference_data=reference)
        results.append({"samples": spec, **asdict(r)})
    return {"reference": cfg.reference, "results": results}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtq-fid", description=__doc__.split("\n\n")[0],
                                     epilog="reference statistics of fmnist-test / fmnist-train are cached in "
                                            "$DTQ_CACHE_DIR/fid (default ~/.cache/dtq/fid).\n"
                                            "exit codes: 0 success, 1 an FID above --max-fid, 2 bad usage or input.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, FidConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    def _run() -> int:
        cfg = dataclass_from_args(FidConfig, build_parser().parse_args(argv))
        report = run_fid(cfg)
        text = json.dumps(report, indent=1, allow_nan=False)
        if cfg.out is not None:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.out).write_text(text + "\n")
        for r in report.get("results", []):
            pr = f", precision {r['precision']:.4f}, recall {r['recall']:.4f}" if r["precision"] is not None else ""
            print(f"{r['samples']}: FID {r['fid']:.4f} ({r['n_samples']} samples vs {r['n_reference']} reference{pr}; "
                  f"{r['seconds']:.0f} s)")
        if "results" not in report:
            print(text)
        if cfg.max_fid is not None and any(r["fid"] > cfg.max_fid for r in report.get("results", [])):
            return EXIT_CHECK_FAILED
        return EXIT_OK

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
