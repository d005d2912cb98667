"""The README's two set-up commands, as written there, in a fresh virtualenv on a clean clone of the committed HEAD."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND_TAIL = " && python -m pytest"  # the second command's test part: here it runs one file, not the suite


def readme_setup_commands() -> list[str]:
    """The commands of the README's "Set-up: two commands" block, comments left out."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up: two commands\n.*?```bash\n(.*?)```", readme, re.DOTALL)
    assert block, "README.md has no 'Set-up: two commands' bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_in(venv: Path, clone: Path, command: str, timeout: float) -> subprocess.CompletedProcess:
    """A shell command as a user types it after activating the virtualenv, in the clone."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env |= {"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_readme_commands_work_on_a_fresh_clone(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    install_and_demo, install_and_test = readme_setup_commands()
    assert install_and_test.endswith(TEST_COMMAND_TAIL), install_and_test
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)

    demo = run_in(venv, clone, install_and_demo, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "judged" in demo.stdout and "Best-of-4 pick: solution" in demo.stdout
    assert re.search(r"^    \d\.\d{3}  ", demo.stdout, re.MULTILINE), "no step rewards in the demo's output"

    tests = run_in(venv, clone, install_and_test.removesuffix(TEST_COMMAND_TAIL) + " && python -m pytest -q -x tests/test_server_args.py",
                   timeout=900)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert " passed" in tests.stdout and " failed" not in tests.stdout
