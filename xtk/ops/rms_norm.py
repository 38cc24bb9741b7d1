"""``xtk.rms_norm``: the one dispatch point for RMSNorm / ScaleNorm (optionally fused with a residual add)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import backends
from ..reference import rms_norm as reference
from . import _check


@dataclass(frozen=True, eq=False)
class RMSNormInputs:
    x: torch.Tensor
    weight: Optional[torch.Tensor]
    eps: float
    residual: Optional[torch.Tensor]


def _validate(x, weight, eps, residual) -> RMSNormInputs:
    _check.tensor("x", x)
    _check.floating("x", x)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension, got a 0-d tensor")
    if weight is not None:
        _check.tensor("weight", weight)
        _check.same("weight", weight, "x", x) if weight.dtype == x.dtype else _check.floating("weight", weight)
        if weight.device != x.device:
            raise ValueError(f"weight: expected device {x.device} (x's), got {weight.device}")
        if tuple(weight.shape) not in ((x.shape[-1],), (1,), ()):
            raise ValueError(f"weight: expected shape ({x.shape[-1]},) (RMSNorm) or (1,)/() (ScaleNorm), got {tuple(weight.shape)}")
    if residual is not None:
        _check.tensor("residual", residual)
        _check.same("residual", residual, "x", x)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {tuple(x.shape)} (x's), got {tuple(residual.shape)}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: expected a float >= 0, got {eps!r}")
    return RMSNormInputs(x, weight, float(eps), residual)


EAGER = backends.Backend("eager", "rms_norm", lambda inputs, forced: [],
                         lambda i: reference.rms_norm(i.x, i.weight, i.eps, i.residual))


def rms_norm(x, weight=None, eps=1e-12, residual=None, backend="auto"):
    """``y = x / max(||x||_2, eps) * dim ** 0.5 * weight`` over the last dim (x-transformers' RMSNorm).

    x ``(..., dim)``; weight ``(dim,)`` for RMSNorm, ``(1,)`` or 0-d for ScaleNorm, or None.
    With ``residual`` (x's shape) returns ``(rms_norm(x + residual), x + residual)``."""
    inputs = _validate(x, weight, eps, residual)
    return backends.pick("rms_norm", inputs, backend).run(inputs)
