"""What a user sees when the extension cannot load: a build for another torch, or a source
tree with no build in it; and what the build reports about itself."""

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import fused_dropout
from fused_dropout import _load

ROOT = Path(__file__).resolve().parents[1]


def test_a_build_for_another_torch_is_refused_with_both_versions(monkeypatch):
    other = types.ModuleType("fused_dropout._build_info")
    other.TORCH_VERSION, other.TORCH_CUDA_VERSION = "2.99.0+cu999", "99.9"
    monkeypatch.setitem(sys.modules, "fused_dropout._build_info", other)
    with pytest.raises(ImportError) as error:
        _load.load_extension()
    message = str(error.value)
    assert "2.99.0+cu999" in message and torch.__version__ in message
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in message


def test_a_source_tree_without_a_build_says_what_to_run(tmp_path):
    # A copy of the package's Python files alone, as in a fresh clone.
    tree = tmp_path / "fused_dropout"
    tree.mkdir()
    for source in (ROOT / "fused_dropout").glob("*.py"):
        if source.name != "_build_info.py":
            shutil.copy(source, tree)
    # An editable install's import hook would find this checkout's build by name; block it, as
    # no hook exists for a plain clone.
    script = (
        "import sys\n"
        "class NoBuild:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('fused_dropout._C', 'fused_dropout._build_info'):\n"
        '            raise ModuleNotFoundError("No module named " + name)\n'
        "sys.meta_path.insert(0, NoBuild())\n"
        "import fused_dropout\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert "a source tree with no compiled extension" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr


def test_a_source_tree_shadowing_an_installed_build_is_named(tmp_path):
    # The README's non-editable install run from the repository root: the source tree (with a
    # build info file for this very torch, as older builds left there) shadows the installed
    # package. The message must name the shadowing, not blame the build.
    tree = tmp_path / "checkout" / "fused_dropout"
    tree.mkdir(parents=True)
    for source in (ROOT / "fused_dropout").glob("*.py"):
        if source.name != "_build_info.py":
            shutil.copy(source, tree)
    (tree / "_build_info.py").write_text(
        f"TORCH_VERSION = {torch.__version__!r}\nTORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
    )
    installed = tmp_path / "site" / "fused_dropout"
    installed.mkdir(parents=True)
    (installed / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    script = (
        "import sys\n"
        # Right after the current directory, ahead of any real install in site-packages.
        f"sys.path.insert(1, {str(installed.parent)!r})\n"
        "class NoBuild:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fused_dropout._C':\n"
        '            raise ModuleNotFoundError("No module named " + name)\n'
        "sys.meta_path.insert(0, NoBuild())\n"
        "import fused_dropout\n"
    )
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tree.parent, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert f"which shadows the installed package in {installed}" in result.stderr
    assert "Run from another directory" in result.stderr
    assert "built for another torch" not in result.stderr


def test_info_reports_the_build():
    # The package these tests imported, wherever it is installed.
    env = dict(os.environ, PYTHONPATH=str(Path(fused_dropout.__file__).resolve().parents[1]))
    result = subprocess.run(
        [sys.executable, "-m", "fused_dropout", "--info"], cwd=ROOT / "tests", capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert f"torch {torch.__version__}" in result.stdout
    assert f"CUDA kernels: {'yes' if fused_dropout.has_cuda_kernels() else 'no'}" in result.stdout
    assert "CPU inner loops: avx512" in result.stdout or "CPU inner loops: portable" in result.stdout
