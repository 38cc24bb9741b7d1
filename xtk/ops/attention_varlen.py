"""``xtk.attention_varlen``: attention over a packed batch of variable-length sequences.

Sequences lie back to back without padding: q ``(total_q, h, d)``, k ``(total_k, hk, d)``, v
``(total_k, hk, dv)``; sequence ``b`` holds rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and
``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and v, and its positions restart at 0 (query ``i`` at
``q_offset + i``, key ``j`` at ``j - k_prefix``, as in ``xtk.attention``). Every keyword argument
of ``xtk.attention`` but ``attn_mask`` and a ``Dense`` bias (their key length differs per
sequence) keeps its meaning per sequence; gradients flow to q, k, v and every learned bias input.

This path reads the two ``cu_seqlens`` on the host (one synchronisation per call) and runs
``xtk.attention`` once per sequence on views of the packed tensors: the semantics and the CPU
path, not yet one kernel launch over the whole packed batch.
"""
from __future__ import annotations

import torch

from ..bias import Dense
from . import _check
from .attention import attention


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     is_causal=False, scale=None, enable_gqa=False, *, bias=None, topk=None, qk_norm=None,
                     rotary=None, q_offset=None, k_prefix=0, gqa_order="interleave", backend="auto"):
    """q ``(total_q, h, d)``, k ``(total_k, hk, d)``, v ``(total_k, hk, dv)``; ``cu_seqlens_q`` /
    ``cu_seqlens_k`` ``(B + 1,)`` int32, starting at 0, non-decreasing, ending at total_q / total_k;
    ``max_seqlen_q`` / ``max_seqlen_k``: ints at least the longest sequence. -> ``(total_q, h, dv)``
    in q's dtype. The other arguments as in ``xtk.attention``, applied to each sequence."""
    _check_packed(q, k, v, bias)
    starts_q = _offsets("cu_seqlens_q", cu_seqlens_q, q, "max_seqlen_q", max_seqlen_q)
    starts_k = _offsets("cu_seqlens_k", cu_seqlens_k, q, "max_seqlen_k", max_seqlen_k)
    if len(starts_q) != len(starts_k):
        raise ValueError(f"cu_seqlens_k: expected {len(starts_q)} entries (cu_seqlens_q has {len(starts_q)}: "
                         f"one more than the sequences), got {len(starts_k)}")
    for name, ends, t in (("cu_seqlens_q", starts_q, q), ("cu_seqlens_k", starts_k, k)):
        if ends[-1] != t.shape[0]:
            raise ValueError(f"{name}: expected its last entry to be the packed length {t.shape[0]}, got {ends[-1]}")
    short = [b for b in range(len(starts_k) - 1) if starts_k[b + 1] - starts_k[b] < k_prefix]
    if short:
        raise ValueError(f"k_prefix: every sequence starts with {k_prefix} memory key/values, but sequences {short} "
                         f"hold fewer keys")
    outs = []
    for b in range(len(starts_q) - 1):
        qb = q[starts_q[b]:starts_q[b + 1]].transpose(0, 1)[None]
        kb = k[starts_k[b]:starts_k[b + 1]].transpose(0, 1)[None]
        vb = v[starts_k[b]:starts_k[b + 1]].transpose(0, 1)[None]
        out = attention(qb, kb, vb, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                        bias=bias, topk=topk, qk_norm=qk_norm, rotary=rotary, q_offset=q_offset,
                        k_prefix=k_prefix, gqa_order=gqa_order, backend=backend)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, 0) if outs else q.new_zeros(0, q.shape[1], v.shape[2])


def _check_packed(q, k, v, bias) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check.tensor(name, t, ndim=3)
        _check.floating(name, t)
    _check.same("k", k, "q", q)
    _check.same("v", v, "q", q)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected head dim {q.shape[2]} (q's), got shape {tuple(k.shape)}")
    if tuple(v.shape[:2]) != tuple(k.shape[:2]):
        raise ValueError(f"v: expected (total_k, kv heads) = {tuple(k.shape[:2])} (k's), got shape {tuple(v.shape)}")
    if isinstance(bias, Dense):
        raise NotImplementedError("bias: a Dense bias is not supported by attention_varlen (its key length differs "
                                  "per sequence); position biases (Alibi, T5, DistanceTable) are")


def _offsets(name: str, cu, q, max_name: str, max_len) -> list:
    """``cu`` (int32, (B + 1,), from 0, non-decreasing) as a host list; every sequence within ``max_len``."""
    ends = _check.int32_list(name, cu, (None,), q.device)
    if not ends:
        raise ValueError(f"{name}: expected at least one entry (0), got an empty tensor")
    lengths = [b - a for a, b in zip(ends, ends[1:])]
    if ends[0] != 0 or any(n < 0 for n in lengths):
        raise ValueError(f"{name}: expected offsets starting at 0 and never decreasing, got {ends}")
    max_len = _check.integer(max_name, max_len, minimum=0)
    if lengths and max(lengths) > max_len:
        raise ValueError(f"{max_name}: expected at least the longest sequence, {max(lengths)}, got {max_len}")
    return ends
