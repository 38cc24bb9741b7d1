"""How setup.py builds the C++/CUDA extension ``xtk._C``.

``extension_build_kwargs()`` returns setup() keyword arguments (``ext_modules`` and
``cmdclass``), or {} when the extension is skipped (``XTK_NO_EXT=1``) or cannot be built here
(no torch, no C++ compiler). The CPU sources always build; the CUDA sources
(``csrc/kernels/*.cu`` and the glue ``csrc/torch_ops_cuda.cpp``) build when torch has CUDA and
nvcc is found, for ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs' archs, else ``8.0;9.0``). ``XTK_NO_CUDA_EXT=1`` builds
the CPU part only. A failing build prints a warning and the install goes on: xtk then runs its
eager backends and ``python -m xtk info`` says why the extension is missing.
"""
import glob
import os
import shutil
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CPU_SOURCES = ["csrc/torch_ops.cpp", "csrc/cpu/rms_norm.cpp", "csrc/cpu/glu.cpp"]
CUDA_SOURCES = ["csrc/torch_ops_cuda.cpp"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(HERE, "kernels", "*.cu")))
INCLUDE_DIRS = [os.path.join(HERE, "include")]
CXX_FLAGS = ["-O3", "-g0", "-fno-trapping-math"]  # lets the selects in xtk_math.h vectorize; same results


def _cpu_has(*flags: str) -> bool:
    """Whether the building machine's CPU has these /proc/cpuinfo flags (the build is for this machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            have = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in have for flag in flags)


if _cpu_has("avx2", "fma"):
    CXX_FLAGS += ["-mavx2", "-mfma"]  # 8-wide activation loops: GLU 1.3-1.7x faster than SSE2 on CPU
NVCC_FLAGS = ["-O3", "-lineinfo"]  # no fast math: IEEE division/exp/erf, as eager
# Link the C++ runtime the process already has (torch's): a compiler driver that links libstdc++
# statically (the GPU image's /opt/gcc/bin/g++ wrapper did: the built .so had no libstdc++ NEEDED
# entry) puts a second libstdc++ in the process, and TORCH_CHECK messages that stream a number or a
# shape then segfaulted (seen on the H100 run of 2026-11-27). An explicit -lstdc++ before the
# driver's own resolves the runtime from libstdc++.so.
LINK_FLAGS = ["-lstdc++"]


def _warn(msg: str) -> None:
    warnings.warn(f"xtk: {msg}", stacklevel=2)
    print(f"WARNING xtk: {msg}", file=sys.stderr)


def find_nvcc():
    """Path of nvcc (CUDA_HOME / CUDA_PATH, PATH, /usr/local/cuda), or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


def _with_cuda(torch) -> bool:
    if os.environ.get("XTK_NO_CUDA_EXT", "0") == "1":
        return False
    if torch.version.cuda is None:
        return False
    if find_nvcc() is None:
        _warn("torch has CUDA but nvcc was not found: building the CPU part of xtk._C only")
        return False
    return True


def _default_arch_list(torch) -> str:
    """The visible GPUs' compute capabilities (a build on the GPU machine compiles for it alone), else
    sm_80 and sm_90 (a build on a machine without a GPU)."""
    try:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{major}.{minor}" for major, minor in caps)
    except Exception:  # noqa: BLE001 - a broken driver must not stop the build
        pass
    return "8.0;9.0"


def extension_build_kwargs() -> dict:
    if os.environ.get("XTK_NO_EXT", "0") == "1":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # no torch at build time: pure-Python install
        _warn(f"torch.utils.cpp_extension is not importable ({type(e).__name__}: {e}); skipping xtk._C")
        return {}

    os.environ.setdefault("MAX_JOBS", str(min(os.cpu_count() or 2, 8)))
    with_cuda = _with_cuda(torch)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list(torch))
        ext = CUDAExtension(
            "xtk._C", CPU_SOURCES + CUDA_SOURCES, include_dirs=INCLUDE_DIRS,
            define_macros=[("XTK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=LINK_FLAGS)
    else:
        ext = CppExtension("xtk._C", CPU_SOURCES, include_dirs=INCLUDE_DIRS,
                           extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS)

    class SafeBuildExtension(BuildExtension):
        """BuildExtension that warns instead of failing the install when the extension cannot build."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure must leave the install working
                if not getattr(self, "_xtk_failed", False):  # else already said (this is the copy step)
                    _warn(f"building the C++/CUDA extension xtk._C failed ({type(e).__name__}: {e}); "
                          "xtk will use its eager backends")

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:  # noqa: BLE001
                self._xtk_failed = True
                _warn(f"building {extension.name} failed ({type(e).__name__}: {e}); xtk will use its eager backends")

    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": SafeBuildExtension.with_options(use_ninja=True)}}
