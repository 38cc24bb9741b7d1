"""Compile checks of the extension's CUDA side, no GPU needed (TOOLCHAIN.md):

- every ``csrc/**/*.cu`` compiles with nvcc (``-c -std=c++17``) for sm_80 and sm_90 to object
  files, and ptxas reports no register spills for any kernel;
- no ``.cu`` (nor the headers they include) includes torch / ATen / c10: the kernels take raw
  pointers and a stream, the torch glue lives in .cpp files;
- the shared per-element math header compiles with plain g++ too;
- the CUDA torch glue (csrc/torch_ops_cuda.cpp, with torch_ops.cpp's XTK_WITH_CUDA branches)
  passes a g++ syntax check against torch's headers; the one header a CPU build of torch lacks
  (c10/cuda/impl/cuda_cmake_macros.h) is stubbed in a temporary folder;
- every C++ source and the glue pass the same syntax check against the GPU image's torch
  (GPU_IMAGE_TORCH: its headers, unpacked once from the wheel into ~/.cache/xtk), which builds
  xtk._C there.

nvcc missing fails these tests (CI machines have it), unless XTK_ALLOW_NO_NVCC=1 says this
machine has no CUDA toolkit on purpose. The compiles run concurrently (2 cores in CI).
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest

from conftest import XTK_CACHE

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
ARCHS = ("80", "90")
FORBIDDEN = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2|pybind11)/', re.M)

sys.path.insert(0, str(ROOT))
from csrc.build import find_nvcc, link_flags  # noqa: E402


def _nvcc():
    nvcc = find_nvcc()
    if nvcc is None:
        if os.environ.get("XTK_ALLOW_NO_NVCC") == "1":
            pytest.skip("nvcc not found and XTK_ALLOW_NO_NVCC=1")
        pytest.fail("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): CI must compile every .cu; "
                    "set XTK_ALLOW_NO_NVCC=1 only on a machine without a CUDA toolkit on purpose")
    return nvcc


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Start every compile at once; returns {name: (returncode, output)}."""
    nvcc = _nvcc()
    out = tmp_path_factory.mktemp("xtk_cu")
    procs = {}
    for cu in CU_FILES:
        cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-I{CSRC / 'include'}", "-Xptxas", "-v", str(cu),
               "-o", str(out / (cu.stem + ".o"))]
        for arch in ARCHS:
            cmd[1:1] = ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        procs[str(cu.relative_to(ROOT))] = _start(cmd, out / (cu.stem + ".log"))
    glue = _glue_check_cmd(out)
    if glue:
        procs["glue"] = _start(glue, out / "glue.log")
    results = {name: (p.wait(timeout=600), Path(p.args_log).read_text()) for name, p in procs.items()}
    for cu in CU_FILES:
        results[str(cu.relative_to(ROOT))] += (out / (cu.stem + ".o"),)
    return results


def _start(cmd, log_path):
    """Popen writing to a file (a pipe left unread would block a chatty ptxas -v)."""
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    p.args_log = log_path
    return p


def _cuda_include():
    """The CUDA toolkit's include folder (nvcc may be a wrapper script elsewhere)."""
    nvcc = Path(_nvcc())
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), nvcc.resolve().parent.parent, "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home) / "include"
    r = subprocess.run([str(nvcc), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                       text=True)
    m = re.search(r"INCLUDES=\"?-I\"?([^\"\s]+)", r.stderr + r.stdout)
    return Path(m.group(1)) if m else nvcc.parent.parent / "include"


def _glue_check_cmd(out, torch_includes=None):
    """g++ -fsyntax-only of the CUDA glue (torch_ops_cuda.cpp + torch_ops.cpp's XTK_WITH_CUDA parts)
    against ``torch_includes`` (default: the installed torch's headers), or None without torch."""
    if torch_includes is None:
        try:
            from torch.utils.cpp_extension import include_paths
        except Exception:
            return None
        torch_includes = include_paths()
    stub = out / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    tu = out / "glue_tu.cpp"
    tu.write_text(f'#include "{CSRC / "torch_ops.cpp"}"\n#include "{CSRC / "torch_ops_cuda.cpp"}"\n')
    cuda_inc = _cuda_include()
    return [_cxx(), "-std=c++20", "-fsyntax-only", "-DXTK_WITH_CUDA=1", f"-I{out / 'stub'}",
            *[f"-I{p}" for p in torch_includes], f"-I{sysconfig.get_paths()['include']}",
            f"-I{CSRC / 'include'}", f"-I{CSRC}", f"-I{cuda_inc}", str(tu)]


def _cxx():
    return shutil.which(os.environ.get("CXX", "g++")) or "g++"


# ----------------------------------------------------------------------------- the GPU image's torch
GPU_IMAGE_TORCH = "2.11.0"  # the GPU machines' torch: xtk._C is built there against its headers


def _gpu_image_torch_includes() -> list:
    """Include folders of torch==GPU_IMAGE_TORCH's headers, unpacked once from its wheel into
    ``~/.cache/xtk`` (pip download; only ``torch/include`` is kept)."""
    base = Path(XTK_CACHE) / f"torch-{GPU_IMAGE_TORCH}-include"
    inc = base / "torch" / "include"
    if not (inc / "ATen" / "ATen.h").exists():
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                f"torch=={GPU_IMAGE_TORCH}", "-d", tmp], capture_output=True, text=True, timeout=1800)
            assert r.returncode == 0, f"pip download torch=={GPU_IMAGE_TORCH}: {r.stderr[-3000:]}"
            wheel = next(Path(tmp).glob("torch-*.whl"))
            staging = Path(tempfile.mkdtemp(dir=base.parent if base.parent.exists() else None))
            with zipfile.ZipFile(wheel) as z:
                z.extractall(staging, [m for m in z.namelist() if m.startswith("torch/include/")])
            base.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(base, ignore_errors=True)
            os.replace(staging, base)
    return [inc, inc / "torch" / "csrc" / "api" / "include"]


def test_sources_compile_against_the_gpu_image_torch(tmp_path):
    """Every C++ source (the CPU ones as setup.py builds them, and the CUDA glue) passes a g++ syntax
    check against the GPU image's torch headers, not only CI's newer torch: on the H200 (2026-11-28)
    torch 2.11's headers made ``Tensor::sum({0, 2})`` ambiguous, xtk._C failed to build there and pip
    still reported success (the build never fails an install)."""
    sys.path.insert(0, str(ROOT))
    from csrc.build import CPU_SOURCES, CXX_FLAGS
    includes = _gpu_image_torch_includes()
    procs = {}
    for src in CPU_SOURCES:
        cmd = [_cxx(), "-std=c++17", "-fsyntax-only", "-fopenmp", *CXX_FLAGS, *[f"-I{p}" for p in includes],
               f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC / 'include'}", f"-I{CSRC}", str(ROOT / src)]
        procs[src] = _start(cmd, tmp_path / (Path(src).stem + ".log"))
    if _nvcc_or_none():
        procs["CUDA glue"] = _start(_glue_check_cmd(tmp_path, includes), tmp_path / "glue.log")
    failed = {name: Path(p.args_log).read_text()[-3000:] for name, p in procs.items() if p.wait(timeout=600) != 0}
    assert not failed, f"against torch {GPU_IMAGE_TORCH}'s headers: {failed}"


def _nvcc_or_none():
    return find_nvcc() if os.environ.get("XTK_ALLOW_NO_NVCC") == "1" else _nvcc()


def test_there_are_cuda_sources():
    assert {p.name for p in CU_FILES} >= {"rms_norm.cu", "glu.cu"}, CU_FILES


@pytest.mark.parametrize("cu", [str(p.relative_to(ROOT)) for p in CU_FILES])
def test_cu_compiles_for_sm80_and_sm90_without_spills(compiled, cu):
    rc, log, obj = compiled[cu]
    assert rc == 0, f"nvcc failed on {cu}:\n{log[-4000:]}"
    assert obj.exists() and obj.stat().st_size > 0
    for arch in ARCHS:  # ptxas -v prints one "Compiling entry function ... for 'sm_XX'" per kernel
        assert f"sm_{arch}" in log, f"{cu}: no ptxas output for sm_{arch}"
    spills = [line for line in log.splitlines() if re.search(r"[1-9]\d* bytes spill (stores|loads)", line)]
    assert not spills, f"{cu}: register spills:\n" + "\n".join(spills)


def test_cuda_glue_syntax(compiled):
    if "glue" not in compiled:
        pytest.skip("torch.utils.cpp_extension not importable")
    rc, log = compiled["glue"]
    assert rc == 0, f"torch_ops_cuda.cpp / torch_ops.cpp (XTK_WITH_CUDA) do not compile:\n{log[-4000:]}"


def _local_includes(path: Path, seen: set) -> set:
    """path and every project header it includes, transitively."""
    if path in seen:
        return seen
    seen.add(path)
    for name in re.findall(r'^\s*#\s*include\s*"([^"]+)"', path.read_text(), re.M):
        for base in (path.parent, CSRC / "include", CSRC):
            if (base / name).exists():
                _local_includes((base / name).resolve(), seen)
                break
    return seen


def test_cu_files_include_no_torch_headers():
    files = set()
    for cu in CU_FILES:
        files |= _local_includes(cu.resolve(), set())
    bad = {str(f.relative_to(ROOT)): FORBIDDEN.findall(f.read_text()) for f in files}
    bad = {f: inc for f, inc in bad.items() if inc}
    assert not bad, f"CUDA sources include torch/ATen/c10/pybind11 headers (not compilable here): {bad}"
    assert any(f.name == "xtk_math.h" for f in files), "the kernels should share xtk_math.h with the CPU code"


def test_shared_math_header_compiles_with_gxx(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.fail("no C++ compiler (g++) on PATH")
    src = tmp_path / "t.cpp"
    src.write_text('#include "xtk_math.h"\n'
                   "int main() { return xtk::act_fwd<xtk::kSilu>(0.0f) == 0.0f ? 0 : 1; }\n")
    r = subprocess.run([cxx, "-std=c++17", f"-I{CSRC / 'include'}", str(src), "-o", str(tmp_path / "t")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert subprocess.run([str(tmp_path / "t")]).returncode == 0


def _needed(so) -> str:
    """``readelf -d`` of a shared object (its NEEDED entries among the rest)."""
    readelf = shutil.which("readelf")
    assert readelf, "readelf (binutils) not found"
    return subprocess.run([readelf, "-d", str(so)], capture_output=True, text=True, check=True).stdout


def test_built_extension_links_the_shared_cxx_runtime():
    """xtk._C must use the process's libstdc++.so (torch's), not a static copy: with a second C++
    runtime in the process, TORCH_CHECK messages that stream numbers segfaulted (H100, 2026-11-27)."""
    import importlib.util
    spec = importlib.util.find_spec("xtk._C")
    assert spec is not None and spec.origin, "xtk._C is not built (pip install --no-build-isolation -e .)"
    needed = _needed(spec.origin)
    assert re.search(r"NEEDED.*\[libstdc\+\+\.so", needed), needed


def test_link_flags_keep_the_shared_cxx_runtime_under_a_static_only_driver(tmp_path):
    """The GPU image's g++ wrapper points -B at a gcc tree holding only libstdc++.a: -lstdc++ then
    links the runtime statically (no NEEDED libstdc++; TORCH_CHECK with a number segfaulted on the
    H100). Reproduced here with such a -B directory; csrc/build.py's link_flags() must still give
    NEEDED libstdc++.so.6."""
    import torch  # noqa: F401  (maps the libstdc++ that link_flags() finds, as in setup.py)
    gxx = shutil.which("g++")
    assert gxx and shutil.which("readelf"), "g++ and readelf (binutils) are needed to build xtk._C"
    static = subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    assert os.path.isabs(static), f"no libstdc++.a next to {gxx} (libstdc++-dev)"
    gcc_tree = tmp_path / "gcc"
    gcc_tree.mkdir()
    (gcc_tree / "libstdc++.a").symlink_to(static)
    src = tmp_path / "t.cpp"
    src.write_text("#include <sstream>\n#include <string>\n"
                   "std::string f(int x) { std::ostringstream s; s << x; return s.str(); }\n")

    def link(flags, name):
        so = tmp_path / name
        subprocess.run([gxx, f"-B{gcc_tree}/", "-shared", "-fPIC", str(src), "-o", str(so), *flags], check=True)
        return _needed(so)
    assert "libstdc++" not in link(["-lstdc++"], "plain.so"), "the static-only driver was not reproduced"
    assert re.search(r"NEEDED.*\[libstdc\+\+\.so\.6\]", link(link_flags(), "fixed.so"))
