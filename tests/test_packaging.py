"""Packaging: what ``pip install -e .`` installs, and the optional ahead-of-time build of the MoE kernel."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_install_takes_the_requirements_file():
    """``pip install -e .`` on a fresh machine must bring the runtime packages, torch pinned."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; pyproject allows 3.10
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dependencies" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert "torch==2.13.0" in requirements
    assert {"bitsandbytes", "sentencepiece", "tokenizers", "safetensors", "tensorboard"} <= {
        line.split(">")[0].split("=")[0] for line in requirements if line}


def copy_project(dest: Path) -> Path:
    """The files ``setup.py`` needs, without demo assets, caches or earlier builds."""
    for name in ("setup.py", "pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "dpo_llama", dest / "dpo_llama",
                    ignore=shutil.ignore_patterns("assets", "__pycache__", "*.so"))
    return dest


def load_in(project: Path, extensions_dir: Path) -> str:
    """Imports the kernel in a fresh process that sees ``project``'s package first; returns its output."""
    code = ("import dpo_llama.models.cpu_moe as m; print(m._is_built()); "
            "print(m.load_extension().__file__ if m._is_built() else '')")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir), "PYTHONPATH": str(project)}
    result = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_ahead_of_time_kernel_build_is_loaded_until_the_sources_change(tmp_path):
    project = copy_project(tmp_path)
    env = {**os.environ, "DPO_LLAMA_BUILD_EXT": "1"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-2000:]
    built = list((project / "dpo_llama").glob("dpo_llama_moe_kernel_*.so"))
    assert len(built) == 1
    empty_cache = tmp_path / "no-jit-builds"
    output = load_in(project, empty_cache).splitlines()
    assert output == ["True", str(built[0])]  # no "compiling" line
    header = project / "dpo_llama" / "csrc" / "moe_common.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert load_in(project, empty_cache).splitlines() == ["False", ""]
