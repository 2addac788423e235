"""Data-parallel sampling under torchrun (gloo on the CPU): the .npz rank 0 writes from 2 ranks is
byte-identical to a single process's, and only rank 0 writes."""

import os
import sys

import numpy as np

from conftest import run_side_by_side

# 5 images in batches of 2: 3 batches, so rank 0 runs two, rank 1 one, and the last is partial
ARGS = ["--steps", "3", "--num-images", "5", "--batch-size", "2", "--seed", "11", "--cfg-scale", "1.5", "--no-progress"]


def test_two_ranks_write_the_single_process_npz(tmp_path):
    single, multi = run_side_by_side([
        [sys.executable, "-m", "dtq.tools.sample", *ARGS, "--out", str(tmp_path / "one")],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "dtq.tools.sample", *ARGS, "--out", str(tmp_path / "two")]], tmp_path)
    assert single.returncode == 0, single.stderr
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout.count("wrote 5 samples") == 1  # rank 0 alone reports (and writes)
    one = (tmp_path / "one" / "samples.npz").read_bytes()
    two = (tmp_path / "two" / "samples.npz").read_bytes()
    assert one == two
    data = np.load(tmp_path / "two" / "samples.npz")
    assert data["arr_0"].shape == (5, 32, 32, 1) and len(data["arr_1"]) == 5
    assert len(np.unique(data["arr_0"].reshape(5, -1), axis=0)) == 5  # five different images, not one repeated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no partial dirs left


def test_fid_reference_script_two_ranks_match_one(tmp_path):
    """The FID sampling script shares its batches the same way (10 images in 4 batches of 3)."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "fid_reference.py")
    args = ["--steps", "2", "--per-class", "1", "--batch-size", "3", "--device", "cpu", "--autocast", "none"]
    single, multi = run_side_by_side([
        [sys.executable, script, *args, "--out", str(tmp_path / "one")],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         script, *args, "--out", str(tmp_path / "two")]], tmp_path)
    assert single.returncode == 0, single.stderr
    assert multi.returncode == 0, multi.stderr
    assert (tmp_path / "one" / "fp-2.npz").read_bytes() == (tmp_path / "two" / "fp-2.npz").read_bytes()
