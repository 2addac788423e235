"""diffusers DiT folders: the reference DiT-S/2 converted into diffusers' DiTTransformer2DModel
(built and saved by diffusers itself) loads into dtq's DiT as the function diffusers computes, and
dtq-sample samples it from the folder."""

import json
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (pip install 'dtq[test]')")

from safetensors.torch import save_file  # noqa: E402

from dtq.runtime.checkpoint import CheckpointError, load_checkpoint, read_state_dict  # noqa: E402
from dtq.runtime.diffusers_dit import (diffusers_config_from_dit, diffusers_state_dict_from_dit,  # noqa: E402
                                       dit_state_dict_from_diffusers)
from dtq.runtime.model import DiT, DiTConfig, get_2d_sincos_pos_embed  # noqa: E402
from dtq.tools.sample import main as sample_main  # noqa: E402

SAMPLE = ["--steps", "2", "--classes", "0,7", "--per-class", "2", "--seed", "5", "--cfg-scale", "1.5", "--no-progress"]


def _to_diffusers(model: DiT, norm_eps: float = 1e-6):
    """diffusers' own DiTTransformer2DModel holding ``model``'s weights (strict load: every key mapped)."""
    cfg = diffusers_config_from_dit(model.config.replace(mlp_norm_eps=norm_eps))
    dm = diffusers.DiTTransformer2DModel(**cfg)
    dm.load_state_dict(diffusers_state_dict_from_dit(model.state_dict(), model.config), strict=True)
    return dm.eval()


def _inputs(n=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 1, 32, 32, generator=g), torch.tensor([0, 1, 10, 100, 500, 900, 999, 250])[:n],
            torch.tensor([0, 1, 2, 3, 4, 5, 9, 10])[:n])  # 10 = the null class


@pytest.fixture
def reference(reference_ckpt):
    return load_checkpoint(reference_ckpt)


def _pipeline_folder(dm, root, scheduler: dict | None = None, space="pixel"):
    """A DiTPipeline-style folder: model_index.json, transformer/ (save_pretrained), scheduler/."""
    dm.save_pretrained(root / "transformer")
    cfg_path = root / "transformer" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "space": space}))
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    **(scheduler or {}))
    sched.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
                                                       "scheduler": ["diffusers", "DDIMScheduler"]}))
    return root


def test_reference_through_diffusers_matches_diffusers_forward(reference, tmp_path):
    dm = _to_diffusers(reference, norm_eps=1e-5)  # diffusers' default norm_eps, as the hub's DiT configs
    folder = _pipeline_folder(dm, tmp_path / "dit-s2-diffusers")
    ours = load_checkpoint(folder)
    assert ours.config.time_freq_shift == 1.0 and ours.config.mlp_norm_eps == 1e-5 and ours.config.space == "pixel"
    x, t, y = _inputs()
    with torch.no_grad():
        theirs, mine, original = dm(x, t, y).sample, ours(x, t, y), reference(x, t, y)
    assert torch.equal(dm.pos_embed.pos_embed, ours.pos_embed)  # diffusers' recomputed table, bit for bit
    err = (theirs - mine).abs().max().item()
    assert err < 2e-5, err  # fp32 rounding (measured 1.7e-6 on outputs of magnitude ~4.6)
    # ... and diffusers' port is not the original DiT function: its timestep frequencies divide by
    # half-1 (downscale_freq_shift=1). If diffusers ever changes this, the mapping must change too.
    eps_rel = ((theirs[:, :1] - original[:, :1]).norm() / original[:, :1].norm()).item()
    assert eps_rel > 1e-3, eps_rel


def test_state_dict_round_trip_and_refusals(reference):
    sd = diffusers_state_dict_from_dit(reference.state_dict(), reference.config)
    back = dit_state_dict_from_diffusers(sd, reference.config)
    assert back.keys() == reference.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in reference.state_dict().items() if k != "pos_embed")
    # the position table is recomputed in fp32 as diffusers does; the reference stores it in fp16
    assert (back["pos_embed"] - reference.pos_embed).abs().max() < 1e-3
    sd["transformer_blocks.3.norm1.emb.timestep_embedder.linear_1.bias"] += 1e-3
    with pytest.raises(ValueError, match="differs from block 0's"):
        dit_state_dict_from_diffusers(sd, reference.config)


def test_dtq_sample_from_folder(reference, reference_ckpt, tmp_path):
    """dtq-sample --ckpt <diffusers folder> gives byte-identical samples to the reference weights in
    facebookresearch layout with the diffusers arithmetic switched on in config.json and the fp32
    position table diffusers computes (same function, other loader); and within one uint8 level
    of diffusers' own network run in dtq's sampler."""
    folder = _pipeline_folder(_to_diffusers(reference), tmp_path / "folder")
    same_fn = tmp_path / "fb-layout"
    same_fn.mkdir()
    sd = read_state_dict(reference_ckpt)
    grid = reference.config.input_size // reference.config.patch_size
    sd["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(reference.config.hidden_size, grid)).float()[None]
    save_file(sd, str(same_fn / "model.safetensors"))
    cfg = json.loads((reference_ckpt.parent / "config.json").read_text())
    (same_fn / "config.json").write_text(json.dumps({**cfg, "time_freq_shift": 1.0, "mlp_norm_eps": 1e-6}))
    assert sample_main(SAMPLE + ["--ckpt", str(folder), "--out", str(tmp_path / "a")]) == 0
    assert sample_main(SAMPLE + ["--ckpt", str(same_fn / "model.safetensors"), "--out", str(tmp_path / "b")]) == 0
    a = np.load(tmp_path / "a" / "samples.npz")
    assert (tmp_path / "a" / "samples.npz").read_bytes() == (tmp_path / "b" / "samples.npz").read_bytes()
    assert a["arr_1"].tolist() == [0, 0, 7, 7]

    from dtq.runtime.pipeline import SampleConfig, generate

    dm = _to_diffusers(reference)
    args = dict(steps=2, classes=[0, 7], per_class=2, seed=5, cfg_scale=1.5, progress=False)
    theirs = generate(SampleConfig(**args, out=tmp_path / "c"), denoiser=lambda x, t, y: dm(x, t, y).sample, model=load_checkpoint(folder))
    diff = np.abs(np.load(tmp_path / "c" / "samples.npz")["arr_0"].astype(int) - a["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert theirs.images.shape == (4, 1, 32, 32)


def test_bad_scheduler_and_folder_are_refused(tmp_path, capsys):
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                          num_classes=3, space="pixel")).randomize_(0)
    folder = _pipeline_folder(_to_diffusers(model), tmp_path / "cosine")
    json_path = folder / "scheduler" / "scheduler_config.json"
    json_path.write_text(json.dumps({**json.loads(json_path.read_text()), "beta_schedule": "squaredcos_cap_v2"}))
    with pytest.raises(CheckpointError, match="not DiT's 1000-step linear-beta"):
        load_checkpoint(folder)
    assert sample_main(["--ckpt", str(folder), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "scheduler" in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        load_checkpoint(tmp_path / "empty")


def test_latent_pipeline_decodes_with_its_vae(tmp_path):
    """A latent DiT pipeline folder: its vae/ decodes the samples (images, not latents.npz)."""
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                          num_classes=3)).randomize_(0)
    folder = _pipeline_folder(_to_diffusers(model), tmp_path / "latent", space="latent")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=32, sample_size=16)
    vae.save_pretrained(folder / "vae")
    assert load_checkpoint(folder).config.space == "latent"
    assert sample_main(["--ckpt", str(folder), "--num-images", "2", "--steps", "2", "--out", str(tmp_path / "s"),
                        "--no-progress"]) == 0
    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (2, 16, 16, 3) and arr.dtype == np.uint8  # 8x8 latents, one 2x upsampling
