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


def test_a_seed_1_set_is_compared_with_fp_at_seed_1(tmp_path):
    """A set drawn with another seed is compared with FP of that seed, never with seed 0's FP; its
    steps and seed come from the name when its sample_config.json did not come back."""
    out = tmp_path / "batch"
    (out / "fid").mkdir(parents=True)
    for name, fid in (("ref-q-eng-50-seed1", 8.9), ("ref-q-eng-50", 8.8), ("ref-q-eng-100-seed2", 8.3)):
        (out / "fid" / f"{name}.json").write_text(json.dumps({"results": [{"samples": f"/y/{name}/samples.npz", "fid": fid}]}))
    script = load_benchmark("quality_summary")
    summary = script.summarise([out], {("ref", 50, 0): 8.7, ("ref", 50, 1): 8.75, ("ref", 100): 8.1})
    rows = {r["set"]: r for r in summary["rows"]}
    assert (rows["ref-q-eng-50-seed1"]["steps"], rows["ref-q-eng-50-seed1"]["seed"]) == (50, 1)
    assert rows["ref-q-eng-50-seed1"]["vs_fp"] == pytest.approx(0.15)
    assert rows["ref-q-eng-50"]["vs_fp"] == pytest.approx(0.1)
    assert rows["ref-q-eng-100-seed2"]["vs_fp"] is None  # no FP at seed 2: no difference, not seed 0's
    # a set whose sample_config.json came back takes steps and seed from it, whatever its name says
    assert script.steps_and_seed("ref-fp", {"steps": 100, "seed": 2}) == (100, 2)
    assert script.steps_and_seed("ref-fp-50-seed1", {"steps": 100, "seed": 0}) == (100, 0)
    assert script.main([str(out), "--fp", "ref:50:1=8.75", "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["fp"] == {"ref:50:1": 8.75}
