import json

import numpy as np
import pytest

from dtq.tools.sample import build_parser, main


def test_cli_writes_grid_pngs_and_adm_npz(tmp_path):
    out = tmp_path / "run"
    assert main(["--steps", "4", "--classes", "3,5", "--per-class", "2", "--seed", "7", "--out", str(out), "--no-progress"]) == 0
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (4, 32, 32, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [3, 3, 5, 5]
    assert sorted(p.name for p in (out / "images").iterdir())[0] == "000000_class3.png"
    assert (out / "grid.png").stat().st_size > 0
    assert json.loads((out / "sample_config.json").read_text())["seed"] == 7
    assert not list(tmp_path.glob(".run.partial-*"))  # no temporary directory left behind
    # same seed, same images
    main(["--steps", "4", "--classes", "3,5", "--per-class", "2", "--seed", "7", "--out", str(tmp_path / "again"), "--no-progress"])
    assert np.array_equal(np.load(tmp_path / "again" / "samples.npz")["arr_0"], data["arr_0"])


def test_cli_parses_into_the_api_config():
    from dtq.runtime.pipeline import SampleConfig
    from dtq.tools.cli import dataclass_from_args

    cfg = dataclass_from_args(SampleConfig, build_parser().parse_args(
        ["--classes", "1,2", "--sampler", "ddim", "--dtype", "bf16", "--no-progress", "--cfg-scale", "4"]))
    assert cfg == SampleConfig(classes=[1, 2], sampler="ddim", dtype="bf16", progress=False, cfg_scale=4.0)


@pytest.mark.parametrize("args,message", [
    (["--model", "DiT-XL/2"], "give --ckpt, or --random-weights"),
    (["--model", "DiT-Q/3", "--random-weights"], "unknown --model"),
    (["--classes", "12"], "outside 0..9"),
    (["--ckpt", "/nonexistent.pt"], "checkpoint not found"),
    (["--steps", "0"], "--steps must be in 1..1000"),
    (["--image-size", "64"], "does not match the model, which makes 32px"),
    (["--classes", "1", "--num-images", "3"], "either --classes or --num-images"),
])
def test_cli_bad_input_exits_2_with_message(tmp_path, capsys, args, message):
    assert main(args + ["--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_random_latent_model_writes_latents(tmp_path):
    out = tmp_path / "lat"
    assert main(["--model", "DiT-S/8", "--random-weights", "--image-size", "128", "--num-images", "2",
                 "--num-classes", "3", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    lat = np.load(out / "latents.npz")["arr_0"]
    assert lat.shape == (2, 4, 16, 16) and np.isfinite(lat).all()


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--cfg-scale" in text and "samples.npz" in text and "exit codes" in text
