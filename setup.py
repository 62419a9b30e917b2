"""Optional ahead-of-time build of the MoE CPU kernel; all other metadata is in pyproject.toml.

``pip install -e .`` compiles nothing: the kernel is compiled on first use (about 30 s, then cached).
To compile it at install time instead (torch must already be installed, hence no build isolation)::

    DPO_LLAMA_BUILD_EXT=1 pip install --no-build-isolation -e .

The module lands next to the package as ``dpo_llama/dpo_llama_moe_kernel_<hash>*.so``, the hash taken over the
kernel sources, so ``dpo_llama.models.cpu_moe.load_extension`` ignores it once the sources change.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup


def kernel_extension() -> dict:
    """``setup()`` arguments that build the kernel, or none unless ``DPO_LLAMA_BUILD_EXT=1``."""
    if os.environ.get("DPO_LLAMA_BUILD_EXT") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # Load cpu_moe.py by path: importing the package would need its runtime dependencies, not installed yet.
    root = Path(__file__).resolve().parent
    module_spec = importlib.util.spec_from_file_location("_dpo_llama_cpu_moe", root / "dpo_llama/models/cpu_moe.py")
    cpu_moe = sys.modules[module_spec.name] = importlib.util.module_from_spec(module_spec)  # dataclasses look it up
    module_spec.loader.exec_module(cpu_moe)
    spec = cpu_moe.build_spec()
    extension = CppExtension(
        name=f"dpo_llama.{spec['name']}",
        sources=[str(Path(source).relative_to(root)) for source in spec["sources"]],
        include_dirs=spec["include_dirs"],
        extra_compile_args=spec["cflags"],
        extra_link_args=spec["ldflags"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**kernel_extension())
