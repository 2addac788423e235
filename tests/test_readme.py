"""README.md's commands are the ones CI runs: each command of .ci/run is a line of a README code
block, so the README's test command cannot drift from what CI proves works."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_lines() -> set[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return {line.strip() for block in blocks for line in block.splitlines() if line.strip()}


def _ci_commands() -> list[str]:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    # the shell's own set-up (strict mode, the repository root) is not a README command
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]


def test_ci_runs_the_readme_commands():
    commands = _ci_commands()
    assert any("pytest" in c for c in commands), commands
    readme = _readme_lines()
    missing = [c for c in commands if c not in readme]
    assert not missing, f".ci/run commands not in README.md: {missing}"


def test_readme_set_up_commands_install_the_cpu_torch_first():
    """Both set-up lines (run the sampler; run the tests) install the same CPU torch, then dtq."""
    setups = sorted(line for line in _readme_lines() if line.startswith("pip install torch"))
    assert len(setups) == 2, setups
    torch_parts = {line.split(" && ")[0] for line in setups}
    assert torch_parts == {"pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"}
    assert any(line.endswith("pip install -e '.[test]' && python -m pytest -q tests") for line in setups)
    assert any(line.endswith("&& dtq-sample --out samples") for line in setups)
