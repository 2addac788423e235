"""Loading and saving DiT checkpoints.

Accepted: ``.pt``/``.pth`` (a raw state_dict, or a dict holding it under ``ema`` or ``model``,
read with ``torch.load(weights_only=True)``) and ``.safetensors``; a ``config.json`` beside the
file supplies what the tensor shapes cannot tell (heads, space). Everything else is inferred from
shapes, and a checkpoint that does not fit the expected architecture is refused with the first
wrong key or shape named.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch

from .model import DIT_CONFIGS, DiT, DiTConfig

# heads are not visible in any tensor shape: the paper's sizes fix them per hidden width.
_HEADS_BY_HIDDEN = {cfg.hidden_size: cfg.num_heads for cfg in DIT_CONFIGS.values()}


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as (or does not match) the expected DiT."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file without building a model."""
    path = Path(path)
    if path.is_dir():
        raise _not_a_checkpoint_dir(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{path} is not a DiT checkpoint (not a readable safetensors file: {exc})") from exc
    try:
        # weights_only: tensors and plain containers only; dtq never unpickles arbitrary objects
        with warnings.catch_warnings():  # its pickle-protocol warning is noise before our one-line error
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text suggests weights_only=False: never repeat that
        raise CheckpointError(f"{path} is not a DiT checkpoint (not a PyTorch file of tensors: its pickle is "
                              "unreadable or holds Python objects other than tensors, which dtq does not load)") from exc
    except Exception as exc:
        what = ("a damaged or truncated PyTorch zip archive" if "zip archive" in str(exc)
                else "not a PyTorch checkpoint file")
        raise CheckpointError(f"{path} is not a DiT checkpoint ({what})") from exc
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a DiT checkpoint (expected a state_dict of tensors, or a dict holding "
                              f"one under 'ema'/'model', got {type(obj).__name__})")
    # checkpoints saved from DataParallel / torch.compile wrappers carry a prefix
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def read_config_json(path: str | os.PathLike) -> dict:
    """The ``config.json`` beside a checkpoint, or ``{}`` when there is none."""
    path = Path(path)
    if path.is_dir():  # a diffusers folder: its configs are read by diffusers_dit
        return {}
    cfg_path = path if path.suffix == ".json" else path.parent / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({exc})") from exc


def infer_config(state_dict: dict[str, torch.Tensor], hints: dict | None = None) -> DiTConfig:
    """Derive a DiTConfig from tensor shapes; ``hints`` (e.g. config.json) fill the rest."""
    hints = dict(hints or {})
    required = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight"]
    for key in required:
        if key not in state_dict:
            raise CheckpointError(f"not a DiT checkpoint: missing key {key!r}")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    tokens = state_dict["pos_embed"].shape[1]
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise CheckpointError(f"pos_embed has {tokens} tokens, not a square grid")
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out_features = state_dict["final_layer.linear.weight"].shape[0]
    out_channels = out_features // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"final_layer.linear has {out_features} outputs; expected {patch}x{patch}x{in_channels} or x2")
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    has_null = hints.get("class_dropout_prob", 0.1) > 0
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    num_heads = hints.get("num_heads") or _HEADS_BY_HIDDEN.get(hidden)
    if num_heads is None:
        raise CheckpointError(f"cannot tell the number of heads for hidden size {hidden}: give num_heads in config.json")
    inferred = dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=(fc1.shape[0] / hidden) if fc1 is not None else 4.0,
        num_classes=rows - int(has_null),
        learn_sigma=out_channels == 2 * in_channels,
        class_dropout_prob=hints.get("class_dropout_prob", 0.1),
        space=hints.get("space", "latent"),
        time_freq_shift=hints.get("time_freq_shift", 0.0),  # non-default only for models from diffusers
        mlp_norm_eps=hints.get("mlp_norm_eps", 1e-6),
    )
    taken = ("class_dropout_prob", "space", "num_heads", "time_freq_shift", "mlp_norm_eps")
    for key, value in hints.items():
        if key in inferred and key not in taken and inferred[key] != value:
            raise CheckpointError(f"config.json says {key}={value!r} but the weights say {inferred[key]!r}")
    return DiTConfig(**inferred)


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise CheckpointError(f"checkpoint is missing key {key!r} (expected shape {tuple(tensor.shape)})")
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"shape mismatch for {key!r}: checkpoint has {tuple(state_dict[key].shape)}, model expects {tuple(tensor.shape)}"
            )
    for key in state_dict:
        if key not in expected:
            raise CheckpointError(f"checkpoint has unexpected key {key!r}")


def build_model(config: DiTConfig, state_dict: dict[str, torch.Tensor] | None = None, dtype=torch.float32) -> DiT:
    """A DiT with the given weights (checked first); without weights, DiT's own initialisation."""
    if state_dict is None:
        return DiT(config).to(dtype).eval()
    with torch.device("meta"):  # no wasted random init of hundreds of millions of weights
        model = DiT(config)
    check_state_dict(model, state_dict)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    model.pos_embed.requires_grad_(False)
    return model.eval()


def load_checkpoint(
    path: str | os.PathLike, expected: DiTConfig | None = None, dtype: torch.dtype = torch.float32
) -> DiT:
    """Load a DiT from ``path``: a checkpoint file, or a local diffusers folder (pipeline or
    transformer, see ``diffusers_dit``). With ``expected``, the checkpoint must match it exactly."""
    if Path(path).is_dir():
        return _load_diffusers(path, expected, dtype)
    state_dict = read_state_dict(path)
    hints = read_config_json(path)
    if expected is not None:
        hints = {**hints, "num_heads": expected.num_heads, "space": expected.space,
                 "class_dropout_prob": expected.class_dropout_prob}
        with torch.device("meta"):
            probe = DiT(expected)
        check_state_dict(probe, state_dict)  # names the first wrong key before inference guesses
        config = expected
    else:
        config = infer_config(state_dict, hints)
    return build_model(config, state_dict, dtype)


def _is_dtq_checkpoint_dir(path: Path) -> bool:
    """A folder holding a dtq/facebookresearch checkpoint file and dtq's config.json (no diffusers ``_class_name``)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return False
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and "_class_name" not in cfg


def _not_a_checkpoint_dir(path: Path) -> CheckpointError:
    inside = [p.name for p in sorted(Path(path).glob("*")) if p.suffix in CHECKPOINT_SUFFIXES]
    if inside:
        return CheckpointError(f"{path} is a directory, not a checkpoint file (it holds {', '.join(inside[:3])}: "
                               "pass the file)")
    return CheckpointError(f"{path} is a directory, not a checkpoint file, and not a diffusers model folder "
                           "(no model_index.json or config.json)")


def _load_diffusers(path, expected: DiTConfig | None, dtype: torch.dtype) -> DiT:
    from .diffusers_dit import DiffusersModelError, is_diffusers_folder, load_diffusers_dit

    if not is_diffusers_folder(path) or _is_dtq_checkpoint_dir(path):
        raise _not_a_checkpoint_dir(path)
    from .pixart import is_pixart_folder, load_pixart

    if is_pixart_folder(path):  # not a DiT: diffusers' own PixArt model behind its adapter (runtime/pixart.py)
        if expected is not None:
            raise CheckpointError(f"{path}: a PixArt folder does not match a DiT --model")
        return load_pixart(path, dtype)
    try:
        model = load_diffusers_dit(path, dtype)
    except DiffusersModelError as exc:
        raise CheckpointError(str(exc)) from exc
    if expected is not None:
        mine, want = model.config.to_dict(), expected.to_dict()
        diff = {k: (mine[k], want[k]) for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                                 "num_heads", "num_classes", "learn_sigma") if mine[k] != want[k]}
        if diff:
            raise CheckpointError(f"{path}: the diffusers model does not match --model (folder vs expected: {diff})")
    return model


def save_checkpoint(model: DiT, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16,
                    extra_config: dict | None = None) -> Path:
    """Write ``model.safetensors`` (or ``.pt``) and ``config.json`` beside it, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
               for k, v in model.state_dict().items()}
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=path.suffix, delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        if path.suffix == ".safetensors":
            save_file(tensors, str(tmp_path))
        else:
            torch.save(tensors, tmp_path)
        os.chmod(tmp_path, 0o644)  # NamedTemporaryFile creates 0600
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    config = {**model.config.to_dict(), **(extra_config or {})}
    (path.parent / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return path
