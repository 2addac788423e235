"""dtq-export: exit codes, atomic output, metadata."""

import json

import onnx
import pytest

from dtq.export.api import recipe_sha256
from dtq.artifacts import read_onnx_metadata as read_metadata
from dtq.export.api import ExportConfig
from dtq.export.cli import build_parser, config_from_args, main
from dtq.runtime.zoo import load_builtin

from export_recipes import make_recipe


@pytest.fixture(scope="module")
def int8_recipe_dir(tmp_path_factory):
    model = load_builtin("dit-tiny-fmnist")
    recipe = make_recipe(model, "int8")
    return recipe.save(tmp_path_factory.mktemp("recipe") / "int8"), recipe


def test_parser_fills_the_api_config():
    args = build_parser().parse_args(["--model", "dit-tiny-fmnist", "--precision", "w4a16", "--recipe", "r",
                                      "--max-batch", "8", "--out", "m.onnx"])
    cfg = config_from_args(args).resolved()
    assert (cfg.precision, cfg.opset, cfg.dtype, cfg.max_batch, cfg.recipe) == ("w4a16", 21, "fp16", 8, "r")
    # the parser is ExportConfig's fields: defaults and switches come from the dataclass
    args = build_parser().parse_args(["--model", "m", "--out", "m.onnx", "--no-rule-check", "--external-data"])
    assert config_from_args(args) == ExportConfig(out="m.onnx", model="m", rule_check=False, external_data=True)
    assert config_from_args(args).resolved().precision == "fp16"  # no recipe: fp16 by default


def test_int8_export_and_metadata(tmp_path, int8_recipe_dir, capsys, shared_fp_exports):
    rdir, recipe = int8_recipe_dir
    out = tmp_path / "int8.onnx"
    rc = main(["--model", "dit-tiny-fmnist", "--recipe", str(rdir), "--max-batch", "4",
               "--out", str(out)])  # the precision comes from the recipe
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["qdq_nodes"] == 3 * len(recipe.layers)
    meta = read_metadata(out)
    assert meta["precision"] == "int8" and meta["dtype"] == "fp16" and meta["opset"] == "19"
    assert set(json.loads(meta["layer_precisions"]).values()) == {"int8"}
    assert meta["recipe_sha256"] == recipe_sha256(recipe) == summary["recipe_sha256"]
    assert json.loads(meta["inputs"])["x"] == ["batch", 1, 32, 32]
    assert json.loads(meta["batch_range"]) == [1, 4]
    onnx.checker.check_model(str(out))


@pytest.mark.parametrize("argv", [
    ["--model", "dit-tiny-fmnist", "--precision", "int8"],  # no recipe
    ["--model", "no-such-model", "--precision", "fp16"],
    ["--ckpt", "/nonexistent/model.safetensors", "--precision", "fp16"],
    ["--model", "dit-tiny-fmnist", "--precision", "fp16", "--opset", "17"],
    ["--model", "dit-tiny-fmnist", "--precision", "w4a16", "--opset", "19", "--recipe", "x"],
])
def test_bad_usage_exits_2(tmp_path, argv):
    out = tmp_path / "m.onnx"
    assert main([*argv, "--out", str(out)]) == 2
    assert not out.exists()


def test_recipe_of_other_precision_exits_2(tmp_path, int8_recipe_dir, capsys):
    rdir, _ = int8_recipe_dir
    out = tmp_path / "m.onnx"
    assert main(["--model", "dit-tiny-fmnist", "--recipe", str(rdir), "--precision", "fp8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the recipe is precision int8 (recipe.json), but --precision fp8 was given" in err
    assert not out.exists()


def test_rule_failure_exits_1_and_writes_nothing(tmp_path, int8_recipe_dir, capsys):
    rdir, _ = int8_recipe_dir
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    # opset 23 is beyond TensorRT's parser range: the rule check refuses the graph
    rc = main(["--model", "dit-tiny-fmnist", "--recipe", str(rdir), "--precision", "int8", "--opset", "23",
               "--max-batch", "4", "--out", str(out)])
    assert rc == 1
    assert "opset" in capsys.readouterr().err
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("bad", ["directory", "under-a-file"])
def test_unwritable_out_exits_2_before_loading(tmp_path, capsys, monkeypatch, bad):
    import dtq.export.api as api

    monkeypatch.setattr(api, "load_checkpoint", lambda *a, **k: pytest.fail("model loaded before --out was checked"))
    monkeypatch.setattr("dtq.runtime.zoo.load_builtin", lambda *a, **k: pytest.fail("model loaded first"))
    (tmp_path / "f").write_text("x")
    (tmp_path / "d.onnx").mkdir()
    out = tmp_path / "d.onnx" if bad == "directory" else tmp_path / "f" / "m.onnx"
    assert main(["--model", "dit-tiny-fmnist", "--precision", "fp32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "f"] and not any((tmp_path / "d.onnx").iterdir())


def test_recipe_with_foreign_tensors_exits_2(tmp_path, int8_recipe_dir, capsys):
    """recipe.json beside another recipe's tensors (an interrupted overwrite) is refused, not exported."""
    rdir, _ = int8_recipe_dir
    mixed = tmp_path / "mixed"
    other = make_recipe(load_builtin("dit-tiny-fmnist"), "int8", seed=1).save(tmp_path / "other")
    (mixed).mkdir()
    (mixed / "recipe.json").write_bytes((rdir / "recipe.json").read_bytes())
    (mixed / "tensors.safetensors").write_bytes((other / "tensors.safetensors").read_bytes())
    out = tmp_path / "m.onnx"
    assert main(["--model", "dit-tiny-fmnist", "--recipe", str(mixed), "--precision", "int8", "--out", str(out)]) == 2
    assert "does not belong to recipe.json" in capsys.readouterr().err
    assert not out.exists()
