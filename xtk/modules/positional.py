"""Positional modules (x-transformers' parameter names); the attention ones return descriptors.

Absolute positions (``AbsolutePositionalEmbedding``, ``ScaledSinusoidalEmbedding``,
``FixedSinusoidalEmbedding`` for position-infused attention) return embeddings to add.
``RotaryEmbedding``, ``AlibiPositionalBias``, ``RelativePositionBias`` (T5) and
``DynamicPositionBias`` never build an ``(n, n)`` bias: ``descriptor(L)`` returns the
``xtk.Rotary`` / ``xtk.bias.*`` object that ``xtk.attention`` expands in-kernel, in
x-transformers' head order (``L``: the number of keys that carry a position).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .. import bias as xbias
from ..qk import Rotary
from .norms import LayerNorm


class AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute positions, scaled by ``dim ** -0.5`` (l2-normalized with ``l2norm_embed``)."""

    def __init__(self, dim: int, max_seq_len: int, l2norm_embed: bool = False):
        super().__init__()
        self.scale = dim ** -0.5 if not l2norm_embed else 1.0
        self.max_seq_len = max_seq_len
        self.l2norm_embed = l2norm_embed
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, n: int, offset: int = 0, device=None, seq_start_pos=None, pos=None):
        """Positions ``offset .. offset + n - 1`` (less ``seq_start_pos`` ``(b,)``, clamped at 0), or the
        device positions ``pos`` ``(b, n)`` as given (unchecked: a static decode step reads nothing on
        the host) -> ``(n | b, n, dim)``."""
        if pos is None:
            if offset + n > self.max_seq_len:
                raise ValueError(f"x: sequence length {offset + n} exceeds max_seq_len {self.max_seq_len} of the "
                                 f"absolute positional embedding (expected at most {self.max_seq_len} positions)")
            pos = torch.arange(offset, offset + n, device=device)
            if seq_start_pos is not None:
                pos = (pos - seq_start_pos[..., None]).clamp(min=0)
        emb = self.emb(pos) * self.scale
        return F.normalize(emb, dim=-1) if self.l2norm_embed else emb


class ScaledSinusoidalEmbedding(nn.Module):
    """``cat(sin, cos)(pos * theta ** -(m / half)) * scale``, ``scale`` learned (init ``dim ** -0.5``)."""

    def __init__(self, dim: int, theta: float = 10000):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim: scaled sinusoidal embedding needs an even dim, got {dim}")
        self.scale = nn.Parameter(torch.ones(1) * dim ** -0.5)
        half = dim // 2
        self.register_buffer("inv_freq", theta ** -(torch.arange(half).float() / half), persistent=False)

    def forward(self, n: int, offset: int = 0, device=None, seq_start_pos=None, pos=None):
        """Positions ``offset .. offset + n - 1`` (less ``seq_start_pos`` ``(b,)``), or the device
        positions ``pos`` ``(b, n)`` -> ``(n | b, n, dim)``."""
        if pos is None:
            pos = torch.arange(offset, offset + n, device=device)
            if seq_start_pos is not None:
                pos = pos - seq_start_pos[..., None]
        emb = pos.float()[..., None] * self.inv_freq
        return torch.cat((emb.sin(), emb.cos()), dim=-1) * self.scale


class FixedSinusoidalEmbedding(nn.Module):
    """Shortformer's position-infused attention (Press et al. 2020): fixed sinusoids
    ``cat(sin, cos)(pos * 10000 ** (-2m / dim))`` added to the query and key inputs of every
    self-attention layer (never to the values)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)

    def forward(self, n: int, offset: int = 0, device=None):
        t = torch.arange(n, device=device).float() + offset
        s = t[:, None] * self.inv_freq[None, :]
        return torch.cat((s.sin(), s.cos()), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary (RoFormer) on the first ``dim`` head features, optional xpos; buffers as in x-transformers."""

    def __init__(self, dim: int, use_xpos: bool = False, scale_base: float = 512, interpolation_factor: float = 1.0,
                 base: float = 10000, base_rescale_factor: float = 1.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"rotary_emb_dim: expected an even number >= 2, got {dim}")
        if interpolation_factor < 1.0:
            raise ValueError(f"rotary_interpolation_factor: expected >= 1, got {interpolation_factor}")
        base = base * base_rescale_factor ** (dim / (dim - 2)) if dim > 2 else base
        self.dim = dim
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))
        self.interpolation_factor = interpolation_factor
        self.scale_base = scale_base
        if use_xpos:
            self.register_buffer("scale", (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim))
        else:
            self.register_buffer("scale", None)

    def descriptor(self) -> Rotary:
        return Rotary(self.dim, self.inv_freq, xpos_scale=self.scale, xpos_scale_base=self.scale_base,
                      interpolation_factor=self.interpolation_factor)


class AlibiPositionalBias(nn.Module):
    """ALiBi slopes for the first ``heads`` of ``total_heads`` (SPEC §2.5); no parameters."""

    def __init__(self, heads: int, total_heads: int | None = None):
        super().__init__()
        total_heads = heads if total_heads is None else total_heads
        if not 1 <= heads <= total_heads:
            raise ValueError(f"alibi_num_heads: expected 1 <= alibi_num_heads <= heads ({total_heads}), got {heads}")
        self.heads, self.total_heads = heads, total_heads
        self.register_buffer("slopes", torch.tensor(xbias.alibi_slopes(heads)), persistent=False)

    def descriptor(self, L: int = 0) -> xbias.Alibi:
        return xbias.Alibi(self.slopes)


class RelativePositionBias(nn.Module):
    """T5 bucketed relative position bias, ``relative_attention_bias`` table ``(num_buckets, heads)``."""

    def __init__(self, scale: float, causal: bool = False, num_buckets: int = 32, max_distance: int = 128, heads: int = 8):
        super().__init__()
        self.scale, self.causal = scale, causal
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def descriptor(self, L: int = 0) -> xbias.T5:
        return xbias.T5(self.relative_attention_bias.weight, self.num_buckets, self.max_distance, self.causal, self.scale)


class _Seq(nn.Sequential):
    """``nn.Sequential`` that drops ``None`` entries (keeps x-transformers' module indices)."""

    def __init__(self, *mods):
        super().__init__(*[m for m in mods if m is not None])


class DynamicPositionBias(nn.Module):
    """An MLP over the signed distances ``-(L-1)..(L-1)`` gives a ``(2L-1, heads)`` table (SPEC §2.5)."""

    def __init__(self, dim: int, *, heads: int, depth: int, log_distance: bool = False, norm: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"dynamic_pos_bias_mlp_depth: expected >= 1, got {depth}")
        self.log_distance = log_distance
        self.mlp = nn.ModuleList([_Seq(nn.Linear(1, dim), LayerNorm(dim) if norm else None, nn.SiLU())])
        for _ in range(depth - 1):
            self.mlp.append(_Seq(nn.Linear(dim, dim), nn.LayerNorm(dim) if norm else None, nn.SiLU()))
        self.mlp.append(nn.Linear(dim, heads))

    def descriptor(self, L: int) -> xbias.DistanceTable:
        L = max(int(L), 1)
        w = self.mlp[-1].weight
        pos = torch.arange(-L + 1, L, device=w.device).to(w.dtype)[:, None]
        if self.log_distance:
            pos = torch.sign(pos) * torch.log(pos.abs() + 1)
        for layer in self.mlp:
            pos = layer(pos)
        return xbias.DistanceTable(pos)
