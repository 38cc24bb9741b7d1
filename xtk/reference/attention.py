"""Eager reference attention (SPEC §2), step by step, materializing the (b, h, nq, nk) scores.

Every step is differentiable, so the gradients of q, k, v and of every learned input
(bias tables, ALiBi slopes, QK-norm scales, dense bias) come from autograd. Computes the
logits, bias and softmax in ``promote(dtype, float32)``; run it on float64 inputs for the
tolerance oracle of SPEC §4.
"""
from __future__ import annotations

import math
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


def rotary_apply(x: torch.Tensor, pos: torch.Tensor, rot: Rotary, power: Optional[torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved pairs of the first ``rot.dim`` features of ``x (..., n, d)`` at positions ``pos (n,)``.

    ``power (n,)`` is the xpos exponent (already signed for q or k), or None."""
    r = rot.dim
    xr, rest = x[..., :r], x[..., r:]
    theta = pos.to(torch.float64)[:, None] * rot.inv_freq.to(torch.float64)[None, :] / rot.interpolation_factor
    cos, sin = theta.cos().to(x.dtype), theta.sin().to(x.dtype)  # (n, r/2)
    x0, x1 = xr[..., 0::2], xr[..., 1::2]
    y0, y1 = x0 * cos - x1 * sin, x1 * cos + x0 * sin
    if power is not None:
        s = rot.xpos_scale.to(torch.float64)[None, :] ** power.to(torch.float64)[:, None]
        s = s.to(x.dtype)
        y0, y1 = y0 * s, y1 * s
    y = torch.stack([y0, y1], dim=-1).flatten(-2)
    return torch.cat([y, rest], dim=-1)


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
    q = rotary_apply(q, pi, rot, qpow)
    kr = rotary_apply(kr, pj, rot, kpow)
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


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *,
              bias=None, topk=None, qk_norm: Optional[QKNorm] = None, rotary: Optional[Rotary] = None,
              q_offset=0, k_prefix=0, hooks: Optional[ScoreHooks] = None, dropout_mask=None):
    """q ``(b, h, nq, d)``, k ``(b, hk, nk, d)``, v ``(b, hk, nk, dv)`` -> ``(b, h, nq, dv)``.

    Inputs are assumed validated (``xtk.ops.attention`` does that). ``dropout_mask``, when
    given, is the boolean keep-mask ``(b, h, nq, nk)`` to use instead of drawing one."""
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)

    # 2. QK-norm, 3. rotary (on the kv heads, before GQA expansion)
    if qk_norm is not None:
        q = qk_norm_apply(q, qk_norm.groups, qk_norm.q_dim_scale)
        k = qk_norm_apply(k, qk_norm.groups, qk_norm.k_dim_scale)
        scale = qk_norm.scale
    if rotary is not None:
        q, k = _rotate_qk(q, k, rotary, q_offset, k_prefix)

    # 1. GQA: query head i reads kv head i // (h // hk)
    k = k.repeat_interleave(h // hk, dim=1)
    v = v.repeat_interleave(h // hk, dim=1)

    # 6. masks first (5. bias pieces: bool ones mask, float ones are added to the logits below;
    # a -inf entry masks its pair, whatever the logit under it holds)
    keep = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=q.device)
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
        pi, pj = positions(nq, nk, q_offset, k_prefix, q.device)
        causal_masked = (pj[None, :] > pi[:, None]) & (torch.arange(nk, device=q.device) >= k_prefix)
        keep = keep & ~causal_masked

    # 4. logits: q takes the power-of-two part of the scale before the product (q @ k^T alone
    # overflows fp16's 65504 long before scale * q @ k^T does), the rest comes after
    if scale is None:
        scale = d ** -0.5
    two, rest = split_scale(scale)
    s = _logits(q, k, keep, two, rest, work)
    if hooks is not None and hooks.pre_bias is not None:
        s = hooks.pre_bias(s)
    for t in added:
        s = s + t.to(work)
    keep = keep & ~torch.isneginf(s)  # a -inf logit is masked; a NaN one is kept: it propagates

    # 7. top-k: keep logits >= the k-th largest unmasked one (ties kept; a NaN one is never dropped)
    if topk is not None and topk < nk:
        kth = s.masked_fill(~keep, float("-inf")).topk(topk, dim=-1).values[..., -1:]
        keep = keep & ~(s < kth)

    # 8. softmax (rows with no key give zeros), dropout, weighted sum
    keep = keep.expand(b, h, nq, nk)
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
    return (p.to(v.dtype) @ v).masked_fill(row_empty, 0.0).to(q.dtype)
