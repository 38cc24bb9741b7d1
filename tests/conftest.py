"""Test-wide setup.

Triton interpreter: with no CUDA device, ``TRITON_INTERPRET=1`` is set here, at conftest import
time -- before any test module (or xtk.kernels) imports triton and defines its kernels -- so the
Triton kernels run on CPU tensors (``backend="triton"`` is then allowed on CPU when forced).
On a CUDA machine the variable is left alone and the same tests run the compiled kernels.
An explicit ``TRITON_INTERPRET`` in the environment always wins. The AOT build test
(tests/test_kernels_build.py) compiles in a subprocess with the variable removed.

The bf16 ``tl.dot`` fix for the interpreter lives here, test-only (TOOLCHAIN.md): the
interpreter multiplies bf16 bit patterns as integers (triton#11584); widening bf16 operands to
fp32 first makes bf16 sweeps meaningful (checked on triton 3.9: a bf16 flash forward+backward
went from errors ~1e9 to ~1e-2, within the 2x rule). A second test-only fix: the interpreter's
fp32 -> bf16 cast (``x.to(tl.bfloat16)``) truncates the low 16 bits (rounds toward zero; checked
on triton 3.9: 2060 of 4096 random values differ from torch's ``.bfloat16()``, all toward zero),
where the GPU's ``cvt.rn.bf16.f32`` rounds to nearest even. The bias of truncation adds up in the
sums a backward forms (a learned QK-norm scale's gradient came out 27% off, 3x the eager bf16
error), so the cast is made to round to nearest even, as on the GPU. Both patches do nothing if
the private names they wrap have moved.

Two more test-only changes make the interpreter tests faster, not different: each @triton.jit
helper patches triton.language once per launch instead of at every call (``_patch_lang_once``),
and CPython keeps its freed frame-stack chunks (``_keep_frame_chunks``, tests/frame_chunks.c)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _patch_interpreter(method: str, make):
    """Replace ``InterpreterBuilder.<method>`` by ``make(original, np, tl, interpreter)``, once; no-op
    if triton's private names have moved."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
        builder = interpreter.InterpreterBuilder
        original = getattr(builder, method)
    except Exception:
        return
    if getattr(original, "_xtk_patched", False):
        return
    patched = make(original, np, tl, interpreter)
    patched._xtk_patched = True
    setattr(builder, method, patched)


def _bf16_dot(original, np, tl, interpreter):
    """tl.dot: widen bf16 operands (uint16 holding an fp32's top half) to fp32 first."""
    def widen(t):
        data = getattr(t, "data", None)
        dtype = getattr(t, "dtype", None)
        if data is None or dtype is None or "bf16" not in str(dtype):
            return t
        return interpreter.TensorHandle((data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, c, *args, **kwargs):
        return original(self, widen(a), widen(b), c, *args, **kwargs)
    return create_dot


def _bf16_cast(original, np, tl, interpreter):
    """fp32 -> bf16 casts: round to nearest even (the interpreter truncates)."""
    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            rounded = np.where(np.isnan(src.data), np.uint32(0x7FC0), rounded).astype(np.uint16)
            return interpreter.TensorHandle(rounded, dst_type.scalar)
        return original(self, src, dst_type)
    return cast_impl


def _patch_lang_once():
    """The interpreter re-patches triton.language at every call of a @triton.jit helper (a scan of
    the modules' members each time, about a quarter of an interpreter test's time: 10.4-14.0 s ->
    7.6-9.8 s on two sweep cases, 2026-11-29). A helper's patches are never undone (its caller
    drops their scope); only a launch's own scope is restored, when the launch ends. So each
    helper patches once per launch: what its repeated calls would re-apply is still in place.
    No-op if the private names moved."""
    try:
        from triton.runtime import interpreter
        real, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__.__code__
    except Exception:
        return
    if getattr(real, "_xtk_patched", False):
        return
    patched_helpers = set()

    def patch_lang(fn):
        if sys._getframe(1).f_code is launch:  # a kernel launch: its scope is restored when it ends
            patched_helpers.clear()
            scope = real(fn)
            restore = scope.restore

            def restore_and_forget():
                patched_helpers.clear()
                restore()
            scope.restore = restore_and_forget
            return scope
        if fn in patched_helpers:  # a helper's call (its caller drops the scope: nothing to restore)
            return None
        patched_helpers.add(fn)
        return real(fn)
    patch_lang._xtk_patched = True
    interpreter._patch_lang = patch_lang


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter("create_dot", _bf16_dot)
    _patch_interpreter("cast_impl", _bf16_cast)
    _patch_lang_once()


# the tests' build cache (a triton venv, the GPU image's torch headers, the frame-chunk helper)
XTK_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "xtk")


def frame_chunks_do_not_apply():
    """Why ``_keep_frame_chunks`` does not apply here (None where it does): XTK_NO_FRAME_CHUNKS=1,
    not CPython 3.11-3.13 with a GIL, or no C compiler."""
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    if os.environ.get("XTK_NO_FRAME_CHUNKS") == "1":
        return "XTK_NO_FRAME_CHUNKS=1"
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 13) or not gil:
        return f"{sys.implementation.name} {sys.version_info[:2]}, GIL {gil}"
    if _c_compiler() is None:
        return "no C compiler (cc)"
    return None


def _c_compiler():
    import shutil
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _keep_frame_chunks():
    """Load tests/frame_chunks.c (built once with the C compiler into XTK_CACHE): CPython keeps
    its freed frame-stack chunks instead of unmapping each one (see the file; an interpreter test
    ran 13.3 s -> 7.4 s with it, 2026-11-29). Test speed only; a no-op where it does not apply
    (``frame_chunks_do_not_apply``) or cannot build or load. -> what happened, for
    tests/test_interpreter_speedups.py: 'loaded <path>' or 'skipped: <why>'."""
    import ctypes
    import hashlib
    import subprocess
    import sysconfig
    why_not = frame_chunks_do_not_apply()
    if why_not:
        return f"skipped: {why_not}"
    src = os.path.join(os.path.dirname(__file__), "frame_chunks.c")
    tag = hashlib.sha256(open(src, "rb").read() + sys.version.encode()).hexdigest()[:16]
    lib = os.path.join(XTK_CACHE, f"frame_chunks-{tag}.so")
    try:
        if not os.path.exists(lib):
            os.makedirs(XTK_CACHE, exist_ok=True)
            tmp = f"{lib}.{os.getpid()}.tmp"
            cmd = [_c_compiler(), "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", src, "-o", tmp]
            built = subprocess.run(cmd, capture_output=True, text=True)
            if built.returncode != 0:
                return f"skipped: {' '.join(cmd)} failed: {built.stderr[-500:]}"
            os.replace(tmp, lib)  # atomic: pytest-xdist workers may build it at once
        ctypes.PyDLL(lib).xtk_keep_frame_chunks()
    except OSError as e:  # an unwritable cache, a library that does not load
        return f"skipped: {type(e).__name__}: {e}"
    return f"loaded {lib}"


FRAME_CHUNKS = _keep_frame_chunks()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is several times faster on the shared 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The slowest file first: the AOT compile (tests/test_kernels_build.py, 15-20 of the CI's 2-core
# minutes, in subprocesses) then runs beside the other files, not after them. Under pytest-xdist
# with --dist loadfile --no-loadscope-reorder (the README's command) the workers take whole files
# in collection order (without that flag xdist sends the files with the most tests first: the AOT
# file, 10 tests, went out 11 minutes into a CI run and ran alone at its end); without xdist this
# only moves that file to the front.
FIRST = ("test_kernels_build.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in FIRST)
