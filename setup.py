"""xtk: install with ``pip install --no-build-isolation -e .`` after installing torch.

The top-level ``kernels/`` (Triton kernels) and ``bench/`` folders install as ``xtk.kernels`` and ``xtk.bench``. The C++/CUDA
extension in ``csrc/`` builds when a compiler is present (CUDA sources when torch has CUDA
and nvcc is found); ``XTK_NO_EXT=1`` skips it, and a failed build never fails the install.
"""
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from csrc.build import extension_build_kwargs, setuptools_missing  # noqa: E402

try:
    from setuptools import setup
except Exception as e:  # noqa: BLE001 - not installed, or broken on this Python
    sys.exit(setuptools_missing(e))


def _version() -> str:
    """xtk/__init__.py's __version__ (the one place it is written), read without importing xtk."""
    with open(os.path.join(HERE, "xtk", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


install_requires = ["torch>=2.4", "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'", "tqdm"]
test_requires = ["pytest", "pytest-xdist>=3.8", "pytest-benchmark", "hypothesis", "x-transformers==2.31.10", "transformers>=5.24,<5.25"]  # the module patches (hf_patch.TESTED) are tested on 5.24 only

setup(
    name="xtk",
    version=_version(),
    description="Fused GPU kernels for x-transformers features behind a torch module API",
    packages=["xtk", "xtk.ops", "xtk.reference", "xtk.modules", "xtk.models", "xtk.integrations", "xtk.kernels",
              "xtk.bench"],
    package_dir={"xtk": "xtk", "xtk.kernels": "kernels", "xtk.bench": "bench"},
    package_data={"xtk.kernels": ["tiles_sm*.json"]},  # the tile tables kernels/tiles.py reads
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={"test": test_requires, "bench": ["matplotlib"]},
    entry_points={"console_scripts": ["xtk=xtk.__main__:main"]},
    **extension_build_kwargs(),
)
