"""Test-wide setup. The bf16 ``tl.dot`` fix for the Triton interpreter lives here, test-only
(TOOLCHAIN.md): the interpreter multiplies bf16 bit patterns as integers (triton#11584);
widening bf16 operands to fp32 first makes bf16 sweeps meaningful. It does nothing if the
private name it wraps has moved."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


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
