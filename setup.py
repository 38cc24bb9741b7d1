"""xtk: install with ``pip install --no-build-isolation -e .`` after installing torch.

The top-level ``kernels/`` (Triton kernels) and ``bench/`` folders install as ``xtk.kernels`` and ``xtk.bench``. The C++/CUDA
extension in ``csrc/`` builds when a compiler is present (CUDA sources when torch has CUDA
and nvcc is found); ``XTK_NO_EXT=1`` skips it, and a failed build never fails the install.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from csrc.build import extension_build_kwargs  # noqa: E402

install_requires = ["torch>=2.4", "einops>=0.8", "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'", "tqdm"]
test_requires = ["pytest", "pytest-benchmark", "hypothesis", "x-transformers==2.31.10"]

setup(
    name="xtk",
    version="0.1.0",
    description="Fused GPU kernels for x-transformers features behind a torch module API",
    packages=["xtk", "xtk.ops", "xtk.reference", "xtk.modules", "xtk.models", "xtk.kernels", "xtk.bench"],
    package_dir={"xtk": "xtk", "xtk.kernels": "kernels", "xtk.bench": "bench"},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={"test": test_requires, "bench": ["matplotlib"]},
    entry_points={"console_scripts": ["xtk=xtk.__main__:main"]},
    **extension_build_kwargs(),
)
