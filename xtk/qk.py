"""Descriptors of what is done to q and k before the logits: QK-norm and rotary/xpos.

They hold data only; the math is in ``xtk.reference.attention`` (and in kernels)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["QKNorm", "Rotary", "rotary_inv_freq", "xpos_scale"]


@dataclass(frozen=True, eq=False)
class QKNorm:
    """Grouped l2 norm of q and k (SPEC §2.2).

    groups: ``d`` splits into ``groups`` equal parts, each l2-normalized (eps 1e-12).
    scale: the logit scale that replaces ``d ** -0.5`` (float, or a 0-d tensor that may require grad).
    q_dim_scale: ``(h, 1, d)`` per-dim scale of q, or None; k_dim_scale: ``(hk, 1, d)`` or None."""

    groups: int = 1
    scale: Union[float, torch.Tensor] = 10.0
    q_dim_scale: Optional[torch.Tensor] = None
    k_dim_scale: Optional[torch.Tensor] = None


def rotary_inv_freq(dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """``inv_freq[m] = base ** (-2m / dim)``, shape ``(dim // 2,)``."""
    return base ** -(torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def xpos_scale(dim: int, device=None) -> torch.Tensor:
    """xpos per-pair scale ``s_m = (2m + 0.4 dim) / (1.4 dim)``, shape ``(dim // 2,)``."""
    return (torch.arange(0, dim, 2, device=device, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim)


@dataclass(frozen=True, eq=False)
class Rotary:
    """Rotary embedding on the first ``dim`` features of q and k, interleaved pairs (SPEC §2.3).

    Pair ``(2m, 2m+1)`` rotates by ``pos * inv_freq[m] / interpolation_factor``. With
    ``xpos_scale`` (the ``(dim//2,)`` tensor ``s_m``), q is multiplied by ``s_m ** power`` and
    k by ``s_m ** -power``, ``power = (pos - max_pos // 2) / xpos_scale_base``."""

    dim: int
    inv_freq: torch.Tensor
    xpos_scale: Optional[torch.Tensor] = None
    xpos_scale_base: float = 512
    interpolation_factor: float = 1.0
