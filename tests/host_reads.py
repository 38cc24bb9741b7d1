"""A guard that fails a test when code reads a device value on the host: the Tensor methods that
read values (item, tolist, bool(), int(), ...) and the aten ops that synchronise on CUDA (a scalar
read, outputs sized by values). Code that passes under it can be captured in a CUDA graph as far as
host reads go. The split-KV decode kernels (``xtk.kernels.attention_decode_op``) pause the guard
while they launch: the Triton interpreter reads tensors on the host to run a kernel, which on a GPU
runs on the device. Used by tests/test_attention_decode.py, tests/test_generate_static.py and
tests/test_attention_varlen_kernel.py (the attention kernels' launches paused the same way)."""
import contextlib

import torch
import triton
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from xtk.kernels import attention_decode_op as attention_decode

_T = torch.Tensor
_HOST_READS = {_T.item, _T.tolist, _T.numpy, _T.__bool__, _T.__int__, _T.__index__, _T.__float__, _T.__array__}
_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default}


class _FunctionGuard(TorchFunctionMode):
    """Fails on the Tensor methods that read values to the host (item, tolist, bool(), int(), ...)."""

    def __init__(self, state):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS and not self.state["paused"]:
            raise AssertionError(f"host read of a tensor's values: {func.__name__}")
        return func(*args, **(kwargs or {}))


class _DispatchGuard(TorchDispatchMode):
    """Fails on the aten ops that synchronise on CUDA: a scalar read, an output sized by values
    (nonzero, masked_select, indexing by a bool mask)."""

    def __init__(self, state):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if (func in _SYNC_OPS or bool_index) and not self.state["paused"]:
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


class _Unguarded:
    """A Triton kernel whose launches pause the guards: the interpreter reads the tensors on the
    host to run the kernel, which on a GPU runs on the device."""

    def __init__(self, kernel, state):
        self.kernel, self.state = kernel, state

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.state["paused"] = True
            try:
                return launch(*args, **kwargs)
            finally:
                self.state["paused"] = False
        return run


@contextlib.contextmanager
def no_host_reads(monkeypatch, *kernel_modules):
    """Within: any read of a tensor's values by the host (outside the kernels of the decode module and
    of ``kernel_modules``, the modules whose launches are paused too) raises."""
    state = {"paused": False}
    for module in (attention_decode,) + kernel_modules:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, triton.runtime.jit.JITFunction):
                monkeypatch.setattr(module, name, _Unguarded(obj, state))
    with _FunctionGuard(state), _DispatchGuard(state):
        yield
