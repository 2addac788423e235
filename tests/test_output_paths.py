"""Every writing command checks its output path before any work (dtq.checks.check_output_path),
and dtq.staging.staged_directory writes a directory whole or not at all."""

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from dtq.checks import check_finite_fields, check_output_path
from dtq.staging import staged_directory


def test_check_output_path(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.txt").write_text("x")
    assert check_output_path(tmp_path / "new" / "deeper", "dir") == tmp_path / "new" / "deeper"
    check_output_path(tmp_path / "d", "dir", marker="recipe.json")  # empty: may be filled
    check_output_path(tmp_path / "f", "file")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_output_path(tmp_path / "f", "dir")
    with pytest.raises(ValueError, match="is an existing directory"):
        check_output_path(tmp_path / "d", "file")
    with pytest.raises(ValueError, match=r"f is a file, not a directory"):
        check_output_path(tmp_path / "f" / "a" / "b.json", "file")
    with pytest.raises(ValueError, match="no recipe.json"):
        check_output_path(tmp_path / "r", "dir", marker="recipe.json")
    assert not (tmp_path / "new").exists()  # creates nothing


def test_staged_directory_replace_and_merge(tmp_path):
    target = tmp_path / "out"
    with staged_directory(target, marker="m") as tmp:
        (tmp / "m").write_text("1")
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in target.iterdir()) == ["a", "m"]
    with pytest.raises(KeyboardInterrupt):
        with staged_directory(target, marker="m") as tmp:
            (tmp / "m").write_text("2")
            raise KeyboardInterrupt
    assert (target / "m").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with staged_directory(target, marker="m") as tmp:  # replace: the old files go
        (tmp / "m").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["m"]
    (target / "keep").write_text("k")
    with staged_directory(target, mode="merge") as tmp:  # merge: other files stay
        (tmp / "m").write_text("4")
    assert (target / "m").read_text() == "4" and (target / "keep").read_text() == "k"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_finite_fields():
    @dataclass
    class Cfg:
        a: float = 1.0
        b: list[float] = field(default_factory=lambda: [1.0])
        n: int = 3

    check_finite_fields(Cfg())
    for kw, flag in (({"a": math.nan}, "--a"), ({"a": -math.inf}, "--a"), ({"b": [1.0, math.inf]}, "--b")):
        with pytest.raises(ValueError, match=f"{flag} must be a finite number"):
            check_finite_fields(Cfg(**kw))


def test_every_config_refuses_non_finite_floats():
    from dtq.calibrate.config import CalibConfig, CalibDataConfig
    from dtq.engines.build import BuildConfig
    from dtq.runtime.pipeline import SampleConfig
    from dtq.tools.compare import CompareConfig
    from dtq.tools.fid_cli import FidConfig

    cases = [(SampleConfig, {"eta": math.nan}), (CalibConfig, {"alpha": math.inf}),
             (CalibConfig, {"alpha_grid_step": math.nan}), (CalibConfig, {"lp": math.inf}),
             (CalibDataConfig, {"cfg_scale": math.nan}), (BuildConfig, {"onnx": "m.onnx", "out": "e", "workspace_gb": math.inf}),
             (CompareConfig, {"candidate": "torch", "min_psnr": math.nan}),
             (FidConfig, {"samples": ["s.npz"], "max_fid": math.nan})]
    for cls, kw in cases:
        with pytest.raises(ValueError, match="must be a finite number"):
            cls(**kw)


def test_fid_refuses_its_out_before_extracting_features(tmp_path, capsys, monkeypatch):
    from dtq.tools import fid, fid_cli

    monkeypatch.setattr(fid, "FeatureExtractor", lambda *a, **k: pytest.fail("features before --out was checked"))
    (tmp_path / "d").mkdir()
    samples = tmp_path / "s.npz"  # valid samples: only --out is wrong
    np.savez(samples, np.zeros((4, 32, 32, 1), np.uint8), np.arange(4))
    assert fid_cli.main(["--samples", str(samples), "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "is an existing directory" in capsys.readouterr().err
    assert fid_cli.main(["--samples", str(samples), "--max-fid", "nan", "--no-progress"]) == 2
    assert "--max-fid must be a finite number" in capsys.readouterr().err


def test_build_engine_and_bench_refuse_their_out(tmp_path, capsys):
    from dtq.tools import bench_engines, build_engine

    (tmp_path / "f").write_text("x")
    (tmp_path / "m.onnx").write_text("not checked first")
    assert build_engine.main([str(tmp_path / "m.onnx"), "--out", str(tmp_path / "f" / "engine")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert bench_engines.main(["--smoke", "--out", str(tmp_path / "f" / "r.json")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "m.onnx"]
