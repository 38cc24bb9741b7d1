"""The ``ext`` backends: the C++/CUDA extension ``xtk._C`` for rms_norm, glu and activation.

Importing this module fails (ImportError with the reason) when the extension is not built, so
``backends.load`` reports that text and auto dispatch falls back to eager. Otherwise each
backend's ``reasons()`` lists what it cannot run: devices the extension was not built for, and
dtypes other than float32/float16/bfloat16.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..backends import Backend

_ext.load()  # raises ImportError saying why the extension is not usable

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _common(op: str, tensors: dict) -> list:
    why = []
    x = next(iter(tensors.values()))
    if not _ext.has_kernel(op, x.device.type):
        why.append(f"xtk._C has no {x.device.type} kernel (built for: "
                   f"{', '.join(d for d in ('cpu', 'cuda') if _ext.has_kernel(op, d))})")
    for name, t in tensors.items():
        if t is not None and t.dtype not in DTYPES and name != "weight":
            why.append(f"{name}: dtype {t.dtype} not supported (float32, float16, bfloat16)")
    return why


def _rms_norm_reasons(i, forced):
    return _common("rms_norm_fwd", {"x": i.x, "residual": i.residual})  # any float weight: used in fp32


def _glu_reasons(i, forced):
    return _common("glu_fwd", {"x": i.x})


def _activation_reasons(i, forced):
    return _common("activation_fwd", {"x": i.x})


RMS_NORM = Backend("ext", "rms_norm", _rms_norm_reasons, lambda i: _ext.rms_norm(i.x, i.weight, i.eps, i.residual))
GLU = Backend("ext", "glu", _glu_reasons, lambda i: _ext.glu(i.x, i.activation))
ACTIVATION = Backend("ext", "activation", _activation_reasons, lambda i: _ext.activation(i.x, i.activation))
