"""benchmarks/quality_summary.py: session 9's committed table follows from the committed raw outputs."""

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
FP = ["--fp", "ref:50=8.7197", "--fp", "ref:100=8.1671", "--fp", "tiny:50=8.3406", "--fp", "tiny:100=7.9048"]


def test_committed_rows_follow_from_raw_outputs(tmp_path):
    out = tmp_path / "run.json"
    script = load_benchmark("quality_summary")
    assert script.main([str(RESULTS / "quality_s8"), str(RESULTS / "quality_s9"), *FP, "--json", str(out)]) == 0
    mine = json.loads(out.read_text())
    committed = json.loads((RESULTS / "quality_s9" / "run.json").read_text())
    assert mine["rows"] == committed["rows"]
    rows = {(r["batch"], r["set"]): r for r in mine["rows"]}
    # the difference to FP is the FID minus the FP of the same model and step count
    fp = {("ref", 50): 8.7197, ("ref", 100): 8.1671, ("tiny", 50): 8.3406, ("tiny", 100): 7.9048}
    for r in mine["rows"]:
        if r["fid"] is not None:
            assert r["vs_fp"] == pytest.approx(r["fid"] - fp[(r["model"], r["steps"])], abs=0.006)
    # a set is tied to its own batch's recipe (tiny-w4rec exists in both batches, before and after the fix)
    assert rows[("quality_s8", "tiny-w4rec-eng-50")]["heldout_noise_sqnr_db"]["all"] == 30.71
    assert rows[("quality_s9", "tiny-w4rec-eng-50")]["heldout_noise_sqnr_db"]["all"] == 31.09
    assert rows[("quality_s9", "tiny-w4bmixrec-sim-50")]["backend"] == "sim amp"
    assert rows[("quality_s8", "w4static-prog-50")]["backend"] == "engine progressive"


def test_model_comes_from_the_checkpoint_and_fp_needs_both_keys(tmp_path):
    out = tmp_path / "batch"
    (out / "s" / "a-50").mkdir(parents=True)
    (out / "s" / "a-50" / "sample_config.json").write_text(json.dumps(
        {"ckpt": "/x/dit-tiny-fmnist/model.safetensors", "steps": 50, "backend": "recipe:/tmp/r/a", "autocast": True}))
    (out / "fid").mkdir()
    (out / "fid" / "a-50.json").write_text(json.dumps({"results": [{"samples": "/y/a-50/samples.npz", "fid": 9.5}]}))
    summary = load_benchmark("quality_summary").summarise([out], {("tiny", 50): 9.0, ("ref", 50): 1.0})
    (row,) = summary["rows"]
    assert (row["model"], row["backend"], row["recipe"], row["vs_fp"]) == ("tiny", "engine amp", "a", 0.5)
