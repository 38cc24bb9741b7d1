"""``xtk.attention_varlen``: attention over a packed batch of variable-length sequences.

Sequences lie back to back without padding: q ``(total_q, h, d)``, k ``(total_k, hk, d)``, v
``(total_k, hk, dv)``; sequence ``b`` holds rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and
``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and v, and its positions restart at 0 (query ``i`` at
``q_offset + i``, key ``j`` at ``j - k_prefix``, as in ``xtk.attention``). Every keyword argument
of ``xtk.attention`` but ``attn_mask`` and a ``Dense`` bias (their key length differs per
sequence) keeps its meaning per sequence; gradients flow to q, k, v and every learned bias input.

Two paths:
- one launch (the Triton kernels' VARLEN switch, ``attention_triton.run_varlen``): each kernel runs
  once over the whole packed batch, its grid sized by ``max_seqlen_q`` / ``max_seqlen_k``, each
  program reading its sequence's start and length from the device offsets -- no host read of
  ``cu_seqlens``, so their values are the caller's contract there: offsets from 0, non-decreasing,
  ending at the packed lengths, every sequence within the max lengths and holding at least
  ``k_prefix`` keys (``XTK_DEBUG_CHECKS=1`` reads and checks them on every call). ``backend="auto"``
  takes it when the Triton backend's reasons (``varlen_reasons``) are empty -- CUDA tensors, or CPU
  ones under ``TRITON_INTERPRET=1`` with ``backend="triton"`` forced; a forced ``"triton"`` that
  cannot run raises with them.
- per sequence (the CPU path, a forced eager/chunked/ext backend, and ``auto``'s fallback, logged
  once when CUDA inputs take it): reads the two ``cu_seqlens`` on the host (one synchronisation per
  call), checks them, and runs ``xtk.attention`` once per sequence on views of the packed tensors.
``q_offset=None`` means 0 on both paths, as in ``xtk.attention`` (the same for every sequence).
"""
from __future__ import annotations

import dataclasses
import os

import torch

from .. import backends
from ..bias import Dense
from . import _check
from .attention import _validate, attention


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     is_causal=False, scale=None, enable_gqa=False, *, bias=None, topk=None, qk_norm=None,
                     rotary=None, q_offset=None, k_prefix=0, gqa_order="interleave", backend="auto"):
    """q ``(total_q, h, d)``, k ``(total_k, hk, d)``, v ``(total_k, hk, dv)``; ``cu_seqlens_q`` /
    ``cu_seqlens_k`` ``(B + 1,)`` int32, starting at 0, non-decreasing, ending at total_q / total_k;
    ``max_seqlen_q`` / ``max_seqlen_k``: ints at least the longest sequence. -> ``(total_q, h, dv)``
    in q's dtype. The other arguments as in ``xtk.attention``, applied to each sequence."""
    _check_packed(q, k, v, bias)
    kw = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, bias=bias, topk=topk,
              qk_norm=qk_norm, rotary=rotary, q_offset=q_offset, k_prefix=k_prefix, gqa_order=gqa_order)
    want = backends.requested(backend)
    if want in ("auto", "triton"):
        out, why = _one_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, want == "triton",
                               dict(kw))
        if out is not None:
            return out
        if want == "triton":
            raise RuntimeError("attention_varlen: backend 'triton' was requested but cannot run these inputs: "
                               + "; ".join(why))
        if q.device.type == "cuda":
            backends.warn_once("varlen:" + "; ".join(why), "xtk.attention_varlen: one xtk.attention call per "
                               "sequence instead of one launch: " + "; ".join(why))
    return _per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dict(kw, backend=backend))


def _one_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, forced: bool, kw: dict):
    """(out, []) from the one-launch Triton path, or (None, its reasons). Checks the offsets' metadata
    only (their values with ``XTK_DEBUG_CHECKS=1``), the other arguments as ``xtk.attention`` does, on
    the packed tensors seen as (1, heads, total, d)."""
    loaded = backends.load("attention", "triton")
    if isinstance(loaded, str):  # triton missing or broken: why, as a reason
        return None, [loaded]
    from . import attention_triton  # imported by now (the backend object lives there)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check.int32_tensor(name, cu, (None,), q.device)
        if cu.shape[0] == 0:
            raise ValueError(f"{name}: expected at least one entry (0), got an empty tensor")
    max_q = _check.integer("max_seqlen_q", max_seqlen_q, minimum=0)
    max_k = _check.integer("max_seqlen_k", max_seqlen_k, minimum=0)
    bias = kw.pop("bias")
    view = (t.transpose(0, 1)[None] for t in (q, k, v))
    inputs = _validate(*view, None, kw["dropout_p"], kw["is_causal"], kw["scale"], kw["enable_gqa"], None, kw["topk"],
                       kw["qk_norm"], kw["rotary"], kw["q_offset"], kw["k_prefix"], None, kw["gqa_order"])
    if inputs.k_prefix > max_k:
        raise ValueError(f"k_prefix: every sequence starts with {inputs.k_prefix} memory key/values, but "
                         f"max_seqlen_k is {max_k}")
    inputs = dataclasses.replace(inputs, bias=bias)
    why = attention_triton.varlen_reasons(inputs, forced, max_q, max_k)
    if why:
        return None, why
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:  # (after the reasons: a fallback checks the values first)
        raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.shape[0]} entries (cu_seqlens_q has "
                         f"{cu_seqlens_q.shape[0]}: one more than the sequences), got {cu_seqlens_k.shape[0]}")
    if bias is not None:
        bias.validate(cu_seqlens_q.shape[0] - 1, q.shape[1], max_q, max_k, inputs.q_offset, inputs.k_prefix, q.device)
    if os.environ.get("XTK_DEBUG_CHECKS", "") == "1":
        _host_checks(q, k, cu_seqlens_q, cu_seqlens_k, max_q, max_k, inputs.k_prefix)
    out = attention_triton.run_varlen(inputs, cu_seqlens_q, cu_seqlens_k, max_q, max_k)
    return out[0].transpose(0, 1), []


def _host_checks(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, k_prefix) -> list:
    """The offsets read on the host and checked (``_offsets``), and every sequence's keys cover
    ``k_prefix``; -> (q offsets, k offsets) as lists."""
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
    return starts_q, starts_k


def _per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kw: dict):
    """``xtk.attention`` once per sequence, on views of the packed tensors (offsets read on the host)."""
    starts_q, starts_k = _host_checks(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kw["k_prefix"])
    outs = []
    for b in range(len(starts_q) - 1):
        qb = q[starts_q[b]:starts_q[b + 1]].transpose(0, 1)[None]
        kb = k[starts_k[b]:starts_k[b + 1]].transpose(0, 1)[None]
        vb = v[starts_k[b]:starts_k[b + 1]].transpose(0, 1)[None]
        outs.append(attention(qb, kb, vb, **kw)[0].transpose(0, 1))
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
