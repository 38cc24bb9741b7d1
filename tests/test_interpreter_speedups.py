"""tests/conftest.py's two test-only speedups of the Triton interpreter are in place where they
apply, and leave the interpreter as it was outside a launch (they make the kernel tests faster,
never different: the kernel sweeps judge that)."""
import os

import pytest
import torch
import triton
import triton.language as tl

import conftest

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _twice(x):
    return x * 2


@triton.jit
def _eight_times(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    for _ in range(3):  # the helper called again within one launch
        x = _twice(x)
    tl.store(Y + offs, x)


def test_frame_chunks_loaded_where_they_apply():
    """Where it applies, the helper built and loaded (a failed build or load would only be slow)."""
    applies = conftest.frame_chunks_do_not_apply() is None
    assert conftest.FRAME_CHUNKS.startswith("loaded " if applies else "skipped: "), conftest.FRAME_CHUNKS


@pytest.mark.skipif(not INTERPRET, reason="the compiled kernels run on a GPU: no interpreter to patch")
def test_helpers_patch_once_per_launch_and_the_launch_restores_the_language():
    from triton.runtime import interpreter
    assert getattr(interpreter._patch_lang, "_xtk_patched", False)
    x = torch.arange(8, dtype=torch.float32)
    for _ in range(2):  # a second launch patches anew
        y = torch.empty_like(x)
        _eight_times[(1,)](x, y, N=8)
        assert torch.equal(y, x * 8)
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.arange)  # restored after the launch
