"""How setup.py builds the C++/CUDA extension ``xtk._C``.

``extension_build_kwargs()`` returns setup() keyword arguments (``ext_modules`` and
``cmdclass``), or {} when the extension is skipped (``XTK_NO_EXT=1``) or cannot be built here
(no torch, no C++ compiler). The CPU sources always build; the CUDA sources
(``csrc/kernels/*.cu`` and the glue ``csrc/torch_ops_cuda.cpp``) build when torch has CUDA and
nvcc is found, for ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs' archs, else ``8.0;9.0``). ``XTK_NO_CUDA_EXT=1`` builds
the CPU part only. A failing build prints a warning and the install goes on: xtk then runs its
eager backends and ``python -m xtk info`` says why the extension is missing. ``status_line()`` is the
one line a build ends with (built, or not and why), printed by ``csrc/build_backend.py``.
"""
import glob
import os
import shutil
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CPU_SOURCES = ["csrc/torch_ops.cpp", "csrc/attention_cpu.cpp", "csrc/cpu/isa.cpp", "csrc/cpu/rms_norm.cpp", "csrc/cpu/glu.cpp"]
CUDA_SOURCES = ["csrc/torch_ops_cuda.cpp"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(HERE, "kernels", "*.cu")))
INCLUDE_DIRS = [os.path.join(HERE, "include")]
# No -march/-mavx2 here: a build runs on other machines. The CPU loops are compiled at the baseline
# ISA and again with AVX2 + FMA and with AVX-512 (per-function target attributes, csrc/cpu/cpu_common.h),
# and the extension picks one at import (xtk._C.cpu_isa); AVX2 makes GLU 1.3-1.7x faster than SSE2.
CXX_FLAGS = ["-O3", "-g0", "-fno-trapping-math"]  # lets the selects in xtk_math.h vectorize; same results
NVCC_FLAGS = ["-O3", "-lineinfo"]  # no fast math: IEEE division/exp/erf, as eager
# Link the C++ runtime the process already has (torch's): a compiler driver whose own library
# directory holds only a static libstdc++.a (the GPU image's /opt/gcc/bin/g++ wrapper: -B into a gcc
# 13 tree without libstdc++.so) links it statically, even with an explicit -lstdc++; the process
# then holds two C++ runtimes and a TORCH_CHECK message with a number segfaulted (H100 runs of
# 2026-11-27). Linking the loaded libstdc++.so.6 by its path resolves every C++ runtime symbol
# there before the driver's implicit -lstdc++ comes, and records NEEDED libstdc++.so.6.


def loaded_library(name: str):
    """Path of the shared object ``/<name>...`` this process has mapped (torch loads libstdc++ and, in
    its CPU wheels, its own libgomp), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if f"/{name}" in line}
    except OSError:
        return None
    return min(paths) if paths else None


def loaded_cxx_runtime():
    """Path of the libstdc++ shared object this process has mapped (torch loads it), or None."""
    return loaded_library("libstdc++.so")


def loaded_openmp_runtime():
    """Path of the OpenMP runtime (libgomp) this process has mapped, or None."""
    return loaded_library("libgomp")


def openmp_compile_flags() -> list:
    """``-fopenmp`` when torch's OpenMP runtime is loaded: ``at::parallel_for`` is an inline template
    whose ``#pragma omp parallel`` is compiled in xtk's own files; without the flag every CPU loop of
    the extension ran on one thread (found 2026-11-28: RMSNorm, GLU and the attention ops took the
    same time at 1 and 2 threads). Linked against that same runtime by path (``link_flags``), never
    a second copy (the driver's -lgomp could be a static libgomp.a: two OpenMP runtimes)."""
    return ["-fopenmp"] if loaded_openmp_runtime() else []


def link_flags() -> list:
    """extra_link_args of xtk._C: the loaded libstdc++ by path (see above), else -lstdc++; the loaded
    OpenMP runtime by path when there is one (``openmp_compile_flags``)."""
    runtime, openmp = loaded_cxx_runtime(), loaded_openmp_runtime()
    return ([runtime] if runtime else ["-lstdc++"]) + ([openmp] if openmp else [])


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


def _without_cuda_because(torch):
    """Why the CUDA sources are not built here, or None when they are."""
    if os.environ.get("XTK_NO_CUDA_EXT", "0") == "1":
        return "XTK_NO_CUDA_EXT=1"
    if torch.version.cuda is None:
        return "torch is a CPU build"
    if find_nvcc() is None:
        _warn("torch has CUDA but nvcc was not found: building the CPU part of xtk._C only")
        return "torch has CUDA but nvcc was not found"
    return None


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


_status: dict = {}  # this process's outcome for xtk._C: built (bool) and detail; status_line() reads it


def _record(built: bool, detail: str) -> None:
    _status.update(built=built, detail=detail)


def status_line():
    """The one line an install ends with (csrc/build_backend.py prints it), or None when no setup() ran."""
    if not _status:
        return None
    if _status["built"]:
        return f"xtk: built the C++/CUDA extension xtk._C ({_status['detail']})"
    return (f"xtk: the C++/CUDA extension xtk._C was NOT built: {_status['detail']}. xtk will run its eager "
            "backends for rms_norm, glu and activation")


def setuptools_missing(error) -> str:
    """The message an install without a working setuptools stops with (setup.py, csrc/build_backend.py)."""
    what = ("setuptools is not installed in this Python" if isinstance(error, ImportError) else
            f"setuptools does not import in this Python ({type(error).__name__}: {error})")
    return (f"xtk: cannot build: {what}. With --no-build-isolation pip builds with what is installed, and a "
            "Python 3.12+ virtualenv has no setuptools: run `python -m pip install -U setuptools` first, then "
            "the install again")


def extension_build_kwargs() -> dict:
    if os.environ.get("XTK_NO_EXT", "0") == "1":
        _record(False, "XTK_NO_EXT=1 skipped it")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # no torch at build time: pure-Python install
        _warn(f"torch.utils.cpp_extension is not importable ({type(e).__name__}: {e}); skipping xtk._C")
        _record(False, f"torch is not importable in the build environment ({e}), as in pip's isolated build: "
                       "install torch first, then `pip install --no-build-isolation -e .`")
        return {}

    os.environ.setdefault("MAX_JOBS", str(min(os.cpu_count() or 2, 8)))
    no_cuda = _without_cuda_because(torch)
    if no_cuda is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list(torch))
        what = f"CPU and CUDA kernels, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        ext = CUDAExtension(
            "xtk._C", CPU_SOURCES + CUDA_SOURCES, include_dirs=INCLUDE_DIRS,
            define_macros=[("XTK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS + openmp_compile_flags(), "nvcc": NVCC_FLAGS},
            extra_link_args=link_flags())
    else:
        what = f"CPU kernels only: {no_cuda}"
        ext = CppExtension("xtk._C", CPU_SOURCES, include_dirs=INCLUDE_DIRS,
                           extra_compile_args={"cxx": CXX_FLAGS + openmp_compile_flags()},
                           extra_link_args=link_flags())
    _record(False, "no build_ext step ran")  # until build_ext says otherwise

    class SafeBuildExtension(BuildExtension):
        """BuildExtension that warns instead of failing the install when the extension cannot build."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure must leave the install working
                if not getattr(self, "_xtk_failed", False):  # else already said (this is the copy step)
                    _warn(f"building the C++/CUDA extension xtk._C failed ({type(e).__name__}: {e}); "
                          "xtk will use its eager backends")
                    _record(False, f"building it failed ({type(e).__name__}: {e}); `pip install -v` shows the log")
                return
            if not getattr(self, "_xtk_failed", False):
                _record(True, what)

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:  # noqa: BLE001
                self._xtk_failed = True
                _warn(f"building {extension.name} failed ({type(e).__name__}: {e}); xtk will use its eager backends")
                _record(False, f"compiling it failed ({type(e).__name__}: {e}); `pip install -v` shows the "
                               "compiler's output")

    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": SafeBuildExtension.with_options(use_ninja=True)}}
