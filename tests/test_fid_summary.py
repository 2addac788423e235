"""benchmarks/fid_summary.py: the committed FID results are what the committed raw outputs give."""

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _script():
    return load_benchmark("fid_summary")


def test_committed_results_follow_from_raw_outputs(tmp_path):
    assert _script().main([str(RESULTS / "fid_raw"), "--out", str(tmp_path / "s")]) == 0
    mine = json.loads((tmp_path / "s.json").read_text())
    committed = json.loads((RESULTS / "fid_dit-s2-fmnist_gpu.json").read_text())
    assert mine["results"] == committed["results"] and mine["goals"] == committed["goals"]
    fp = {r["steps"]: r["fid"] for r in mine["results"] if r["setting"] == "fp"}
    assert set(fp) == {50, 100}
    for r in mine["results"]:
        assert r["n"] == 10000
        assert r["delta_vs_fp"] == pytest.approx(r["fid"] - fp[r["steps"]], abs=1e-3)
    # a mixed-precision setting (keep list) is reported but never counts towards the W8A8 goal
    best = mine["goals"]["w8a8"]["best"]
    assert all("keep" not in b["setting"] for b in best.values())
    assert mine["goals"]["w8a8"]["met"] == all(b["delta_vs_fp"] <= 0.1 for b in best.values())


def test_unknown_sample_file_is_refused(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "fid_reference_a.json").write_text(json.dumps({
        "device_name": "x", "torch": "x", "compile": False, "uint8": "trunc", "autocast": "bf16", "per_class": 1,
        "cfg_scale": 1.5, "seed": 0, "settings": {"fp-10": {"file": "fp-10.npz", "steps": 10, "seconds": 1.0}}}))
    (raw / "fid_b.json").write_text(json.dumps({"results": [{"samples": "/x/other-10.npz", "fid": 1.0, "n_samples": 1}]}))
    with pytest.raises(SystemExit, match="other-10.npz"):
        _script().main([str(raw), "--out", str(tmp_path / "s")])
