"""Norm modules of the model stack (SPEC §3), x-transformers' parameter names.

RMSNorm and ScaleNorm run through ``xtk.rms_norm`` (optionally fused with the residual add);
LayerNorm is x-transformers' bias-less one (``F.layer_norm`` without affine, times ``gamma``).
Each stores the plain gain (init 1). ``checkpoint_unit_offset`` marks the norms that
x-transformers 2.31 builds with ``unit_offset=True`` (it stores ``g - 1``): the loader adds 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """``x / max(||x||, eps) * dim ** 0.5 * g`` with a learned ``g`` of shape ``(dim,)``."""

    fusable = True

    def __init__(self, dim: int, checkpoint_unit_offset: bool = False):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))
        self.checkpoint_unit_offset = checkpoint_unit_offset

    def forward(self, x, residual=None):
        """With ``residual`` returns ``(norm(x + residual), x + residual)`` in one fused call."""
        return rms_norm(x, self.g, residual=residual)


class ScaleNorm(RMSNorm):
    """RMSNorm with one learned scalar ``g`` of shape ``(1,)``."""

    def __init__(self, dim: int, checkpoint_unit_offset: bool = False):
        nn.Module.__init__(self)
        self.g = nn.Parameter(torch.ones(1))
        self.checkpoint_unit_offset = checkpoint_unit_offset


class LayerNorm(nn.Module):
    """Bias-less LayerNorm: ``F.layer_norm(x) * gamma`` (eps 1e-5, as ``nn.LayerNorm``)."""

    fusable = False

    def __init__(self, dim: int, checkpoint_unit_offset: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.checkpoint_unit_offset = checkpoint_unit_offset

    def forward(self, x, residual=None):
        if residual is not None:
            s = x + residual
            return self.forward(s), s
        return F.layer_norm(x, x.shape[-1:], eps=1e-5) * self.gamma
