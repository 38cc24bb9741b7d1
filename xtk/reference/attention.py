"""Eager reference attention (SPEC §2), step by step, materializing the (b, h, nq, nk) scores.

Every step is differentiable, so the gradients of q, k, v and of every learned input
(bias tables, ALiBi slopes, QK-norm scales, dense bias) come from autograd. Run it on float64
inputs for the tolerance oracle of SPEC §4. Precision of each step, for inputs of dtype ``t``
and ``work = promote(t, float32)``:

- QK-norm: ``F.normalize`` and the dim scales in ``t``;
- rotary/xpos: angles and xpos scales in fp64, rotation in ``work``, rounded once to ``t``
  (``rotary_apply``);
- logits: ``(q * two) @ k^T`` in ``t`` (torch's matmul: the products accumulate in at least fp32
  and round to ``t``; ``two`` is the power-of-two part of the scale, exact), then converted to
  ``work`` and times the rest of the scale (``split_scale``);
- bias and masks added, top-k and softmax in ``work``;
- the probabilities rounded to v's dtype, ``p @ v`` in it, the output in q's dtype.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..bias import Dense, positions
from ..qk import QKNorm, Rotary


@dataclass(eq=False)
class ScoreHooks:
    """Features that need the whole attention matrix (talking heads, residual attention, entmax15).

    Only the eager path runs them; ``reason`` says which feature asked (shown by ``python -m xtk info``).
    pre_bias: ``s -> s`` on the scaled logits ``(b, h, nq, nk)`` before bias and masks.
    softmax: replaces the softmax over the last dim (given masked logits, masked = -finfo.max).
    post_softmax: ``p -> p`` after softmax and dropout, before ``p @ v``.
    record: when a dict, ``record['pre_softmax']`` receives the masked logits (masked = -finfo.max)."""

    reason: str
    pre_bias: Optional[Callable] = None
    softmax: Optional[Callable] = None
    post_softmax: Optional[Callable] = None
    record: Optional[dict] = field(default=None)


def split_scale(scale):
    """``scale = two * rest``, ``two`` a power of two with ``two <= |scale| < 2 two``.

    ``q * two`` is exact, so ``((q * two) @ k^T) * rest`` rounds exactly as ``(q @ k^T) * scale``
    (barring subnormals), while the product, ``|two q @ k^T| <= |scale q @ k^T|``, cannot overflow
    where the scaled logits fit. ``scale``: a float or a (learned) tensor; ``rest`` keeps its graph."""
    if isinstance(scale, torch.Tensor):
        exponent = torch.frexp(scale.detach())[1]
        two = torch.ldexp(torch.ones_like(scale.detach()), exponent - 1)
    else:
        two = math.ldexp(1.0, math.frexp(scale)[1] - 1)
    return two, scale / two


def qk_norm_apply(x: torch.Tensor, groups: int, dim_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """l2-normalize each of ``groups`` equal parts of the last dim, then times ``dim_scale``."""
    *lead, d = x.shape
    x = F.normalize(x.reshape(*lead, groups, d // groups), dim=-1, eps=1e-12).reshape(*lead, d)
    return x if dim_scale is None else x * dim_scale


def rotary_apply(x: torch.Tensor, pos: torch.Tensor, rot: Rotary, power: Optional[torch.Tensor],
                 key=None) -> torch.Tensor:
    """Rotate interleaved pairs of the first ``rot.dim`` features of ``x (..., n, d)`` at positions ``pos (n,)``.

    ``power (n,)`` is the xpos exponent (already signed for q or k), or None. Precision: the
    angles and the xpos scales in fp64, rounded once to ``work = promote(x.dtype, fp32)``; the
    rotation and scaling in ``work`` (as x-transformers, whose cos/sin stay fp32 at every input
    dtype): ``y0 = x0 cos - x1 sin``, ``y1 = x1 cos + x0 sin``, then times the xpos scale; the
    result rounded once to ``x.dtype``. ``key``: see ``rotary_tables``."""
    r = rot.dim
    work = torch.promote_types(x.dtype, torch.float32)
    cos, sin, scale = rotary_tables(pos, rot, power, work, key)
    xr = x[..., :r].to(work)
    swapped = xr.unflatten(-1, (r // 2, 2)).flip(-1).flatten(-2)  # (x1, x0) of each pair
    y = xr * cos + swapped * sin  # sin holds (-sin, +sin): x0 cos + x1 (-sin) is exactly x0 cos - x1 sin
    if scale is not None:
        y = y * scale
    y = y.to(x.dtype)
    return y if r == x.shape[-1] else torch.cat([y, x[..., r:]], dim=-1)


_ROTARY_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def rotary_tables(pos: torch.Tensor, rot: Rotary, power: Optional[torch.Tensor], work: torch.dtype, key=None):
    """``(cos, sin, scale)`` of ``rotary_apply``, each ``(n, rot.dim)`` in ``work``: the angle of pair
    m at position ``pos[i]`` is ``pos[i] * inv_freq[m] / interpolation_factor``; ``cos`` holds its
    cosine twice, ``sin`` its sine as ``(-sin, +sin)``, ``scale`` ``xpos_scale[m] ** power[i]`` twice
    (None without ``power``); computed in fp64 and rounded once. ``key``: hashable values that fix
    ``pos`` and ``power`` (``_rotate_qk`` passes its ints): the tables are then kept as long as the
    descriptor lives -- the layers of one forward share one descriptor, and a decode step rebuilt
    them in every layer (~60 of the ~300 us a layer spent on rotary+xpos). Not kept under
    torch.compile or when the descriptor's tensors require grad."""
    tensors = [t for t in (rot.inv_freq, rot.xpos_scale) if t is not None]
    if key is None or torch.compiler.is_compiling() or any(t.requires_grad for t in tensors):
        return _rotary_tables(pos, rot, power, work)
    memo = _ROTARY_TABLES.setdefault(rot, {})
    full_key = (key, pos.device, work, power is None, *(t._version for t in tensors))
    if full_key not in memo:
        if len(memo) >= 8:
            memo.clear()
        memo[full_key] = _rotary_tables(pos, rot, power, work)
    return memo[full_key]


def _rotary_tables(pos, rot: Rotary, power, work):
    theta = pos.to(torch.float64)[:, None] * rot.inv_freq.to(torch.float64)[None, :] / rot.interpolation_factor
    cos, sin = theta.cos(), theta.sin()
    cos = cos.repeat_interleave(2, dim=-1).to(work)
    sin = torch.stack([-sin, sin], dim=-1).flatten(-2).to(work)
    scale = None
    if power is not None:
        s = rot.xpos_scale.to(torch.float64)[None, :] ** power.to(torch.float64)[:, None]
        scale = s.repeat_interleave(2, dim=-1).to(work)
    return cos, sin, scale


def _rotate_qk(q, k, rot: Rotary, q_offset: int, k_prefix: int):
    nq, nk = q.shape[-2], k.shape[-2]
    pi, pj = positions(nq, nk, q_offset, k_prefix, q.device)
    kp, kr = k[..., :k_prefix, :], k[..., k_prefix:, :]
    pj = pj[k_prefix:]
    qpow = kpow = None
    if rot.xpos_scale is not None:
        max_pos = max(q_offset + nq, nk - k_prefix)
        qpow = (pi - max_pos // 2) / rot.xpos_scale_base
        kpow = -(pj - max_pos // 2) / rot.xpos_scale_base
    key = (nq, nk, q_offset, k_prefix)  # fixes pi, pj and the powers: the tables are shared across layers
    q = rotary_apply(q, pi, rot, qpow, key=("q",) + key)
    kr = rotary_apply(kr, pj, rot, kpow, key=("k",) + key)
    return q, torch.cat([kp, kr], dim=-2)


def _logits(q, k, keep, two, rest, work):
    """``s = ((q * two) @ k^T) * rest`` in ``work``, (b, h, nq, nk), under the NaN rule (README
    "NaN, inf and masking"): a pair that ``keep`` masks gets nothing from a NaN/inf q or k row, in
    its value or in a gradient (the backward of ``q @ k^T`` would form 0 x NaN in ``dS @ k`` and
    ``dS^T @ q``). Such rows are zeroed in the product and the kept pairs that read them get their
    own (non-finite) logit, from one product per pair. Under torch.compile (one graph, no
    data-dependent branch) the plain product serves: the values still follow the rule, but such
    gradients may be NaN."""
    if torch.compiler.is_compiling() or bool(torch.isfinite(q).all() and torch.isfinite(k).all()):
        return ((q * two) @ k.transpose(-1, -2)).to(work) * rest
    bad_q, bad_k = ~torch.isfinite(q).all(-1), ~torch.isfinite(k).all(-1)  # (b, h, nq), (b, h, nk)
    s = ((q.masked_fill(bad_q[..., None], 0.0) * two) @ k.masked_fill(bad_k[..., None], 0.0).transpose(-1, -2))
    s = s.to(work) * rest
    pairs = ((bad_q[..., :, None] | bad_k[..., None, :]) & keep).nonzero(as_tuple=True)

    def product(b, h, i, j):
        return ((q[b, h, i] * two) * k[b, h, j]).sum(-1).to(work) * rest

    with torch.no_grad():  # a -inf logit counts as masked (below): like a masked pair, no gradient (0 x inf)
        dead = torch.isneginf(product(*pairs))
    s = s.index_put([p[dead] for p in pairs], torch.full((), float("-inf"), dtype=work, device=s.device))
    live = [p[~dead] for p in pairs]
    return s.index_put(live, product(*live))


class _PoisonRows(torch.autograd.Function):
    """``where(bad, raw, clean)``, ``bad`` (``(..., 1)``) the rows of ``x`` (the features' input)
    holding NaN/inf: ``raw`` (the features of the poisoned rows, no gradient path) there, ``clean`` (the features of
    ``x`` with those rows zeroed) elsewhere. Backward, under the NaN rule: ``clean`` takes the
    gradient as is -- a poisoned row's is 0 where its pairs are all masked (zeros then meet the
    zeroed row, not 0 x NaN in the norm's chain rule) and NaN where it attends, which it carries
    into the feature parameters' gradients; ``x`` gets NaN in those attending rows, 0 in the rest."""

    @staticmethod
    def forward(ctx, clean, raw, x, bad):
        ctx.save_for_backward(bad)
        return torch.where(bad, raw, clean)

    @staticmethod
    def backward(ctx, g):
        (bad,) = ctx.saved_tensors
        hit = bad & (g != 0).any(-1, keepdim=True)  # NaN != 0: an attending row's NaN counts
        return g, None, torch.zeros_like(g).masked_fill(hit, float("nan")), None


def _qk_features(q, k, scale, qk_norm: Optional[QKNorm], rotary: Optional[Rotary], q_offset: int, k_prefix: int,
                 fold_scale: bool = False):
    """Steps 2-3 on the kv heads, before GQA expansion: QK-norm, then rotary/xpos.

    q ``(b, h, nq, d)``, k ``(b, hk, nk, d)`` -> q, k (same shapes and dtype ``t``) and the logit
    scale (``qk_norm.scale`` under QK-norm, else ``scale`` unchanged, maybe None). Precision: the
    normalization and dim scales in ``t``; rotary as ``rotary_apply`` (rounded once to ``t``).
    ``fold_scale``: a logit scale that requires grad is multiplied into q here (then 1.0 returned).
    NaN rule: the norm (and a folded scale) would turn a masked NaN/inf row's zero gradient into
    NaN (0 x NaN in the chain rule); such rows go through ``_PoisonRows`` (outside torch.compile)."""
    def features(q, k):
        sc = scale
        if qk_norm is not None:
            q = qk_norm_apply(q, qk_norm.groups, qk_norm.q_dim_scale)
            k = qk_norm_apply(k, qk_norm.groups, qk_norm.k_dim_scale)
            sc = qk_norm.scale
        if rotary is not None:
            q, k = _rotate_qk(q, k, rotary, q_offset, k_prefix)
        if fold_scale and isinstance(sc, torch.Tensor) and sc.requires_grad:
            q, sc = q * sc.to(q.dtype), 1.0
        return q, k, sc

    nonlinear = qk_norm is not None or (fold_scale and isinstance(scale, torch.Tensor))
    if not nonlinear or torch.compiler.is_compiling() or bool(torch.isfinite(q).all() and torch.isfinite(k).all()):
        return features(q, k)
    bad_q, bad_k = (~torch.isfinite(x).all(-1, keepdim=True) for x in (q, k))
    q_clean, k_clean, sc = features(q.masked_fill(bad_q, 0.0), k.masked_fill(bad_k, 0.0))
    with torch.no_grad():
        q_raw, k_raw, _ = features(q, k)
    return _PoisonRows.apply(q_clean, q_raw, q, bad_q), _PoisonRows.apply(k_clean, k_raw, k, bad_k), sc


def _mask_pieces(attn_mask, bias, is_causal: bool, h: int, nq: int, nk: int, q_offset: int, k_prefix: int,
                 device: torch.device):
    """Steps 5-6: the masks and the bias pieces, before any logit exists.

    -> ``keep``, bool broadcastable to ``(b, h, nq, nk)`` (True = the pair may attend), and
    ``added``, the float pieces (``attn_mask`` and the bias, each materialized in its own dtype,
    broadcastable to ``(b, h, nq, nk)``) to add to the logits. A bool piece only masks; a float
    piece is added, and its -inf entries also mask their pair, whatever the logit under it holds.
    ``is_causal`` masks key ``j`` (past the ``k_prefix`` memory keys) after query ``i``'s position."""
    keep = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
    added = []
    for extra in (Dense(attn_mask) if attn_mask is not None else None, bias):
        if extra is None:
            continue
        t = extra.materialize(h, nq, nk, q_offset, k_prefix)
        if t.dtype == torch.bool:
            keep = keep & t
        else:
            keep = keep & ~torch.isneginf(t)
            added.append(t)
    if is_causal:
        pi, pj = positions(nq, nk, q_offset, k_prefix, device)
        causal_masked = (pj[None, :] > pi[:, None]) & (torch.arange(nk, device=device) >= k_prefix)
        keep = keep & ~causal_masked
    return keep, added


def _biased_logits(q, k, keep, added: list, scale, hooks: Optional[ScoreHooks], work: torch.dtype):
    """Step 4 and the bias: the scaled logits plus the float pieces, ``(b, h, nq, nk)`` in ``work``.

    q ``(b, h, nq, d)`` and k ``(b, h, nk, d)`` (GQA already expanded), in ``t``. q takes the
    power-of-two part of the scale before the product (``q @ k^T`` alone overflows fp16's 65504
    long before ``scale * q @ k^T`` does), the rest comes after, in ``work`` (``split_scale``,
    ``_logits``); ``scale`` None means ``d ** -0.5``. Then ``hooks.pre_bias``, then each piece of
    ``added`` converted to ``work`` and added in order. -> the logits and ``keep`` narrowed by
    the -inf logits (a -inf logit is masked; a NaN one is kept: it propagates)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    two, rest = split_scale(scale)
    s = _logits(q, k, keep, two, rest, work)
    if hooks is not None and hooks.pre_bias is not None:
        s = hooks.pre_bias(s)
    for t in added:
        s = s + t.to(work)
    return s, keep & ~torch.isneginf(s)


def _topk_keep(s: torch.Tensor, keep: torch.Tensor, topk: int) -> torch.Tensor:
    """Step 7: ``keep`` narrowed to the logits ``s (b, h, nq, nk)`` >= each row's ``topk``-th
    largest unmasked one (ties kept; a NaN logit is never dropped). Comparisons only, in ``s``'s dtype."""
    kth = s.masked_fill(~keep, float("-inf")).topk(topk, dim=-1).values[..., -1:]
    return keep & ~(s < kth)


def _softmax_weighted_sum(s, keep, v, work: torch.dtype, out_dtype: torch.dtype, dropout_p: float, dropout_mask,
                          hooks: Optional[ScoreHooks]) -> torch.Tensor:
    """Step 8: softmax over the keys, dropout, then the weighted sum of v.

    s ``(b, h, nq, nk)`` logits in ``work``, keep bool ``(b, h, nq, nk)``, v ``(b, h, nk, dv)``
    (GQA expanded) -> ``(b, h, nq, dv)`` in ``out_dtype``. Softmax (or ``hooks.softmax``) and
    dropout in ``work``; the probabilities rounded to v's dtype, ``p @ v`` in it. Rows with no
    key give zeros. ``dropout_mask``: a bool keep-mask ``(b, h, nq, nk)`` to use instead of
    drawing one."""
    row_empty = ~keep.any(dim=-1, keepdim=True)
    if hooks is not None and hooks.record is not None:
        hooks.record["pre_softmax"] = s.masked_fill(~keep, -torch.finfo(work).max)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(row_empty, 0.0)
    if hooks is not None and hooks.softmax is not None:
        p = hooks.softmax(s.masked_fill(~keep, -torch.finfo(work).max))
    else:
        p = torch.softmax(s, dim=-1)
    p = p.masked_fill(~keep, 0.0)  # exactly 0 and no gradient on masked pairs, NaN rows included
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    if hooks is not None and hooks.post_softmax is not None:
        p = hooks.post_softmax(p)
    # v is not masked: NaN/inf in a masked key's v still gives 0 x NaN = NaN (as SDPA), except in
    # rows with no key, which are 0
    return (p.to(v.dtype) @ v).masked_fill(row_empty, 0.0).to(out_dtype)


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *,
              bias=None, topk=None, qk_norm: Optional[QKNorm] = None, rotary: Optional[Rotary] = None,
              q_offset=0, k_prefix=0, hooks: Optional[ScoreHooks] = None, dropout_mask=None,
              gqa_order: str = "interleave"):
    """q ``(b, h, nq, d)``, k ``(b, hk, nk, d)``, v ``(b, hk, nk, dv)`` -> ``(b, h, nq, dv)``.

    Inputs are assumed validated (``xtk.ops.attention`` does that). ``dropout_mask``, when
    given, is the boolean keep-mask ``(b, h, nq, nk)`` to use instead of drawing one. The steps
    (and their precision) are listed in the module docstring."""
    work = torch.promote_types(q.dtype, torch.float32)
    s, keep = _scores(q, k, attn_mask, is_causal, scale, bias, topk, qk_norm, rotary, q_offset, k_prefix, hooks,
                      gqa_order)
    return _softmax_weighted_sum(s, keep, _expand_gqa(v, q.shape[1], gqa_order), work, q.dtype, dropout_p,
                                 dropout_mask, hooks)


def log_sum_exp(q, k, attn_mask=None, is_causal=False, scale=None, *, bias=None, topk=None,
                qk_norm: Optional[QKNorm] = None, rotary: Optional[Rotary] = None, q_offset=0, k_prefix=0,
                gqa_order: str = "interleave") -> torch.Tensor:
    """``(b, h, nq)`` in ``work``: the natural log of ``sum_j exp(s_ij)`` over the logits each row keeps
    (scaled, biased, masked, top-k: the softmax's normalizer); -inf for a row that keeps none. The
    arguments as in ``attention``."""
    s, keep = _scores(q, k, attn_mask, is_causal, scale, bias, topk, qk_norm, rotary, q_offset, k_prefix, None,
                      gqa_order)
    return torch.logsumexp(s.masked_fill(~keep, float("-inf")), -1)


def _expand_gqa(x, h: int, gqa_order: str):
    """Step 1, GQA: query head i reads kv head i // (h // hk) ('interleave', SDPA's), or i % hk
    ('repeat', x-transformers' (r kvh) order): ``x`` (b, hk, n, d) repeated to h heads."""
    if gqa_order == "repeat":
        return x.repeat(1, h // x.shape[1], 1, 1)
    return x.repeat_interleave(h // x.shape[1], dim=1)


def _scores(q, k, attn_mask, is_causal, scale, bias, topk, qk_norm, rotary, q_offset, k_prefix, hooks, gqa_order):
    """Steps 1-7: the logits ``(b, h, nq, nk)`` in ``work`` and the keep-mask of the pairs that attend."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)
    q, k, scale = _qk_features(q, k, scale, qk_norm, rotary, q_offset, k_prefix)
    k = _expand_gqa(k, h, gqa_order)
    keep, added = _mask_pieces(attn_mask, bias, is_causal, h, nq, nk, q_offset, k_prefix, q.device)
    s, keep = _biased_logits(q, k, keep, added, scale, hooks, work)
    if topk is not None and topk < nk:
        keep = _topk_keep(s, keep, topk)
    return s, keep.expand(b, h, nq, nk)
