"""dtq-calibrate: the CLI parses into the API's config objects and writes a loadable recipe."""

import json

import pytest
import torch

from dtq.calibrate.config import CalibConfig, CalibDataConfig
from dtq.runtime.recipe import load_recipe
from dtq.runtime.zoo import load_builtin
from dtq.tools.calibrate import CalibrateJob, build_parser, main
from dtq.tools.cli import dataclass_from_args

SMALL = ["--cali-steps", "3", "--cali-n", "2", "--steps", "10", "--eval-n", "2", "--no-progress"]


def test_cli_parses_into_the_api_config():
    args = build_parser().parse_args(["--method", "ditas", "--precision", "w4a16", "--weight-granularity", "group64",
                                      "--alpha-grid-step", "0.1", "--layers", "attn.qkv,mlp.fc1", "--cali-n", "8"])
    assert dataclass_from_args(CalibConfig, args) == CalibConfig(
        method="ditas", precision="w4a16", weight_granularity="group64", alpha_grid_step=0.1,
        layers=["attn.qkv", "mlp.fc1"])
    overrides = build_parser().parse_args(["--overrides", "blocks.1.*=fp16,*.mlp.fc2=w8a16"])
    assert dataclass_from_args(CalibConfig, overrides).overrides == ["blocks.1.*=fp16", "*.mlp.fc2=w8a16"]
    assert dataclass_from_args(CalibDataConfig, args) == CalibDataConfig(cali_n=8)
    assert dataclass_from_args(CalibrateJob, args) == CalibrateJob()


def test_cli_writes_recipe_and_reuses_calibration_set(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["--method", "ptq4dit", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "held-out noise SQNR" in printed
    model = load_builtin("dit-tiny-fmnist")
    recipe = load_recipe(out, model)
    assert recipe.method == "ptq4dit" and recipe.layers["blocks.0.attn.qkv"].balance_fold == "adaLN"
    assert json.loads((out / "recipe.json").read_text())["precision"] == "int8" == recipe.precision
    assert recipe.info["calibration_set"]["cali_n"] == 2
    assert recipe.info["heldout_noise_sqnr_db"]["all"] > 15
    assert (out / "calibration_set.safetensors").is_file()
    # a second method from the saved calibration set, no sampling
    out2 = tmp_path / "r2"
    assert main(["--method", "smoothquant", "--alpha", "0.7", "--cali-data", str(out / "calibration_set.safetensors"),
                 "--eval-n", "0", "--out", str(out2), "--no-progress"]) == 0
    r2 = json.loads((out2 / "recipe.json").read_text())
    assert r2["options"]["alpha"] == 0.7 and r2["info"]["calibration_rows"] == 3 * 2 * 2


def test_cli_bad_usage_exits_2(tmp_path, capsys):
    assert main(["--precision", "w4a8", "--weight-granularity", "tensor", "--out", str(tmp_path / "x"), *SMALL]) == 2
    assert "precision w4a8 takes weight granularity group128, group64, group32; got 'tensor'" in capsys.readouterr().err
    assert main(["--overrides", "blocks.9.*=fp16", "--out", str(tmp_path / "x"), *SMALL]) == 2
    assert "matches no quantizable layer" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x"), *SMALL]) == 2
    assert not (tmp_path / "x").exists()


def test_interrupted_calibrate_keeps_the_old_recipe(tmp_path, monkeypatch, capsys):
    """SIGINT during dtq-calibrate --out <existing recipe> (here: while the calibration set is being
    written, after the new tensors): exit 130, the old recipe whole and loadable, nothing else left."""
    from dtq.calibrate.data import CalibrationSet

    out = tmp_path / "r"
    assert main(["--method", "minmax", "--out", str(out), *SMALL]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(CalibrationSet, "save", interrupted)
    assert main(["--method", "ptq4dit", "--out", str(out), *SMALL]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert load_recipe(out, load_builtin("dit-tiny-fmnist")).method == "minmax"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_cli_refuses_an_unwritable_out_before_calibrating(tmp_path, monkeypatch, capsys):
    import dtq.runtime.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("model loaded before --out was checked"))
    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file"), *SMALL]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "file" / "r"), *SMALL]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert main(["--out", str(tmp_path / "notes"), *SMALL]) == 2
    assert "no recipe.json" in capsys.readouterr().err
    assert main(["--alpha", "nan", "--out", str(tmp_path / "x"), *SMALL]) == 2
    assert "--alpha must be a finite number" in capsys.readouterr().err
