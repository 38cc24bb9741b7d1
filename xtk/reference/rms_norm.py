"""Eager reference norms (SPEC §3): RMSNorm / ScaleNorm, optionally fused with a residual add."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, weight=None, eps=1e-12, residual=None):
    """``y = x / max(||x||_2, eps) * dim ** 0.5 * weight`` over the last dim.

    weight: ``(dim,)`` (RMSNorm), ``(1,)`` or 0-d (ScaleNorm), or None. With ``residual``
    (same shape as x), normalizes ``s = x + residual`` and returns ``(y, s)``."""
    if residual is not None:
        s = x + residual
        return rms_norm(s, weight, eps), s
    work = torch.promote_types(x.dtype, torch.float32)
    y = F.normalize(x.to(work), dim=-1, eps=eps) * (x.shape[-1] ** 0.5)
    if weight is not None:
        y = y * weight.to(work)
    return y.to(x.dtype)
