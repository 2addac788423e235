import json

import pytest
import torch

from dtq.runtime.checkpoint import CheckpointError, infer_config, load_checkpoint, read_state_dict, save_checkpoint
from dtq.runtime.model import DiT

from conftest import small_config


def _outputs(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return model(x, torch.tensor([3, 700]), torch.tensor([1, 10]))


@pytest.mark.parametrize("layout", ["safetensors", "raw", "ema", "model", "module-prefix"])
def test_round_trip(tmp_path, small_model, layout):
    if layout == "safetensors":
        path = save_checkpoint(small_model, tmp_path / "m.safetensors", dtype=None)
    else:
        sd = small_model.state_dict()
        if layout == "module-prefix":
            sd = {"module." + k: v for k, v in sd.items()}
        obj = {layout: sd, "opt": {}} if layout in ("ema", "model") else sd
        path = tmp_path / "m.pt"
        torch.save(obj, path)
        # hidden 64 is no paper width, so the heads come from config.json as for any custom DiT
        (tmp_path / "config.json").write_text(json.dumps({"num_heads": 4}))
    loaded = load_checkpoint(path)
    assert loaded.config.hidden_size == 64 and loaded.config.depth == 2 and loaded.config.in_channels == 4
    assert loaded.config.learn_sigma and loaded.config.num_classes == 10 and loaded.config.input_size == 8
    assert torch.equal(_outputs(loaded), _outputs(small_model))


def test_infer_config_needs_heads_for_unknown_width(tmp_path, small_model):
    sd = small_model.state_dict()
    with pytest.raises(CheckpointError, match="heads"):
        infer_config(sd)  # hidden 64 is no paper size
    assert infer_config(sd, {"num_heads": 4}).num_heads == 4


def test_refuses_wrong_shape_naming_the_key(tmp_path, small_model):
    path = save_checkpoint(small_model, tmp_path / "m.safetensors", dtype=None)
    other = small_config(hidden_size=96)
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'pos_embed': checkpoint has \(1, 16, 64\), model expects \(1, 16, 96\)"):
        load_checkpoint(path, expected=other)


def test_refuses_missing_and_unexpected_keys(tmp_path, small_model):
    sd = small_model.state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing key 'blocks.1.mlp.fc2.bias'"):
        load_checkpoint(tmp_path / "missing.pt", expected=small_config())
    sd = small_model.state_dict()
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 4}))
    with pytest.raises(CheckpointError, match="unexpected key 'blocks.0.extra.weight'"):
        load_checkpoint(tmp_path / "extra.pt")


def test_refuses_non_dit_and_garbage(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a DiT checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.pt")


def test_config_json_contradicting_weights_is_refused(tmp_path, small_model):
    path = save_checkpoint(small_model, tmp_path / "m.safetensors", dtype=None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["depth"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="depth=3 but the weights say 2"):
        load_checkpoint(path)


def test_fp16_checkpoint_loads_in_fp32(tmp_path, small_model):
    path = save_checkpoint(small_model, tmp_path / "m.safetensors", dtype=torch.float16)
    loaded = load_checkpoint(path)
    assert loaded.x_embedder.proj.weight.dtype == torch.float32
    ref = DiT(small_model.config)
    ref.load_state_dict({k: v.half().float() for k, v in small_model.state_dict().items()})
    assert torch.equal(_outputs(loaded), _outputs(ref.eval()))


class _Payload:
    """A pickle that would run code when unpickled unsafely: creates the file it names."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_directory_is_not_a_checkpoint(tmp_path, small_model):
    """A directory that is no diffusers folder is named as such (main's loader reads diffusers folders),
    and a folder holding a dtq checkpoint names the file to pass."""
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file, and not a diffusers model folder \(no model_index.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(small_model, tmp_path / "model.safetensors")  # with dtq's config.json beside it
    for read in (load_checkpoint, read_state_dict):
        with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file \(it holds model.safetensors: pass the file\)$"):
            read(tmp_path)


@pytest.mark.parametrize("kind", ["random", "text", "truncated", "pickle-of-objects", "zip-of-objects"])
def test_garbage_is_not_a_dit_checkpoint_and_never_unpickled(tmp_path, small_model, kind):
    import os
    import pickle

    path, marker = tmp_path / "bad.pt", tmp_path / "code-ran"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("hello world\n")
    elif kind == "truncated":
        torch.save(small_model.state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "pickle-of-objects":
        path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    else:
        torch.save({"model": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path} is not a DiT checkpoint (") and "\n" not in msg, msg
    assert "weights_only" not in msg and "arbitrary code" not in msg
    assert not marker.exists()  # nothing was unpickled unsafely
