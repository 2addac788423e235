"""Data-parallel calibration under torchrun (gloo on the CPU): the recipe rank 0 writes from 2 ranks
is the one a single process writes, and the per-rank statistics merge exactly."""

import json
import sys

import torch
from safetensors.torch import load_file

from dtq.calibrate.config import CalibDataConfig
from dtq.calibrate.data import collect_calibration_set
from dtq.calibrate.stats import AbsHistogram, StatsCollector, merge_statistics
from dtq.runtime.distributed import DistContext

from conftest import run_side_by_side

# every reduction in one small run: smoothquant balances (channel maxima) with an MSE clip on token
# samples, fc2 unbalanced with an MSE clip on its histogram, GPTQ on all-reduced X^T X; 6 samples in
# 3 sampler batches (rank 0 runs two, rank 1 one), 36 rows in forward batches of 16 (3 batches)
ARGS = ["--method", "smoothquant", "--no-smooth-fc2", "--act-search", "mse", "--gptq", "--cali-n", "6",
        "--cali-steps", "3", "--steps", "6", "--cali-batch", "2", "--batch-size", "16", "--eval-n", "2",
        "--no-progress"]


def _recipe_json(path) -> dict:
    data = json.loads((path / "recipe.json").read_text())
    data["info"] = {k: v for k, v in data["info"].items() if not k.endswith("_seconds")}  # wall times
    return data


def test_two_ranks_write_the_single_process_recipe(tmp_path):
    # the two runs are independent (own output directories, one thread each): run side by side
    single, multi = run_side_by_side([
        [sys.executable, "-m", "dtq.tools.calibrate", *ARGS, "--out", str(tmp_path / "one")],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "dtq.tools.calibrate", *ARGS, "--out", str(tmp_path / "two")]], tmp_path)
    assert single.returncode == 0, single.stderr
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout.count("wrote recipe") == 1 and multi.stdout.count("held-out noise SQNR") == 1  # rank 0 alone
    one, two = tmp_path / "one", tmp_path / "two"
    # recipe.json carries tensors_sha256: equal JSON means byte-identical tensors too
    assert _recipe_json(one) == _recipe_json(two)
    assert (one / "tensors.safetensors").read_bytes() == (two / "tensors.safetensors").read_bytes()
    recipe = _recipe_json(two)
    assert recipe["options"]["gptq"] is True and recipe["info"]["calibration_rows"] == 36
    assert recipe["info"]["heldout_noise_sqnr_db"]["all"] > 10
    # the file's metadata JSON is not byte-stable (safetensors orders it freely): compare the tensors
    set_one, set_two = load_file(one / "calibration_set.safetensors"), load_file(two / "calibration_set.safetensors")
    assert set_one.keys() == set_two.keys() and all(torch.equal(set_one[k], set_two[k]) for k in set_one)
    # 6 samples x 3 steps, each x twice (guidance: its label and the null label): 18 distinct, none repeated
    assert set_two["x"].shape[0] == 36 and len(torch.unique(set_two["x"].reshape(36, -1), dim=0)) == 18
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no partial dirs left


def test_sharded_statistics_merge_to_the_single_process_ones():
    """Three simulated ranks (uneven shares: 4 forward batches), merged, against one pass."""
    from dtq.runtime.zoo import load_builtin

    model = load_builtin("dit-tiny-fmnist").eval()
    data = collect_calibration_set(model, CalibDataConfig(cali_steps=3, cali_n=2, steps=4, seed=3))
    names = ["blocks.0.attn.qkv", "blocks.1.mlp.fc2", "blocks.2.mlp.fc1"]

    def collect(shard: DistContext):
        with StatsCollector(model, names, sample_tokens=40, hist_bins=256, shard=shard) as c:
            data.forward_loop(3, shard=shard)(model)
        return c.stats

    whole = merge_statistics([collect(DistContext())], sample_tokens=40)
    parts = [collect(DistContext(rank, 3)) for rank in range(3)]
    assert [p.rows for p in parts] == [6, 3, 3]  # 12 rows: batches 0,3 / 1 / 2
    merged = merge_statistics(parts[::-1], sample_tokens=40)  # merge order does not matter either
    assert merged.rows == whole.rows == 12
    for n in names:
        a, b = whole[n], merged[n]
        assert a.timesteps == b.timesteps and len(a.timesteps) == 3
        for t in a.timesteps:
            assert torch.equal(a.channel_amax[t], b.channel_amax[t])
            assert a.tensor_min[t] == b.tensor_min[t] and a.tensor_max[t] == b.tensor_max[t]
            assert a.samples[t].shape == (40, a.in_features) and torch.equal(a.samples[t], b.samples[t])
        assert a.hist.hi == b.hist.hi and a.hist.amax == b.hist.amax and torch.equal(a.hist.counts, b.hist.counts)
    # the rank sharing changed which process saw which batch, so a per-rank statistic differs
    assert any(not torch.equal(p[names[0]].hist.counts, whole[names[0]].hist.counts) for p in parts if p.rows)


def test_histogram_merge_is_exact():
    """Histograms of shares with different ranges merge into the histogram of all the values,
    bin for bin equal to one ``histc`` on the final (power-of-two) range."""
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(5000, generator=g) * s for s in (0.03, 1.0, 0.2, 9.0, 0.5)]
    allv = torch.cat(chunks).abs()
    one = AbsHistogram(512)
    for c in chunks:
        one.add(c)
    shares = [AbsHistogram(512), AbsHistogram(512)]
    for i, c in enumerate(chunks):
        shares[i % 2].add(c)
    assert shares[0].hi != shares[1].hi  # the merge has to re-bin
    merged = AbsHistogram(512)
    for h in shares[::-1]:
        merged.merge(h)
    assert one.hi == merged.hi and one.hi / 2 <= float(allv.max()) < one.hi  # the next power of two
    direct = torch.histc(allv, bins=512, min=0, max=one.hi).double()
    assert torch.equal(one.counts, direct) and torch.equal(merged.counts, direct)
    assert merged.amax == one.amax == float(allv.max())
