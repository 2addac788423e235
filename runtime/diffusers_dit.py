"""diffusers DiT folders <-> dtq's DiT: config and key/shape mapping, read from local files only.

A diffusers DiT is either a pipeline folder (``model_index.json`` with ``transformer/``,
``vae/`` and ``scheduler/``) or a bare transformer folder (``config.json`` +
``diffusion_pytorch_model.safetensors``). Its ``DiTTransformer2DModel`` is the facebookresearch
DiT with other names, three differences in layout and two in arithmetic:

- layout: ``attn1.to_q/to_k/to_v`` are DiT's fused ``attn.qkv`` split in three; every block owns
  a copy of the timestep and label embedders (``norm1.emb``; the final layer uses block 0's),
  where DiT has one; the position table is recomputed at load, not stored.
- arithmetic: the sinusoidal timestep frequencies are ``exp(-ln(1e4) i / (half - 1))``
  (diffusers' ``downscale_freq_shift=1``; DiT divides by ``half``), and the LayerNorm before the
  MLP uses the config's ``norm_eps`` (default 1e-5; DiT's is 1e-6). dtq's DiTConfig carries both
  (``time_freq_shift``, ``mlp_norm_eps``), so a diffusers folder loads as the function diffusers
  computes, not as the original DiT it was converted from.

Reading needs no diffusers install (safetensors and JSON); only decoding latents with the
folder's ``vae/`` does (``runtime.decode``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .model import DiTConfig, get_2d_sincos_pos_embed

TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the hub's DiT configs say the latter
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_DEFAULT_NORM_EPS = 1e-5  # DiTTransformer2DModel's default when the config has no norm_eps


class DiffusersModelError(ValueError):
    """A diffusers folder that is not a DiT dtq can load (one-line reason)."""


# -- folders ---------------------------------------------------------------------------------------
def is_diffusers_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "config.json").is_file())


def transformer_dir(path: str | os.PathLike) -> Path:
    """The folder holding the transformer's config.json: ``path/transformer`` of a pipeline, else ``path``."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        sub = path / "transformer"
        if not (sub / "config.json").is_file():
            raise DiffusersModelError(f"{path}: model_index.json but no transformer/config.json")
        return sub
    if not (path / "config.json").is_file():
        raise DiffusersModelError(f"{path}: neither model_index.json nor config.json: not a diffusers folder")
    return path


def vae_dir(path: str | os.PathLike) -> Path | None:
    """The pipeline's ``vae/`` folder (a diffusers AutoencoderKL), or None."""
    sub = Path(path) / "vae"
    return sub if (Path(path) / "model_index.json").is_file() and (sub / "config.json").is_file() else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DiffusersModelError(f"{path}: invalid JSON ({exc})") from exc


# -- config ----------------------------------------------------------------------------------------
def dit_config_from_diffusers(cfg: dict, space: str = "latent") -> DiTConfig:
    """DiTConfig of a ``DiTTransformer2DModel`` config.json; anything dtq's DiT cannot compute is refused."""
    name = cfg.get("_class_name")
    if name not in TRANSFORMER_CLASSES:
        raise DiffusersModelError(f"transformer class {name!r} is not a DiT ({' or '.join(TRANSFORMER_CLASSES)})")
    checks = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
              "norm_elementwise_affine": False}
    for key, want in checks.items():
        if cfg.get(key, want) != want:
            raise DiffusersModelError(f"transformer {key}={cfg[key]!r}: dtq's DiT supports only {want!r}")
    if cfg.get("num_embeds_ada_norm") is None:
        raise DiffusersModelError("transformer has no num_embeds_ada_norm: not a class-conditional DiT")
    heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
    in_ch = cfg.get("in_channels", 4)
    out_ch = cfg.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise DiffusersModelError(f"out_channels {out_ch} is neither in_channels {in_ch} nor twice it")
    return DiTConfig(
        input_size=cfg.get("sample_size", 32), patch_size=cfg.get("patch_size", 2), in_channels=in_ch,
        hidden_size=heads * head_dim, depth=cfg.get("num_layers", 28), num_heads=heads,
        num_classes=cfg["num_embeds_ada_norm"], learn_sigma=out_ch == 2 * in_ch,
        class_dropout_prob=0.1,  # CombinedTimestepLabelEmbeddings' fixed value: the table has a null row
        space=space, time_freq_shift=1.0, mlp_norm_eps=float(cfg.get("norm_eps", DIFFUSERS_DEFAULT_NORM_EPS)),
    )


def diffusers_config_from_dit(config: DiTConfig) -> dict:
    """The ``DiTTransformer2DModel`` config of a dtq DiTConfig (for writing diffusers folders)."""
    if config.mlp_ratio != 4.0:
        raise DiffusersModelError(f"DiTTransformer2DModel fixes mlp_ratio 4, this DiT has {config.mlp_ratio}")
    return dict(num_attention_heads=config.num_heads, attention_head_dim=config.hidden_size // config.num_heads,
                in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
                sample_size=config.input_size, patch_size=config.patch_size, num_embeds_ada_norm=config.num_classes,
                norm_eps=config.mlp_norm_eps)


def check_scheduler(path: Path) -> None:
    """dtq samples with DiT's diffusion (1000 linear betas 1e-4..0.02, epsilon prediction): a
    scheduler config that says otherwise would give wrong images, so it is refused."""
    cfg = _read_json(path)
    want = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
            "prediction_type": "epsilon"}
    bad = {k: cfg[k] for k, v in want.items() if k in cfg and cfg[k] != v and not
           (isinstance(v, float) and isinstance(cfg[k], (int, float)) and abs(cfg[k] - v) < 1e-12)}
    if cfg.get("trained_betas") is not None:
        bad["trained_betas"] = "(a table)"
    if bad:
        raise DiffusersModelError(f"{path}: scheduler {bad} is not DiT's 1000-step linear-beta epsilon schedule, "
                                  "the only one dtq samples")


# -- weights ---------------------------------------------------------------------------------------
def read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The transformer's tensors: one safetensors/bin file or a sharded safetensors index."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        from safetensors.torch import load_file

        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(folder / name))
            return torch.load(folder / name, map_location="cpu", weights_only=True)
    raise DiffusersModelError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")


def _block_map(i: int) -> dict[str, str]:
    """dtq key -> diffusers key inside block i (qkv handled apart: it is split)."""
    d = f"transformer_blocks.{i}."
    return {f"blocks.{i}.attn.proj": d + "attn1.to_out.0", f"blocks.{i}.mlp.fc1": d + "ff.net.0.proj",
            f"blocks.{i}.mlp.fc2": d + "ff.net.2", f"blocks.{i}.adaLN_modulation.1": d + "norm1.linear"}


def _embedder_map(i: int) -> dict[str, str]:
    e = f"transformer_blocks.{i}.norm1.emb."
    return {"t_embedder.mlp.0": e + "timestep_embedder.linear_1", "t_embedder.mlp.2": e + "timestep_embedder.linear_2",
            "y_embedder.embedding_table": e + "class_embedder.embedding_table"}


_TOP_MAP = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
            "final_layer.linear": "proj_out_2"}


def dit_state_dict_from_diffusers(sd: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """facebookresearch-layout state dict of a DiTTransformer2DModel's; refuses per-block embedders
    that differ (dtq's DiT has one) and any key left over."""
    left = dict(sd)

    def take(key: str) -> torch.Tensor:
        if key not in left:
            raise DiffusersModelError(f"diffusers weights are missing {key!r}")
        return left.pop(key)

    out: dict[str, torch.Tensor] = {}
    pairs = dict(_TOP_MAP)
    for i in range(config.depth):
        pairs.update(_block_map(i))
    for ours, theirs in pairs.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
    for i in range(config.depth):
        a = f"transformer_blocks.{i}.attn1."
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([take(a + f"to_{n}.{p}") for n in "qkv"])
        for ours, theirs in _embedder_map(i).items():
            for p in ("weight", "bias") if "embedding_table" not in ours else ("weight",):
                t = take(f"{theirs}.{p}")
                if i == 0:
                    out[f"{ours}.{p}"] = t
                elif not torch.equal(t, out[f"{ours}.{p}"]):
                    raise DiffusersModelError(f"{theirs}.{p} differs from block 0's: dtq's DiT shares one embedder")
    if left:
        raise DiffusersModelError(f"diffusers weights have keys dtq's DiT does not: {sorted(left)[:3]} ...")
    grid = config.input_size // config.patch_size
    out["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(config.hidden_size, grid)).float()[None]
    return out


def diffusers_state_dict_from_dit(sd: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """The inverse: a DiTTransformer2DModel state dict (embedders copied into every block)."""
    out: dict[str, torch.Tensor] = {}
    pairs = list(_TOP_MAP.items())
    for i in range(config.depth):  # the shared embedders go to every block
        pairs += list(_block_map(i).items()) + list(_embedder_map(i).items())
    for ours, theirs in pairs:
        for p in ("weight", "bias"):
            if f"{ours}.{p}" in sd:
                out[f"{theirs}.{p}"] = sd[f"{ours}.{p}"].clone()
    for i in range(config.depth):
        for p in ("weight", "bias"):
            for n, t in zip("qkv", sd[f"blocks.{i}.attn.qkv.{p}"].chunk(3)):
                out[f"transformer_blocks.{i}.attn1.to_{n}.{p}"] = t.clone()
    return out


def load_diffusers_dit(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A dtq DiT from a local diffusers folder (pipeline or bare transformer).

    Space: ``latent`` when the pipeline has ``vae/``; a transformer config.json may say
    ``"space": "pixel"`` (a key diffusers ignores) for pixel-space models; otherwise latent."""
    from .checkpoint import build_model

    path = Path(path)
    tdir = transformer_dir(path)
    cfg = _read_json(tdir / "config.json")
    sched = path / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        check_scheduler(sched)
    space = "latent" if vae_dir(path) is not None else cfg.get("space", "latent")
    config = dit_config_from_diffusers(cfg, space=space)
    state = dit_state_dict_from_diffusers(read_diffusers_weights(tdir), config)
    return build_model(config, state, dtype)
