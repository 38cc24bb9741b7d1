"""Loader of the C++/CUDA extension ``xtk._C`` and the Python side of its custom ops.

Importing ``xtk._C`` registers ``torch.ops.xtk.{rms_norm,glu,activation}_{fwd,bwd}`` (schemas and
CPU/CUDA kernels, csrc/torch_ops*.cpp) and the CPU attention ops ``attention_distance_{fwd,bwd}``
(csrc/attention_cpu.cpp; called by the chunked attention backend, which has its own autograd). This module adds their fake implementations (shapes only,
for torch.compile / meta tensors) and their autograd formulas, and offers the functions the ext
backends call. ``load()`` raises ImportError with the reason when the extension is missing.

Saved for the backward: rms_norm keeps the normalized input (x, or s = x + residual) and the
per-row fp32 ``norm = max(||s||, eps)`` (negated where the clamp was active; the kernels divide
by it, in eager's order, rather than multiply by an inverse); glu/activation
keep only their input and recompute the activation.
"""
from __future__ import annotations

import torch

_state: dict = {}


def load():
    """The extension module; raises ImportError saying why it is not usable."""
    if "module" in _state:
        return _state["module"]
    if "error" in _state:
        raise ImportError(_state["error"])
    try:
        from . import _C  # noqa: F401  (registers the ops)
    except Exception as e:  # ImportError when not built, OSError on an ABI mismatch ...
        import os
        hint = ("XTK_NO_EXT=1 skipped it at install time" if os.environ.get("XTK_NO_EXT") == "1" else
                "install torch, then rebuild with `pip install --no-build-isolation -e .` (its output says whether "
                "xtk._C was built; `pip install -v` shows why a build failed)")
        _state["error"] = f"the C++/CUDA extension xtk._C is not built or failed to load ({type(e).__name__}: {e}); {hint}"
        raise ImportError(_state["error"]) from e
    _register_python_side()
    for op in _OPS:
        for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            _KERNELS[(op, dev)] = torch._C._dispatch_has_kernel_for_dispatch_key(f"xtk::{op}", key)
    _state["module"] = _C
    return _C


_OPS = ("rms_norm_fwd", "rms_norm_bwd", "glu_fwd", "glu_bwd", "activation_fwd", "activation_bwd",
        "attention_distance_fwd", "attention_distance_bwd")
_KERNELS: dict = {}  # (op, device type) -> bool, filled by load() (plain lookups stay traceable by dynamo)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``xtk::<op>`` has a kernel for this device type (``cpu``, ``cuda``)."""
    return _KERNELS.get((op, device_type), False)


# ---------------------------------------------------------------------------------------------
# fake implementations and autograd


def _rms_norm_fwd_fake(x, weight, residual, eps):
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty((0,))
    norm = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), s, norm


def _rms_norm_bwd_fake(dy, ds, s, weight, norm, weight_grad):
    dx = torch.empty_like(s, memory_format=torch.contiguous_format)
    if weight is not None and weight_grad:
        return dx, torch.empty_like(weight, memory_format=torch.contiguous_format)
    return dx, s.new_empty((0,), dtype=torch.float32)


def _glu_fwd_fake(x, activation):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _glu_bwd_fake(dy, x, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _activation_fwd_fake(x, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _activation_bwd_fake(dy, x, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, eps = inputs
    y, s, norm = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(s if ctx.has_residual else x, weight, norm)


def _rms_norm_backward(ctx, dy, ds, drinv):
    s, weight, norm = ctx.saved_tensors
    need_x, need_w, _, _ = ctx.needs_input_grad
    need_res = ctx.has_residual and ctx.needs_input_grad[2]
    extra = ds if (ctx.has_residual and ds is not None) else None
    dx, dw = torch.ops.xtk.rms_norm_bwd(dy, extra, s, weight, norm, bool(weight is not None and need_w))
    return (dx if need_x else None, dw if (weight is not None and need_w) else None,
            dx if need_res else None, None)


def _glu_setup(ctx, inputs, output):
    x, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x)


def _glu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.xtk.glu_bwd(dy, x, ctx.activation), None


def _activation_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.xtk.activation_bwd(dy, x, ctx.activation), None


def _no_double_backward(op):
    def backward(ctx, *grads):
        raise RuntimeError(f"xtk::{op}: double backward (create_graph=True) is not supported by the ext backend; "
                           "use backend='eager' (or XTK_BACKEND=eager) for higher-order gradients")
    return backward


def _nothing_to_save(ctx, inputs, output):
    pass


def _register_python_side():
    lib = torch.library
    lib.register_fake("xtk::rms_norm_fwd")(_rms_norm_fwd_fake)
    lib.register_fake("xtk::rms_norm_bwd")(_rms_norm_bwd_fake)
    lib.register_fake("xtk::glu_fwd")(_glu_fwd_fake)
    lib.register_fake("xtk::glu_bwd")(_glu_bwd_fake)
    lib.register_fake("xtk::activation_fwd")(_activation_fwd_fake)
    lib.register_fake("xtk::activation_bwd")(_activation_bwd_fake)
    lib.register_autograd("xtk::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup)
    lib.register_autograd("xtk::glu_fwd", _glu_backward, setup_context=_glu_setup)
    lib.register_autograd("xtk::activation_fwd", _activation_backward, setup_context=_glu_setup)
    for op in ("rms_norm_bwd", "glu_bwd", "activation_bwd"):  # an error rather than silently missing grads
        lib.register_autograd(f"xtk::{op}", _no_double_backward(op), setup_context=_nothing_to_save)


# ---------------------------------------------------------------------------------------------
# the functions the ext backends run


def rms_norm(x, weight, eps, residual):
    y, s, _ = torch.ops.xtk.rms_norm_fwd(x, weight, residual, eps)
    return (y, s) if residual is not None else y


def glu(x, activation):
    return torch.ops.xtk.glu_fwd(x, activation)


def activation(x, activation):
    return torch.ops.xtk.activation_fwd(x, activation)
