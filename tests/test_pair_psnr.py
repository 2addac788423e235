"""benchmarks/pair_psnr.py: per-image agreement of same-seed sample sets."""

import json
import math

import numpy as np
from conftest import load_benchmark



def _script():
    return load_benchmark("pair_psnr")


def test_pair_psnr_numbers_and_label_check(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
    cand = ref.copy()
    cand[:3] = np.clip(ref[:3].astype(np.int16) + 4, 0, 255).astype(np.uint8)  # three images off by <= 4 levels
    labels = np.arange(6)
    np.savez(tmp_path / "r.npz", ref, labels)
    np.savez(tmp_path / "c.npz", cand, labels)
    np.savez(tmp_path / "x.npz", cand, labels[::-1])
    out = tmp_path / "pairs.json"
    assert _script().main(["--pair", f"{tmp_path / 'c.npz'}:{tmp_path / 'r.npz'}", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["n"] == 6 and row["identical"] == 3
    mse = [np.mean((cand[i].astype(float) - ref[i]) ** 2) for i in range(3)]
    assert math.isclose(row["mean_psnr_db"], np.mean([10 * np.log10(255 ** 2 / m) for m in mse]), abs_tol=1e-3)
    assert math.isclose(row["mean_abs_uint8"], np.abs(cand.astype(int) - ref).mean(), abs_tol=1e-4)
    try:
        _script().main(["--pair", f"{tmp_path / 'x.npz'}:{tmp_path / 'r.npz'}"])
    except ValueError as exc:
        assert "different labels" in str(exc)
    else:
        raise AssertionError("sets with different labels were compared")
