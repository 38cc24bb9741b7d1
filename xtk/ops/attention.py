"""``xtk.attention``: the one dispatch point for attention.

A drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same positional
arguments, same result when only SDPA's arguments are given) that also takes in-kernel
bias descriptors, top-k, QK-norm, rotary/xpos and a query offset (SPEC §1, §2).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import backends
from ..bias import Bias
from ..qk import QKNorm, Rotary
from ..reference import attention as reference
from ..reference.attention import ScoreHooks
from . import _check


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """Validated arguments of one attention call; q/k/v are 4-D ``(b, h|hk, n, d)``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: Optional[torch.Tensor]
    dropout_p: float
    is_causal: bool
    scale: Optional[float]
    bias: Any
    topk: Optional[int]
    qk_norm: Optional[QKNorm]
    rotary: Optional[Rotary]
    q_offset: int
    k_prefix: int
    hooks: Optional[ScoreHooks]
    gqa_order: str = "interleave"

    @property
    def gqa_repeat(self) -> bool:
        """Query head i reads kv head i % hk (x-transformers' order): GQA with ``gqa_order='repeat'``."""
        return self.gqa_order == "repeat" and self.k.shape[1] not in (1, self.q.shape[1])  # MQA: one order

    def kwargs(self) -> dict:
        """Everything but q, k, v, as keyword arguments of the reference."""
        return dict(attn_mask=self.attn_mask, dropout_p=self.dropout_p, is_causal=self.is_causal,
                    scale=self.scale, bias=self.bias, topk=self.topk, qk_norm=self.qk_norm,
                    rotary=self.rotary, q_offset=self.q_offset, k_prefix=self.k_prefix, hooks=self.hooks,
                    gqa_order=self.gqa_order)


GQA_ORDERS = ("interleave", "repeat")


def check_gqa_order(gqa_order) -> None:
    if gqa_order not in GQA_ORDERS:
        raise ValueError(f"gqa_order: expected 'interleave' (query head i reads kv head i // (h / hk), SDPA's) or "
                         f"'repeat' (kv head i % hk, x-transformers'), got {gqa_order!r}")


def in_interleave_order(inputs: AttentionInputs) -> tuple[AttentionInputs, Optional[torch.Tensor]]:
    """``inputs`` with the query heads (and every per-head input: bias, attn_mask, q dim scale)
    permuted from ``gqa_order='repeat'`` into SDPA's order, and the permutation that takes the
    result back (``out[:, inverse]``); ``(inputs, None)`` when nothing is to permute. For a backend
    without the repeat order of its own; the copies are O(h n d) (q, out) plus per-head inputs."""
    if not inputs.gqa_repeat:
        return inputs, None
    h, hk = inputs.q.shape[1], inputs.k.shape[1]
    group = h // hk
    # interleave position j = kv * group + r holds repeat-order head r * hk + kv
    perm = torch.tensor([(j % group) * hk + j // group for j in range(h)], device=inputs.q.device)
    mask, qn = inputs.attn_mask, inputs.qk_norm
    if mask is not None and mask.dim() >= 3 and mask.shape[-3] == h:
        mask = mask.index_select(mask.dim() - 3, perm)
    if qn is not None and qn.q_dim_scale is not None and qn.q_dim_scale.shape[0] == h:
        qn = dataclasses.replace(qn, q_dim_scale=qn.q_dim_scale.index_select(0, perm))
    bias = inputs.bias.for_heads(h, perm) if inputs.bias is not None else None
    permuted = dataclasses.replace(inputs, q=inputs.q.index_select(1, perm), attn_mask=mask, qk_norm=qn, bias=bias,
                                   gqa_order="interleave")
    return permuted, torch.argsort(perm)


def _validate(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, bias, topk, qk_norm,
              rotary, q_offset, k_prefix, hooks, gqa_order="interleave") -> AttentionInputs:
    """The arguments of ``attention`` checked (types, shapes, devices, ranges), as ``AttentionInputs``;
    q ``(b, h, nq, d)``, k ``(b, hk, nk, d)``, v ``(b, hk, nk, dv)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check.tensor(name, x, ndim=4)
        _check.floating(name, x)
    _check.same("k", k, "q", q)
    _check.same("v", v, "q", q)
    b, h, nq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"k, v: expected batch size {b} (q's), got k {k.shape[0]}, v {v.shape[0]}")
    hk, nk = k.shape[1], k.shape[2]
    if k.shape[3] != d:
        raise ValueError(f"k: expected head dim {d} (q's), got {k.shape[3]}")
    if tuple(v.shape[1:3]) != (hk, nk):
        raise ValueError(f"v: expected (heads, length) = {(hk, nk)} (k's), got {tuple(v.shape[1:3])}")
    if h % hk != 0:
        raise ValueError(f"k: query heads ({h}) must be divisible by key/value heads, got {hk} kv heads")
    check_gqa_order(gqa_order)
    if hk != h and not enable_gqa:
        raise ValueError(f"enable_gqa: q has {h} heads and k/v have {hk}; pass enable_gqa=True for grouped-query attention")
    if attn_mask is not None:
        _check.tensor("attn_mask", attn_mask)
        if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise TypeError(f"attn_mask: expected a bool or floating-point tensor, got dtype {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask: expected device {q.device} (q's), got {attn_mask.device}")
        _check.broadcastable("attn_mask", attn_mask, (b, h, nq, nk))
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    q_offset = 0 if q_offset is None else _check.integer("q_offset", q_offset)
    k_prefix = _check.integer("k_prefix", k_prefix, minimum=0)
    if k_prefix > nk:
        raise ValueError(f"k_prefix: expected at most nk = {nk}, got {k_prefix}")
    if topk is not None:
        topk = _check.integer("topk", topk, minimum=1)
    _validate_bias(bias, q, b, h, nq, nk, q_offset, k_prefix)
    _validate_qk_norm(qk_norm, scale, h, hk, d)
    _validate_rotary(rotary, d)
    if hooks is not None and not isinstance(hooks, ScoreHooks):
        raise TypeError(f"hooks: expected xtk.reference.attention.ScoreHooks or None, got {type(hooks).__name__}")
    # causal hides nothing when the first query's position (q_offset) is at or past the last key's
    # (nk - 1 - k_prefix): a decode step over its whole cache. Dropped, so no backend builds a mask
    is_causal = bool(is_causal) and q_offset < nk - 1 - k_prefix
    return AttentionInputs(q, k, v, attn_mask, float(dropout_p), is_causal, scale, bias, topk,
                           qk_norm, rotary, q_offset, k_prefix, hooks, gqa_order)


def _validate_bias(bias, q, b, h, nq, nk, q_offset, k_prefix) -> None:
    """The descriptor checks itself (``xtk.bias.Bias.validate``); anything else is refused here."""
    if bias is None:
        return
    if not isinstance(bias, Bias):
        raise TypeError(f"bias: expected xtk.bias.Alibi, T5, DistanceTable, Dense (or another xtk.bias.Bias) or None, "
                        f"got {type(bias).__name__}")
    bias.validate(b, h, nq, nk, q_offset, k_prefix, q.device)


def _validate_qk_norm(qk_norm, scale, h: int, hk: int, d: int) -> None:
    """``qk_norm``: None or an ``xtk.QKNorm`` whose groups divide the head dim ``d`` and whose dim
    scales (tensors or None) broadcast to ``(h, 1, d)`` for q and ``(hk, 1, d)`` for k; with it
    the logit scale is ``qk_norm.scale``, so ``scale`` must be None."""
    if qk_norm is None:
        return
    if not isinstance(qk_norm, QKNorm):
        raise TypeError(f"qk_norm: expected xtk.QKNorm or None, got {type(qk_norm).__name__}")
    if scale is not None:
        raise ValueError("scale: with qk_norm the logit scale is qk_norm.scale; pass scale=None")
    g = _check.integer("qk_norm.groups", qk_norm.groups, minimum=1)
    if d % g != 0:
        raise ValueError(f"qk_norm.groups: expected a divisor of the head dim {d}, got {g}")
    for name, t, heads in (("qk_norm.q_dim_scale", qk_norm.q_dim_scale, h), ("qk_norm.k_dim_scale", qk_norm.k_dim_scale, hk)):
        if t is not None:
            _check.tensor(name, t)
            _check.broadcastable(name, t, (heads, 1, d))


def _validate_rotary(rotary, d: int) -> None:
    """``rotary``: None or an ``xtk.Rotary`` rotating an even ``rotary.dim <= d`` features, with
    ``inv_freq`` and ``xpos_scale`` (when set) of shape ``(rotary.dim // 2,)``."""
    if rotary is None:
        return
    if not isinstance(rotary, Rotary):
        raise TypeError(f"rotary: expected xtk.Rotary or None, got {type(rotary).__name__}")
    rd = _check.integer("rotary.dim", rotary.dim, minimum=2)
    if rd % 2 or rd > d:
        raise ValueError(f"rotary.dim: expected an even number <= head dim {d}, got {rd}")
    if tuple(rotary.inv_freq.shape) != (rd // 2,):
        raise ValueError(f"rotary.inv_freq: expected shape {(rd // 2,)}, got {tuple(rotary.inv_freq.shape)}")
    if rotary.xpos_scale is not None and tuple(rotary.xpos_scale.shape) != (rd // 2,):
        raise ValueError(f"rotary.xpos_scale: expected shape {(rd // 2,)}, got {tuple(rotary.xpos_scale.shape)}")


def _eager_reasons(inputs, forced):
    return []


def _eager_run(inputs: AttentionInputs):
    return reference.attention(inputs.q, inputs.k, inputs.v, **inputs.kwargs())


EAGER = backends.Backend("eager", "attention", _eager_reasons, _eager_run)


def _qkv_arguments(q, k, v, query, key, value):
    """q, k, v from either spelling (xtk's ``q``/``k``/``v`` or SDPA's ``query``/``key``/``value``)."""
    out = []
    for short, x, long, y in (("q", q, "query", query), ("k", k, "key", key), ("v", v, "value", value)):
        if x is not None and y is not None:
            raise TypeError(f"attention: got both {short} and {long}, two spellings of one argument; pass only one")
        if x is None and y is None:
            raise TypeError(f"attention: missing the {long} tensor (pass it as {short}, {long}, or positionally)")
        out.append(x if x is not None else y)
    return out


def attention(q=None, k=None, v=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              *, query=None, key=None, value=None, bias=None, topk=None, qk_norm=None, rotary=None, q_offset=None,
              k_prefix=0, backend="auto", hooks=None, gqa_order="interleave", head_offset=None):
    """Scaled dot-product attention with in-kernel bias, top-k, QK-norm and rotary/xpos.

    q ``(b, h, nq, d)``, k ``(b, hk, nk, d)``, v ``(b, hk, nk, dv)``, any strides -> ``(b, h, nq, dv)``
    (SDPA's 3-D ``(N, L, E)`` form is accepted too). SDPA's keyword names ``query``, ``key``,
    ``value`` work as well as ``q``, ``k``, ``v`` (one spelling per argument).
    Query ``i`` sits at position ``q_offset + i`` (default 0, SDPA's top-left alignment); the
    first ``k_prefix`` keys (memory key/values) carry no position, key ``j`` sits at
    ``j - k_prefix``. ``attn_mask``: bool keep-mask or additive float, broadcastable to
    ``(b, h, nq, nk)``. ``bias``: ``xtk.bias.Alibi | T5 | DistanceTable | Dense``. ``topk``:
    keep per row the logits >= the k-th largest (ties kept). Rows with no key give zeros.
    ``gqa_order`` (with ``enable_gqa``): 'interleave' -- query head ``i`` reads kv head
    ``i // (h / hk)``, SDPA's -- or 'repeat' -- ``i % hk``, x-transformers' ``(r kvh)`` order.
    ``hooks`` (``ScoreHooks``): features that need the whole score matrix; only the eager backend
    runs them (``auto`` picks it; a forced backend that cannot raises with its reasons).
    ``backend``: auto|eager|chunked|triton|ext (``XTK_BACKEND`` applies when 'auto').
    ``head_offset`` (None: q holds all the heads): q's heads are heads ``[head_offset, head_offset +
    h)`` of a model with more (a tensor-parallel shard; 0 for the first): ``bias`` holds the whole model's per-head data (ALiBi slopes, T5 /
    distance tables, a dense bias's head dim) and is indexed by the global head (``Bias.for_shard``);
    QK-norm's per-head scales are the shard's own, as its projections are."""
    q, k, v = _qkv_arguments(q, k, v, query, key, value)
    if head_offset is not None:
        head_offset = _check.integer("head_offset", head_offset, minimum=0)
    if all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (q, k, v)):
        # SDPA's (N, L, E) form: one head per batch entry
        if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        out = attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask, dropout_p, is_causal, scale,
                        enable_gqa, bias=bias, topk=topk, qk_norm=qk_norm, rotary=rotary, q_offset=q_offset,
                        k_prefix=k_prefix, backend=backend, hooks=hooks, gqa_order=gqa_order, head_offset=head_offset)
        return out.squeeze(1)
    if isinstance(bias, Bias) and head_offset is not None and isinstance(q, torch.Tensor) and q.dim() == 4:
        bias = bias.for_shard(q.shape[1], head_offset)
    inputs = _validate(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, bias, topk,
                       qk_norm, rotary, q_offset, k_prefix, hooks, gqa_order)
    chosen = backends.pick("attention", inputs, backend)
    if hooks is not None and chosen is EAGER and backends.requested(backend) == "auto":
        backends.warn_once("hooks:" + hooks.reason,
                           f"xtk.attention: {hooks.reason} needs the whole attention matrix; these layers run the eager path")
    return chosen.run(inputs)
