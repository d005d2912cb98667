"""What a new user meets first: the version, the license, one clear line for a missing package, a light import."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import prmserve

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_version_comes_from_the_installed_metadata() -> None:
    assert prmserve.__version__ == metadata.version("prmserve")
    shown = subprocess.run([sys.executable, "-m", "prmserve", "--version"], capture_output=True, text=True, check=True)
    assert shown.stdout == f"prmserve {prmserve.__version__}\n"


def test_the_license_file_is_the_apache_license_the_metadata_names() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    assert "License :: OSI Approved :: Apache Software License" in project["classifiers"]
    assert set(project["urls"]) == {"Homepage", "Repository", "Issues", "Documentation"}


@pytest.mark.parametrize("name", ["Client", "AsyncClient"])
def test_a_missing_client_package_is_one_clear_import_error(name: str) -> None:
    done = run_python(f"import sys; sys.modules['httpx'] = None\ntry:\n from prmserve import {name}\n"
                      "except ImportError as exc:\n print(exc)")
    assert done.stdout == f"prmserve.{name} needs the 'httpx' package, which is not installed: pip install httpx\n", done.stderr


def test_a_missing_server_package_is_one_line_from_the_command() -> None:
    done = run_python("import sys; sys.modules['fastapi'] = None\nfrom prmserve.cli import main\nsys.exit(main(['serve']))")
    assert done.returncode == 1
    assert done.stderr == "prmserve serve needs the 'fastapi' package, which is not installed: pip install fastapi\n"


def test_a_missing_module_of_prmserve_itself_is_not_blamed_on_a_dependency() -> None:
    assert prmserve.missing_dependency(ModuleNotFoundError(name="prmserve.nowhere")) is None
    assert prmserve.missing_dependency(ModuleNotFoundError(name="prometheus_client.core")).endswith("pip install prometheus-client")


def test_importing_the_engine_does_not_load_torch_dynamo() -> None:
    """The Flash varlen module pulls in torch._dynamo (~1 s); it is imported on first CUDA use only."""
    done = run_python(
        "import sys, torch, prmserve.prm\n"
        "from prmserve.models.attention import varlen_available\n"
        "assert not varlen_available(torch.device('cpu'), torch.bfloat16)\n"
        "assert not varlen_available(torch.device('cuda'), torch.float32)\n"
        "print('torch._dynamo' in sys.modules)"
    )
    assert done.stdout == "False\n", done.stderr
