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
went from errors ~1e9 to ~1e-2, within the 2x rule). It does nothing if the private name it
wraps has moved."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _patch_interpreter_bf16_dot():
    try:
        import numpy as np
        from triton.runtime import interpreter
        builder = interpreter.InterpreterBuilder
        original = builder.create_dot
    except Exception:
        return
    if getattr(original, "_xtk_patched", False):
        return

    def widen(t):
        data = getattr(t, "data", None)
        dtype = getattr(t, "dtype", None)
        if data is None or dtype is None or "bf16" not in str(dtype):
            return t
        wide = (data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(wide, _fp32_type(t))

    def _fp32_type(t):
        import triton.language as tl
        return tl.float32

    def create_dot(self, a, b, c, *args, **kwargs):
        return original(self, widen(a), widen(b), c, *args, **kwargs)

    create_dot._xtk_patched = True
    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_bf16_dot()


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
