"""Attention bias descriptors: O(n) or O(1) data that a kernel expands in-kernel.

Positions (SPEC §2): the first ``k_prefix`` keys carry no position and get no
position bias; key ``j >= k_prefix`` sits at ``p_j = j - k_prefix``; query ``i`` at
``p_i = q_offset + i``. ``materialize`` builds the dense ``(h, nq, nk)`` (or
broadcastable) additive bias for the eager reference; kernels never call it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = ["Alibi", "T5", "DistanceTable", "Dense", "alibi_slopes", "t5_bucket", "t5_min_max_distance", "positions"]


def positions(nq: int, nk: int, q_offset: int, k_prefix: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions of queries ``(nq,)`` and keys ``(nk,)`` (prefix keys get -1, unused)."""
    pi = torch.arange(nq, device=device) + q_offset
    pj = torch.arange(nk, device=device) - k_prefix
    return pi, pj


def _prefix_zero(bias: torch.Tensor, k_prefix: int) -> torch.Tensor:
    """Zero the bias on the prefix (memory) keys, which carry no position."""
    if k_prefix == 0:
        return bias
    keep = torch.arange(bias.shape[-1], device=bias.device) >= k_prefix
    return bias * keep.to(bias.dtype)


def alibi_slopes(n: int) -> list[float]:
    """ALiBi slopes for ``n`` heads (SPEC §2.5): powers of two exactly, else the
    slopes of the closest lower power of two followed by every other slope of twice it."""
    def power_of_two(m: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / m) for i in range(m)]

    if n <= 0:
        raise ValueError(f"alibi_slopes: n must be >= 1, got {n}")
    if math.log2(n).is_integer():
        return power_of_two(n)
    c = 2 ** math.floor(math.log2(n))
    return (power_of_two(c) + power_of_two(2 * c)[0::2])[:n]


def t5_exact_buckets(num_buckets: int, causal: bool) -> int:
    """``E`` of SPEC §2.5: distances ``n < E`` get bucket ``n`` (per direction when bidirectional)."""
    return (num_buckets if causal else num_buckets // 2) // 2


def t5_min_max_distance(num_buckets: int, causal: bool) -> int:
    """The smallest valid ``max_distance``: the log branch divides by ``log(max_distance / E)``,
    which is 0 at ``max_distance = E`` and negative below (buckets below ``E``, even negative)."""
    return t5_exact_buckets(num_buckets, causal) + 1


def check_t5_range(num_buckets, max_distance, causal: bool) -> None:
    """Raise unless the bucket formula is defined for these values (x-transformers crashes on the
    others: an IndexError in its embedding, or a ZeroDivisionError)."""
    for name, value in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"T5 {name}: expected an int, got {type(value).__name__} {value!r}")
    smallest = 2 if causal else 4
    if num_buckets < smallest:
        raise ValueError(f"T5 num_buckets: expected at least {smallest} ({'causal' if causal else 'bidirectional'}: "
                         f"one exact bucket and one log bucket per direction), got {num_buckets}")
    low = t5_min_max_distance(num_buckets, causal)
    if max_distance < low:
        raise ValueError(f"T5 max_distance: expected at least {low} (one more than the {low - 1} exact buckets of "
                         f"num_buckets={num_buckets}, causal={causal}), got {max_distance}")


def t5_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int, causal: bool) -> torch.Tensor:
    """T5 bucket of the relative position ``rel = p_j - p_i`` (integer tensor), SPEC §2.5."""
    check_t5_range(num_buckets, max_distance, causal)
    n = -rel
    buckets = num_buckets
    ret = torch.zeros_like(n)
    if not causal:
        buckets //= 2
        ret = ret + (n < 0).long() * buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    exact = buckets // 2
    is_small = n < exact
    # float64 log: the boundaries n = exact * (max_distance/exact)**(t/(B-E)) land exactly
    large = exact + (
        torch.log(n.double().clamp(min=1) / exact) / math.log(max_distance / exact) * (buckets - exact)
    ).floor().long()
    large = large.clamp(max=buckets - 1)
    return ret + torch.where(is_small, n, large)


@dataclass(frozen=True, eq=False)
class Alibi:
    """ALiBi: bias ``-slopes[h] * |p_i - p_j|`` for heads ``h < len(slopes)``, 0 for the rest.

    slopes: ``(h_alibi,)`` float tensor (may require grad)."""

    slopes: torch.Tensor

    def materialize(self, h: int, nq: int, nk: int, q_offset: int, k_prefix: int) -> torch.Tensor:
        pi, pj = positions(nq, nk, q_offset, k_prefix, self.slopes.device)
        dist = (pi[:, None] - pj[None, :]).abs().to(self.slopes.dtype)
        slopes = torch.zeros(h, dtype=self.slopes.dtype, device=self.slopes.device)
        slopes = torch.cat([self.slopes, slopes[self.slopes.shape[0]:]])
        return _prefix_zero(-slopes[:, None, None] * dist, k_prefix)


@dataclass(frozen=True, eq=False)
class T5:
    """T5 relative-position buckets: ``table[bucket(p_j - p_i), h] * scale``.

    table: ``(num_buckets, h)`` (may require grad). ``max_distance`` must exceed the exact-bucket
    range (``t5_min_max_distance``), else the log buckets are undefined."""

    table: torch.Tensor
    num_buckets: int = 32
    max_distance: int = 128
    causal: bool = False
    scale: float = 1.0

    def __post_init__(self):
        check_t5_range(self.num_buckets, self.max_distance, self.causal)

    def materialize(self, h: int, nq: int, nk: int, q_offset: int, k_prefix: int) -> torch.Tensor:
        pi, pj = positions(nq, nk, q_offset, k_prefix, self.table.device)
        bucket = t5_bucket(pj[None, :] - pi[:, None], self.num_buckets, self.max_distance, self.causal)
        bias = self.table[bucket].permute(2, 0, 1) * self.scale  # (h, nq, nk)
        return _prefix_zero(bias, k_prefix)


@dataclass(frozen=True, eq=False)
class DistanceTable:
    """Learned value per signed distance: ``table[(p_i - p_j) + (L - 1), h]``.

    table: ``(2L - 1, h)``; every distance in the call must satisfy ``|p_i - p_j| <= L - 1``."""

    table: torch.Tensor

    @property
    def max_distance(self) -> int:
        return (self.table.shape[0] + 1) // 2 - 1

    def materialize(self, h: int, nq: int, nk: int, q_offset: int, k_prefix: int) -> torch.Tensor:
        pi, pj = positions(nq, nk, q_offset, k_prefix, self.table.device)
        L = self.max_distance + 1
        idx = (pi[:, None] - pj[None, :]) + (L - 1)
        idx = idx.clamp(0, 2 * L - 2)  # prefix keys: any index, zeroed below
        bias = self.table[idx].permute(2, 0, 1)
        return _prefix_zero(bias, k_prefix)


@dataclass(frozen=True, eq=False)
class Dense:
    """An additive float bias or boolean keep-mask (False = masked), broadcastable to (b, h, nq, nk)."""

    tensor: torch.Tensor

    def materialize(self, h: int, nq: int, nk: int, q_offset: int, k_prefix: int) -> torch.Tensor:
        return self.tensor


BIAS_KINDS = (Alibi, T5, DistanceTable, Dense)
