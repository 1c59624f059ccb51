"""The installed package is the repository's layout (DESIGN.md §1)."""

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_installed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "segppo").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
    assert setuptools["package-dir"]["segppo.kernels"] == "kernels"
    assert setuptools["package-dir"]["segppo.cli"] == "cli"


FIND_TOP_LEVEL = "import importlib.util as u; print(u.find_spec('kernels'), u.find_spec('cli'))"


def test_no_top_level_kernels_or_cli_module():
    # transformers imports a top-level `kernels` package when one is importable
    out = subprocess.run(
        [sys.executable, "-c", FIND_TOP_LEVEL],
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    assert out.stdout.strip() == "None None"


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "segppo.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "segppo" in out.stdout
