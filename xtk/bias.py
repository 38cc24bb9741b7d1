"""Attention bias descriptors: O(n) or O(1) data that a kernel expands in-kernel.

The descriptor is the interface: every backend and module asks it (its kernel kind, the
tensor it owns, its value at a distance, its per-head data for ``h`` heads), none decodes
its type. A new kind subclasses ``Bias`` here, adds its expansion to the kernels' logit
helper (``kernels/attention_common._logits``) and its tests.

Positions (SPEC §2): the first ``k_prefix`` keys carry no position and get no
position bias; key ``j >= k_prefix`` sits at ``p_j = j - k_prefix``; query ``i`` at
``p_i = q_offset + i``. ``materialize`` builds the dense ``(h, nq, nk)`` (or
broadcastable) additive bias for the eager reference; kernels never call it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

import torch

from .kernels import kinds
from .ops import _check

__all__ = ["Bias", "Alibi", "T5", "DistanceTable", "Dense", "KernelBias", "alibi_slopes", "t5_bucket",
           "t5_min_max_distance", "positions", "farthest_distance"]


def positions(nq: int, nk: int, q_offset: int, k_prefix: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions of queries ``(nq,)`` and keys ``(nk,)`` (prefix keys get -1, unused)."""
    pi = torch.arange(nq, device=device) + q_offset
    pj = torch.arange(nk, device=device) - k_prefix
    return pi, pj


def farthest_distance(nq: int, nk: int, q_offset: int, k_prefix: int) -> int:
    """The largest ``|p_i - p_j|`` a call forms between a query and a positional key (0 without
    queries or positional keys)."""
    npos = nk - k_prefix
    if npos <= 0 or nq <= 0:
        return 0
    return max(abs(q_offset + nq - 1), abs(q_offset - (npos - 1)))


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


class KernelBias(NamedTuple):
    """A bias as the attention kernels take it: the one tensor they read (its slot gives the kernel's
    ``kinds.BIAS_*``, as ``Bias.kernel_kind`` says).

    slopes: ``(h,)`` fp32 (ALiBi, 0 for heads without a slope); table: ``(2L - 1, h)`` fp32, row
    ``clamp(p_i - p_j, -(L - 1), L - 1) + L - 1`` (T5 and DistanceTable: distances beyond the table
    take its edge rows); dense: the user's tensor, broadcastable to
    ``(b, h, nq, nk)`` (float or bool). Gradients flow from these back to the descriptor's tensor."""

    slopes: Optional[torch.Tensor] = None
    table: Optional[torch.Tensor] = None
    dense: Optional[torch.Tensor] = None


class Bias:
    """Base of the bias descriptors. Each kind owns one tensor (``field`` names it, ``learned``
    returns it: gradients flow to it) and answers what the backends ask:

    - ``kernel_kind``: its ``kinds.BIAS_*`` switch, or None when no kernel expands it;
    - ``validate(b, h, nq, nk, q_offset, k_prefix, device)``: raise, naming ``bias.<field>``;
    - ``materialize(h, nq, nk, q_offset, k_prefix)``: the dense additive bias (or bool keep-mask)
      broadcastable to ``(h, nq, nk)``, for the eager reference;
    - ``positional`` kinds (the value depends on ``p_i - p_j`` only): ``at_distance(dist, h, dtype)``;
    - ``dense`` kinds: the tensor is the bias itself (``(b, h, nq, nk)`` broadcastable);
    - ``for_heads(h, perm)``: per-head data padded to ``h`` heads and permuted, once;
    - ``for_shard(h, head_offset)``: the heads ``[head_offset, head_offset + h)`` of a larger model;
    - ``kernel_args(h, nq, nk, q_offset, k_prefix)``: a ``KernelBias``.

    A subclass of a kind below runs wherever that kind runs. A new kind subclasses ``Bias`` with
    at least ``validate`` and ``materialize``: the eager backend runs it, and the other backends
    say why they cannot (no kernel kind, neither positional nor dense) -- never a silent drop."""

    field: ClassVar[str] = ""
    positional: ClassVar[bool] = False
    dense: ClassVar[bool] = False

    @property
    def learned(self) -> Optional[torch.Tensor]:
        """The tensor this descriptor owns (slopes, table or dense tensor), or None."""
        return getattr(self, self.field) if self.field else None

    def with_learned(self, tensor: torch.Tensor) -> "Bias":
        """The same descriptor around another tensor in place of ``learned`` (a view, a leaf, rows)."""
        return dataclasses.replace(self, **{self.field: tensor})

    @property
    def kernel_kind(self) -> Optional[int]:
        return None

    def validate(self, b: int, h: int, nq: int, nk: int, q_offset: int, k_prefix: int, device) -> None:
        raise NotImplementedError(f"{type(self).__name__}.validate")

    def at_distance(self, dist: torch.Tensor, h: int, dtype: torch.dtype) -> torch.Tensor:
        """``(h, *dist.shape)``: the bias of each head at the signed distances ``dist = p_i - p_j``
        (integer tensor), computed in ``dtype``. Positional kinds only."""
        raise NotImplementedError(f"{type(self).__name__} is not a positional bias")

    def materialize(self, h: int, nq: int, nk: int, q_offset: int, k_prefix: int) -> torch.Tensor:
        """``(h, nq, nk)`` in the dtype of ``learned``: ``at_distance`` of every (query, key) pair,
        0 on the prefix keys (positional kinds; dense kinds override)."""
        pi, pj = positions(nq, nk, q_offset, k_prefix, self.learned.device)
        return _prefix_zero(self.at_distance(pi[:, None] - pj[None, :], h, self.learned.dtype), k_prefix)

    def for_heads(self, h: int, perm: Optional[torch.Tensor] = None) -> "Bias":
        """This bias for ``h`` heads, head ``i`` taking the data of head ``perm[i]`` (identity when
        None). Kinds without per-head data return themselves."""
        return self

    def for_shard(self, h: int, head_offset: int) -> "Bias":
        """This bias for the ``h`` query heads ``[head_offset, head_offset + h)`` of a model with more
        heads (tensor parallelism: per-head data indexes the global head, so a shard computes what the
        unsharded model computes for its heads). Kinds holding a column per head check they hold
        enough (``heads_held``); ALiBi pads with zero slopes as ``for_heads`` does."""
        held = self.heads_held()
        if held is not None and held < head_offset + h:
            raise ValueError(f"bias.{self.field}: holds {held} heads, fewer than head_offset + heads = "
                             f"{head_offset} + {h}")
        perm = torch.arange(head_offset, head_offset + h, device=self.learned.device)
        return self.for_heads(head_offset + h, perm)

    def heads_held(self) -> Optional[int]:
        """How many heads the per-head data covers (None: any count, padded or broadcast)."""
        return None

    def kernel_args(self, h: int, nq: int, nk: int, q_offset: int, k_prefix: int) -> KernelBias:
        raise NotImplementedError(f"{type(self).__name__} has no attention kernel")

    def _check_device(self, device) -> None:
        t = self.learned
        if t.device != device:
            raise ValueError(f"bias.{self.field}: expected device {device} (q's), got {t.device}")


def _take_heads(t: torch.Tensor, perm: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    return t if perm is None else t.index_select(dim, perm.to(t.device))


@dataclass(frozen=True, eq=False)
class Alibi(Bias):
    """ALiBi: bias ``-slopes[h] * |p_i - p_j|`` for heads ``h < len(slopes)``, 0 for the rest.

    slopes: ``(h_alibi,)`` float tensor (may require grad)."""

    slopes: torch.Tensor
    field: ClassVar[str] = "slopes"
    positional: ClassVar[bool] = True

    @property
    def kernel_kind(self) -> int:
        return kinds.BIAS_ALIBI

    def validate(self, b, h, nq, nk, q_offset, k_prefix, device) -> None:
        _check.tensor("bias.slopes", self.slopes, ndim=1)
        if self.slopes.shape[0] > h:
            raise ValueError(f"bias.slopes: expected at most {h} slopes (one per head), got {self.slopes.shape[0]}")
        self._check_device(device)

    def for_heads(self, h, perm=None) -> "Alibi":
        """Slopes padded with zeros to ``h`` heads (in the slopes' dtype), then permuted."""
        s = self.slopes
        if s.shape[0] < h:
            s = torch.cat([s, s.new_zeros(h - s.shape[0])])
        return dataclasses.replace(self, slopes=_take_heads(s, perm, 0))

    def at_distance(self, dist, h, dtype) -> torch.Tensor:
        slopes = self.for_heads(h).slopes.to(dtype)
        return -slopes.reshape(h, *(1,) * dist.dim()) * dist.abs().to(dtype)

    def kernel_args(self, h, nq, nk, q_offset, k_prefix) -> KernelBias:
        return KernelBias(slopes=self.for_heads(h).slopes.float())


@dataclass(frozen=True, eq=False)
class T5(Bias):
    """T5 relative-position buckets: ``table[bucket(p_j - p_i), h] * scale``.

    table: ``(num_buckets, h)`` (may require grad). ``max_distance`` must exceed the exact-bucket
    range (``t5_min_max_distance``), else the log buckets are undefined."""

    table: torch.Tensor
    num_buckets: int = 32
    max_distance: int = 128
    causal: bool = False
    scale: float = 1.0
    field: ClassVar[str] = "table"
    positional: ClassVar[bool] = True

    def __post_init__(self):
        check_t5_range(self.num_buckets, self.max_distance, self.causal)

    @property
    def kernel_kind(self) -> int:
        return kinds.BIAS_TABLE

    def validate(self, b, h, nq, nk, q_offset, k_prefix, device) -> None:
        _check.tensor("bias.table", self.table, ndim=2)
        if tuple(self.table.shape) != (self.num_buckets, h):
            raise ValueError(f"bias.table: expected shape (num_buckets, heads) = {(self.num_buckets, h)}, "
                             f"got {tuple(self.table.shape)}")
        self._check_device(device)

    def for_heads(self, h, perm=None) -> "T5":
        return dataclasses.replace(self, table=_take_heads(self.table, perm, 1))

    def heads_held(self) -> int:
        return self.table.shape[1]

    def at_distance(self, dist, h, dtype) -> torch.Tensor:
        bucket = t5_bucket(-dist, self.num_buckets, self.max_distance, self.causal)
        return self.table.to(dtype).t()[:, bucket] * self.scale  # head-major: each head's row contiguous

    def kernel_args(self, h, nq, nk, q_offset, k_prefix) -> KernelBias:
        """The T5 bias per signed distance, ``(2 * max_distance + 1, h)`` fp32, gathered from ``table``
        with the reference bucket function (the table's gradient flows through the gather). The
        buckets saturate at ``|p_i - p_j| >= max_distance`` (SPEC §2.5: the log bucket reaches
        ``num_buckets - 1`` there and is clamped beyond), so the kernels' edge rows stand for every
        farther distance (``KernelBias``): the table's size does not grow with the call's."""
        dist = torch.arange(-self.max_distance, self.max_distance + 1, device=self.table.device)
        return KernelBias(table=self.at_distance(dist, h, self.table.dtype).float().t())  # head-major, as read


@dataclass(frozen=True, eq=False)
class DistanceTable(Bias):
    """Learned value per signed distance: ``table[(p_i - p_j) + (L - 1), h]``.

    table: ``(2L - 1, h)``; every distance in the call must satisfy ``|p_i - p_j| <= L - 1``."""

    table: torch.Tensor
    field: ClassVar[str] = "table"
    positional: ClassVar[bool] = True

    @property
    def max_distance(self) -> int:
        return (self.table.shape[0] + 1) // 2 - 1

    @property
    def kernel_kind(self) -> int:
        return kinds.BIAS_TABLE

    def validate(self, b, h, nq, nk, q_offset, k_prefix, device) -> None:
        _check.tensor("bias.table", self.table, ndim=2)
        if self.table.shape[0] % 2 == 0 or self.table.shape[1] != h:
            raise ValueError(f"bias.table: expected shape (2L-1, {h}), got {tuple(self.table.shape)}")
        self._check_covers(nq, nk, q_offset, k_prefix)
        self._check_device(device)

    def _check_covers(self, nq, nk, q_offset, k_prefix) -> None:
        """Raise unless the table holds every distance the call forms."""
        far = farthest_distance(nq, nk, q_offset, k_prefix)
        if far > self.max_distance:
            raise ValueError(f"bias.table: covers distances up to {self.max_distance}, the call needs {far}")

    def for_heads(self, h, perm=None) -> "DistanceTable":
        return dataclasses.replace(self, table=_take_heads(self.table, perm, 1))

    def heads_held(self) -> int:
        return self.table.shape[1]

    def at_distance(self, dist, h, dtype) -> torch.Tensor:
        """Distances beyond the table take its edge rows (callers zero or never read them: prefix
        keys, the corners of a chunk's distance vector); ``materialize`` refuses them."""
        L = self.max_distance + 1
        return self.table.to(dtype)[(dist + (L - 1)).clamp(0, 2 * L - 2)].movedim(-1, 0)

    def materialize(self, h, nq, nk, q_offset, k_prefix) -> torch.Tensor:
        self._check_covers(nq, nk, q_offset, k_prefix)
        return super().materialize(h, nq, nk, q_offset, k_prefix)

    def kernel_args(self, h, nq, nk, q_offset, k_prefix) -> KernelBias:
        # head-major, as the kernels read it (attention_op.head_major): one copy per call here, not one
        # in the forward and another in the backward
        return KernelBias(table=self.table.float().t().contiguous().t())


@dataclass(frozen=True, eq=False)
class Dense(Bias):
    """An additive float bias or boolean keep-mask (False = masked), broadcastable to (b, h, nq, nk)."""

    tensor: torch.Tensor
    field: ClassVar[str] = "tensor"
    dense: ClassVar[bool] = True

    @property
    def kernel_kind(self) -> int:
        return kinds.BIAS_DENSE_BOOL if self.tensor.dtype == torch.bool else kinds.BIAS_DENSE_FLOAT

    def validate(self, b, h, nq, nk, q_offset, k_prefix, device) -> None:
        _check.tensor("bias.tensor", self.tensor)
        if not (self.tensor.dtype == torch.bool or self.tensor.is_floating_point()):
            raise TypeError(f"bias.tensor: expected a bool or floating-point tensor, got dtype {self.tensor.dtype}")
        _check.broadcastable("bias.tensor", self.tensor, (b, h, nq, nk))
        self._check_device(device)

    def for_heads(self, h, perm=None) -> "Dense":
        """Permutes the head dim (-3) when the tensor has one of ``h`` entries."""
        t = self.tensor
        if perm is None or t.dim() < 3 or t.shape[-3] == 1:
            return self
        return dataclasses.replace(self, tensor=_take_heads(t, perm, t.dim() - 3))

    def for_shard(self, h, head_offset) -> "Dense":
        """Heads ``[head_offset, head_offset + h)`` of the head dim (-3) when the tensor has one."""
        t = self.tensor
        if t.dim() < 3 or t.shape[-3] == 1:
            return self
        if t.shape[-3] < head_offset + h:
            raise ValueError(f"bias.tensor: holds {t.shape[-3]} heads (dim -3), fewer than head_offset + heads "
                             f"= {head_offset} + {h}")
        return dataclasses.replace(self, tensor=t.narrow(t.dim() - 3, head_offset, h))

    def materialize(self, h, nq, nk, q_offset, k_prefix) -> torch.Tensor:
        return self.tensor

    def kernel_args(self, h, nq, nk, q_offset, k_prefix) -> KernelBias:
        return KernelBias(dense=self.tensor)
