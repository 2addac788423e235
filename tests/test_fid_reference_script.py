"""benchmarks/fid_reference.py (the GPU sampling script) as a CPU smoke test on the tiny model:
the files and layout dtq-fid reads, same noise for every setting, a recipe setting."""

import json

import numpy as np

from dtq.runtime.recipe import LayerRecipe, Recipe, model_fingerprint
from dtq.runtime.zoo import load_builtin
from conftest import load_benchmark



def _script():
    return load_benchmark("fid_reference")


def test_fid_reference_script_smoke(tmp_path):
    model = load_builtin("dit-tiny-fmnist")
    layers = {f"blocks.{i}.mlp.fc1": LayerRecipe(weight_format="int4", weight_granularity="group", weight_group_size=128,
                                                 act_format="none")
              for i in range(model.config.depth)}
    Recipe("manual", model_fingerprint(model), layers=layers, model_config=model.config.to_dict()).save(tmp_path / "w4")
    out = tmp_path / "out"
    rc = _script().main(["--steps", "3", "--per-class", "1", "--batch-size", "4", "--device", "cpu", "--autocast",
                         "none", "--recipe", f"w4={tmp_path / 'w4'}", "--out", str(out)])
    assert rc == 0
    meta = json.loads((out / "fid_reference.json").read_text())
    assert set(meta["settings"]) == {"fp-3", "w4-3"}
    assert meta["uint8"] == "trunc"  # ADM truncation: the README's FID numbers were made so
    with np.load(out / "fp-3.npz") as z:
        fp, labels = z["arr_0"], z["arr_1"]
    with np.load(out / "w4-3.npz") as z:
        w4 = z["arr_0"]
    assert fp.shape == (10, 32, 32, 1) and fp.dtype == np.uint8 and labels.tolist() == list(range(10))
    # same noise and labels, different weights: close but not identical images
    diff = np.abs(fp.astype(int) - w4.astype(int))
    assert 0 < diff.mean() < 40


def test_fid_reference_picks_best_candidate_by_heldout_sqnr(tmp_path):
    """Of two candidates in one group, the one with the higher held-out noise SQNR is sampled (W8A8 must
    beat W4A8 group128), KEY=VAL options reach CalibConfig, and a bad key is a usage error."""
    mod = _script()
    common = ["--steps", "2", "--per-class", "1", "--batch-size", "10", "--device", "cpu", "--autocast", "none",
              "--no-fp", "--cali-n", "2", "--cali-steps", "2", "--cali-sampler-steps", "4"]
    out = tmp_path / "out"
    rc = mod.main(common + ["--calibrate", "q/w4=minmax:w4a8:group128", "--calibrate", "q/w8=minmax:int8:channel:lp=2.4",
                            "--out", str(out)])
    assert rc == 0
    meta = json.loads((out / "fid_reference.json").read_text())
    cal = meta["calibrated"]
    assert cal["q/w8"]["heldout_noise_sqnr_db"]["all"] > cal["q/w4"]["heldout_noise_sqnr_db"]["all"] + 3
    assert cal["q/w8"]["sampled_as"] == "q" and "sampled_as" not in cal["q/w4"]
    assert cal["q/w8"]["config"]["lp"] == 2.4
    assert set(meta["settings"]) == {"q-2"} and (out / "recipes" / "q_w4" / "recipe.json").is_file()
    assert mod.main(common + ["--calibrate", "q=minmax:int8:channel:nokey=1", "--out", str(tmp_path / "bad")]) == 2
