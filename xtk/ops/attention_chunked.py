"""The ``chunked`` attention backend: exactly the reference's math (SPEC §2), fast and memory-bounded.

Where the reference materializes the ``(b, h, nq, nk)`` scores, bias and masks, this backend
feeds torch's fused CPU attention kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``,
what SDPA runs on CPU) query chunk by query chunk, with an additive float mask that is never
bigger than one chunk and, for the position biases, usually not materialized at all:

* ALiBi, T5, DistanceTable and the causal mask all depend only on the signed distance
  ``p_i - p_j``. One vector per head over the ``nq + nk - 1`` distances holds them, and a
  chunk's ``(h, c, nk)`` bias is a strided *view* of it (a Toeplitz matrix: with the chunk's
  query rows taken in reverse order, row and key strides are both +1). The fused kernel reads
  the view; nothing of size ``c * nk`` is written.
* Causal chunks only see keys up to their last query's position, so keys beyond are cut off
  (the work is about half, as with the kernel's own causal flag).
* Prefix keys (``k_prefix``), ``attn_mask``/``Dense`` pieces and top-k make the chunk's mask
  materialized (one ``(b|1, h|1, c, nkc)`` tensor per chunk, never the whole matrix).
* QK-norm and rotary/xpos are applied to q and k up front (O(n d)); GQA is passed through to
  the kernel without repeating k/v (``gqa_order='repeat'``: the query heads and per-head inputs are
  permuted into SDPA's order first and the output back, ``in_interleave_order``).

Gradients: a custom ``autograd.Function`` saves only q, k, v, the output, the log-sum-exp and
(top-k) the per-row threshold. Backward rebuilds each chunk's mask and calls the fused
backward kernel; when a learned bias input (ALiBi slopes, T5/DistanceTable table, a float
``Dense``/``attn_mask`` tensor) needs a gradient, the chunk's ``dS = P * (dP - D)`` is formed
explicitly by the plain math core instead (five matmuls: on CPU cheaper than the fused backward
plus the matmuls dS needs), in two chunk-sized buffers reused by every chunk, and reduced in
float64: along diagonals into the distance vector (a strided view of the zero-padded dS buffer
puts each diagonal in one column: one sum per 64 rows), whose gradient reaches the table/slopes
through one O(h n) autograd graph, or to a dense piece's broadcast shape. Off CPU (or for dtypes / head dims the fused kernel lacks) the same
chunk loop runs the math core for everything. Causal with no bias and top-left alignment uses
the kernel's own causal flag in one call.

One parallel region (the extension, csrc/attention_cpu.cpp): on CPU, with a position bias, causal
mask and/or top-k and no attn_mask or Dense piece, forward and backward run
as ``xtk::attention_distance_fwd`` / ``_bwd`` when xtk._C is built (``plan.ext``): the same formulas
(the math core's, ``EXT_BLOCK_ROWS``-row blocks, the learned bias's distance sums in float64, top-k
on the logits rounded as the reference rounds them, each row's threshold found again in the
backward from the same values), but
one ``at::parallel_for`` per call whose (batch, head, row group) tasks are handed out one at a time.
The chunk loop issues dozens of small parallel regions per chunk, and torch's OpenMP threads
spin-wait at the end of each: beside other busy processes every region waited for a descheduled
thread (issue 16). Without the extension the chunk loop computes the same function.

Double backward (``create_graph=True``): the backward then recomputes the eager reference on the
saved inputs and differentiates it (``_graph_backward``), materializing the scores as eager does.

Any strides: the fused kernel ignores the last-dim stride of q, k and v, so those whose last dim
is not unit-stride are copied (only those, only for it); masks and other strides pass as they are.

Rows with no key get zeros (their mask row is opened before the kernel and the output row
zeroed after; their gradient is zero). Dropout is not supported: auto falls back to eager.

NaN and inf (README "NaN, inf and masking"): the fused kernel masks by adding -inf, which a NaN
logit survives, and gives a zero row (log-sum-exp 0) for a row of NaN logits. Nothing is checked
before the kernel. The forward checks its log-sum-exp (O(b h nq)): NaN/inf, or 0 with NaN/inf in
q or k, and the output is recomputed by the eager reference, which implements the rule, a chunk of
query rows at a time (scores within ``MATERIALIZED_ELEMS`` per chunk). The backward checks its
gradients (one sum per tensor) and recomputes NaN/inf ones by the reference (``_graph_backward``,
whole scores). NaN/inf in v alone leaves the log-sum-exp finite: the kernel's 0 x NaN already
gives the rule's output there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .. import backends
from ..bias import Bias
from ..reference import attention as reference
from .attention import in_interleave_order
from ..reference.attention import _qk_features, split_scale

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CAUSAL_CHUNK = 256       # query rows per chunk when the mask is a free view (causal: cuts keys)
MATERIALIZED_ELEMS = 1 << 22  # max elements of a materialized chunk mask / math-core score chunk
LEARNED_BWD_ELEMS = 1 << 21  # max elements of a (b, h, c, nkc) chunk of the backward's math core for learned masks
LEARNED_CAUSAL_CHUNK = 128  # query rows per causal chunk of that backward
ROWSUM_ELEMS = 1 << 17   # elements of the backward's row-block temporary for D = rowsum(P dP)
FORCE_MATH = False       # tests flip this to run the math core on CPU
EXT_BLOCK_ROWS = 64      # query rows per block of the extension's attention (``_ext_ops``)
EXT_MIN_TASKS = 0        # its minimum task count (0: 4 per thread); tests raise it to split rows
USE_EXT = True           # tests turn the extension off to run the chunk loop


@dataclass(eq=False)
class _Plan:
    b: int
    h: int
    hk: int
    nq: int
    nk: int
    dv: int
    scale: float
    work: torch.dtype
    causal: bool
    q_offset: int
    k_prefix: int
    topk: Optional[int]
    pos_bias: Optional[Bias]       # a positional bias descriptor: its at_distance fills the distance vector
    dense_bias: bool               # the bias is a dense tensor (added like attn_mask)
    toeplitz: bool                 # a distance-vector piece (position bias and/or causal)
    dvals: Optional[torch.Tensor]  # the signed distances p_i - p_j covered, (nq + nk - 1,)
    flash: bool
    gqa_native: bool
    chunk: int
    native_causal: bool = False    # the kernel's own (top-left) causal flag, one chunk
    ext: bool = False              # forward and backward in the extension (``_ext_ops``), one parallel region each


# ----------------------------------------------------------------------------- support
def reasons(inputs, forced: bool) -> list:
    why = []
    if inputs.hooks is not None:
        why.append(f"hooks ({inputs.hooks.reason}) need the whole attention matrix")
    if inputs.dropout_p > 0.0:
        why.append(f"dropout_p={inputs.dropout_p}: attention dropout is not implemented here (the eager path draws it)")
    if inputs.q.dtype not in _DTYPES:
        why.append(f"dtype {inputs.q.dtype} not supported (have {', '.join(str(d) for d in _DTYPES)})")
    bias = inputs.bias
    if bias is not None and not (bias.positional or bias.dense):
        why.append(f"bias {type(bias).__name__}: this backend expands positional (distance) and dense biases, "
                   "and this kind is neither")
    if torch.compiler.is_compiling():
        why.append("inside torch.compile: the strided-view position masks and the custom autograd are not "
                   "traceable; the eager reference compiles")
    return why


_gqa_cache: dict = {}


def _flash_gqa_native() -> bool:
    """Whether this torch's fused CPU kernel reads kv head ``h // (H / hk)`` itself (checked once)."""
    if "ok" not in _gqa_cache:
        try:
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, 4, 3, 8, generator=g)
            k, v = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
            got = _FLASH(q, k, v)[0]
            want = _FLASH(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))[0]
            _gqa_cache["ok"] = bool(torch.allclose(got, want, atol=1e-6))
        except Exception:
            _gqa_cache["ok"] = False
    return _gqa_cache["ok"]


def _ext_ops():
    """``torch.ops.xtk`` when the extension has the distance-vector attention (csrc/attention_cpu.cpp)
    and ``USE_EXT`` is on, else None (the chunk loop then runs the same math)."""
    if not USE_EXT:
        return None
    try:
        from .. import _ext
        _ext.load()
    except ImportError:
        return None
    return torch.ops.xtk if _ext.has_kernel("attention_distance_fwd", "cpu") else None


# ----------------------------------------------------------------------------- plan and masks
def _learned(inputs) -> list:
    """The tensors of attn_mask and bias a gradient may flow to (None where absent or boolean)."""
    return [inputs.attn_mask, None if inputs.bias is None else inputs.bias.learned]


def _make_plan(inputs, q, scale) -> _Plan:
    b, h, nq, _ = q.shape
    hk, nk, dv = inputs.k.shape[1], inputs.k.shape[2], inputs.v.shape[3]
    work = torch.promote_types(q.dtype, torch.float32)
    bias = inputs.bias
    positional, dense_bias = bias is not None and bias.positional, bias is not None and bias.dense
    flash = (_FLASH is not None and not FORCE_MATH and q.device.type == "cpu" and q.dtype in _FLASH_DTYPES
             and dv == q.shape[3])
    # causal with top-left alignment and no bias: the kernel's own causal flag, one call. (Causal
    # ALiBi as a (1, h, 1, nk) mask s p_j, dropping the row constant -s p_i, would be as fast but
    # loses fp32 precision with the position: |s p_j| grows where the kept logits are.)
    ext_ok = (inputs.attn_mask is None and not dense_bias and q.device.type == "cpu" and not FORCE_MATH
              and _ext_ops() is not None)
    native = (flash and inputs.is_causal and inputs.q_offset == 0 and inputs.k_prefix == 0 and inputs.topk is None
              and inputs.attn_mask is None and bias is None and not ext_ok)
    toeplitz = (positional or inputs.is_causal) and not native
    dvals = None
    if toeplitz:
        dmin = inputs.q_offset - (nk - 1 - inputs.k_prefix)
        dvals = torch.arange(dmin, dmin + nq + nk - 1, device=q.device)
    materialized = (inputs.topk is not None or inputs.attn_mask is not None or dense_bias
                    or (toeplitz and inputs.k_prefix > 0) or not flash)
    if materialized:
        chunk = max(16, MATERIALIZED_ELEMS // max(1, b * h * nk))
    elif inputs.is_causal and not native:
        chunk = CAUSAL_CHUNK
    else:
        chunk = nq
    # the extension for every distance-vector piece (causal included) and for top-k (plain causal b2 h8
    # n1024 d32, 2 threads: fwd 9.4 / bwd 21.6 ms against the fused kernel's 10.5 / 26.1)
    ext = ext_ok and (toeplitz or inputs.topk is not None)
    return _Plan(b, h, hk, nq, nk, dv, scale, work, inputs.is_causal, inputs.q_offset, inputs.k_prefix,
                 inputs.topk, bias if positional else None, dense_bias, toeplitz, dvals, flash,
                 flash and hk != h and _flash_gqa_native(), min(chunk, max(nq, 1)), native, ext)


def _distance_vector(plan: _Plan, bt) -> torch.Tensor:
    """``(h|1, nq + nk - 1)``: the position bias (and causal -inf) per head at each distance ``d = p_i - p_j``."""
    d = plan.dvals
    w = plan.work
    if plan.pos_bias is not None:  # the descriptor's own values, with ``bt`` as its tensor
        vec = plan.pos_bias.with_learned(bt).at_distance(d, plan.h, w)
    else:
        vec = torch.zeros(1, d.shape[0], dtype=w, device=d.device)
    if plan.causal:
        vec = vec.masked_fill(d[None, :] < 0, float("-inf"))
    return vec


def _toeplitz_view(plan: _Plan, rvec: torch.Tensor, i0: int, c: int, nkc: int) -> torch.Tensor:
    """The chunk's ``(1, h|1, c, nkc)`` distance piece, query rows in REVERSE order, as a view of
    ``rvec`` (the distance vector flipped): entry ``(r', j)`` is ``rvec[nq - i0 - c + r' + j]``."""
    hb, R = rvec.shape
    return rvec.as_strided((1, hb, c, nkc), (0, R, 1, 1), rvec.storage_offset() + plan.nq - i0 - c)


def _dense_piece(t: torch.Tensor, plan: _Plan, i0: int, i1: int, nkc: int, rev: bool) -> torch.Tensor:
    """Rows i0:i1 and keys :nkc of a broadcastable attn_mask / Dense tensor, as an additive 4-D float."""
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    if t.shape[-2] != 1:
        t = t[..., i0:i1, :]
        if rev:
            t = t.flip(-2)
    if t.shape[-1] != 1:
        t = t[..., :nkc]
    if t.dtype == torch.bool:
        return torch.zeros((), dtype=plan.work, device=t.device).masked_fill(~t, float("-inf")).expand(t.shape)
    return t.to(plan.work)


def _keys_for(plan: _Plan, i1: int) -> int:
    """Keys a chunk ending at query i1 can see: causal cuts keys past its last position."""
    if not plan.causal:
        return plan.nk
    last = plan.k_prefix + plan.q_offset + i1  # keys j < last have p_j <= p_(i1-1)
    return max(1, min(plan.nk, max(last, plan.k_prefix)))


def _chunk_mask(plan: _Plan, ts, rvec, i0: int, i1: int, nkc: int, scores=None, kth=None):
    """The chunk's additive mask (4-D, broadcastable to (b, h, c, nkc), rows reversed when
    ``plan.toeplitz``), the rows with no key (bool, broadcastable to (b, h, c)) or None, and the
    top-k threshold per row. ``scores()`` gives the chunk's scaled logits (for top-k);
    ``kth`` (b, h, c, 1), when given, is the forward's threshold to reuse."""
    c = i1 - i0
    rev = plan.toeplitz
    am, bt = ts
    m = None
    if plan.toeplitz:
        m = _toeplitz_view(plan, rvec, i0, c, nkc)
        if plan.k_prefix > 0:  # prefix keys: no position bias, never causally masked
            m = m.clone()
            m[..., : min(plan.k_prefix, nkc)] = 0.0
    for t in (am, bt if plan.dense_bias else None):  # the reference adds attn_mask, then bias
        if t is not None:
            piece = _dense_piece(t, plan, i0, i1, nkc, rev)
            m = piece if m is None else m + piece
    is_view = m is not None and plan.toeplitz and plan.k_prefix == 0 and am is None and not plan.dense_bias
    if plan.topk is not None and plan.topk < nkc:
        s = scores()  # backward rebuilds the same s and reuses the forward's kth: same kept set
        if m is not None:
            s = s + m
        if kth is None:
            kth = s.topk(plan.topk, dim=-1).values[..., -1:]
        base = torch.zeros_like(s, dtype=plan.work) if m is None else m
        m = base.masked_fill(s < kth, float("-inf"))
        is_view = False
    if is_view and plan.causal and plan.q_offset + i0 < 0:
        m, is_view = m.clone(), False  # query positions < 0 see no key: rows to open below
    row_empty = None
    if m is not None and not is_view:
        row_empty = torch.isneginf(m).all(-1)
        if row_empty.any():
            m = m.masked_fill(row_empty[..., None], 0.0)
        else:
            row_empty = None
    return m, row_empty, kth


# ----------------------------------------------------------------------------- cores
def _grouped(x: torch.Tensor, hk: int) -> torch.Tensor:
    """(b, h, c, e) -> (b, hk, r * c, e): query head h reads kv head h // r without copying k/v."""
    b, h, c, e = x.shape
    return x.reshape(b, hk, (h // hk) * c, e)


def _scores(plan: _Plan, qc, kc) -> torch.Tensor:
    """Scaled logits of a chunk, computed as the reference does (matmul in the input dtype, q
    taking the power-of-two part of the scale first)."""
    b, h, c, _ = qc.shape
    two, rest = split_scale(plan.scale)
    s = _grouped(qc * two, kc.shape[1]) @ kc.transpose(-1, -2)
    return s.reshape(b, h, c, -1).to(plan.work) * rest


def _math_logits(plan, qc, kc, m, out=None):
    """Scaled logits plus mask in the work dtype, (b, h, c, nkc); into ``out`` (contiguous) when given."""
    b, h, c, _ = qc.shape
    w = plan.work
    qg, kt = _grouped(qc.to(w), kc.shape[1]), kc.to(w).transpose(-1, -2)
    if out is None:
        s = (qg @ kt).reshape(b, h, c, -1)
    else:
        s = out
        torch.matmul(qg, kt, out=_grouped(out, kc.shape[1]))
    return s.mul_(plan.scale) if m is None else torch.add(m, s, alpha=plan.scale, out=s)


class _Scratch:
    """Work buffers reused by every chunk of one backward call: a fresh chunk-sized tensor costs
    its page faults again on every chunk (CPU allocations of this size are not cached)."""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.flat = dtype, device, {}

    def get(self, key: str, *shape: int) -> torch.Tensor:
        n = 1
        for x in shape:
            n *= x
        t = self.flat.get(key)
        if t is None or t.numel() < n:
            t = self.flat[key] = torch.empty(n, dtype=self.dtype, device=self.device)
        return t[:n].view(shape)


_softmax_out = getattr(getattr(torch.ops.aten, "_softmax", None), "out", None)


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of a contiguous tensor, in place (no second chunk-sized tensor).
    (``_softmax.out`` into a non-contiguous ``out`` gives wrong values on torch 2.13 CPU.)"""
    if _softmax_out is not None and x.is_contiguous():
        return _softmax_out(x, -1, False, out=x)
    return x.copy_(torch.softmax(x, -1))


def _core_fwd(plan: _Plan, qc, kc, vc, m):
    """-> (out chunk in q's dtype, log-sum-exp (b, h, c))."""
    b, h, c, _ = qc.shape
    if plan.flash:
        if kc.shape[1] != h and not plan.gqa_native:
            kc, vc = kc.repeat_interleave(h // kc.shape[1], 1), vc.repeat_interleave(h // vc.shape[1], 1)
        return _FLASH(qc, kc, vc, 0.0, plan.native_causal, attn_mask=m, scale=plan.scale)
    s = _math_logits(plan, qc, kc, m)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    out = (_grouped(p, kc.shape[1]) @ vc.to(plan.work)).reshape(b, h, c, -1)
    return out.to(qc.dtype), lse


def _math_bwd(plan: _Plan, go, qc, kc, vc, oc, lc, m, pad: int = 0, scratch: Optional[_Scratch] = None):
    """-> dq (b, h, c, d), dk (b, hk, nkc, d), dv, dS (b, h, c, nkc): all in the work dtype.

    Two chunk-sized tensors (from ``scratch`` when given): the logits, turned into P in place,
    and dP, turned into dS in place; dS is a view of a ``(b, h, c, nkc + pad)`` buffer whose
    last ``pad`` columns are zero (for ``_add_diagonal_sums``)."""
    b, h, c, d = qc.shape
    hk, w, nkc = kc.shape[1], plan.work, kc.shape[2]
    scratch = scratch or _Scratch(w, qc.device)
    # softmax of the logits, not exp(s - lse): the fused kernel's lse is a few ulps off
    p = _softmax_(_math_logits(plan, qc, kc, m, out=scratch.get("p", b, h, c, nkc)))
    gow = go.to(w)
    pg = _grouped(p, hk)
    dv = pg.transpose(-1, -2) @ _grouped(gow, hk)
    buf = scratch.get("ds", b, h, c, nkc + pad)
    if pad:
        buf[..., nkc:].zero_()
    dp = buf[..., :nkc]
    torch.matmul(_grouped(gow, hk), vc.to(w).transpose(-1, -2), out=_grouped(dp, hk))
    # D = rowsum(P dP), not dO . O: equal in exact arithmetic, but O's rounding (and the fused
    # kernel's) shows in the learned-bias gradients, sums over every logit with cancellation.
    # (A few rows at a time: a fresh chunk-sized temporary costs more in page faults than the product.)
    dsum = torch.empty(b, h, c, 1, dtype=w, device=qc.device)
    rows = max(1, min(c, ROWSUM_ELEMS // max(1, b * h * nkc)))
    tmp = scratch.get("tmp", b, h, rows, nkc)
    for r0 in range(0, c, rows):
        r1 = min(c, r0 + rows)
        t = torch.mul(p[:, :, r0:r1], dp[:, :, r0:r1], out=tmp[:, :, : r1 - r0])
        torch.sum(t, -1, keepdim=True, out=dsum[:, :, r0:r1])
    ds = torch.mul(p, dp.sub_(dsum), out=dp)
    dsg = _grouped(ds, hk)
    dq = (dsg @ kc.to(w)).reshape(b, h, c, d).mul_(plan.scale)
    dk = (dsg.transpose(-1, -2) @ _grouped(qc.to(w), hk)).mul_(plan.scale)
    return dq, dk, dv, ds


def _core_bwd(plan: _Plan, go, qc, kc, vc, oc, lc, m, scratch=None):
    """-> dq, dk (b, hk, nkc, d), dv through the fused backward kernel."""
    h, hk = qc.shape[1], kc.shape[1]
    if not plan.flash:
        return _math_bwd(plan, go, qc, kc, vc, oc, lc, m, scratch=scratch)[:3]
    # the kernel's own GQA backward sums the query heads' dk/dv in the input dtype: in bf16/fp16 that
    # rounding breaks the 2x rule, so there k/v are repeated and the sum is done in float32
    expand = hk != h and (not plan.gqa_native or qc.dtype not in (torch.float32, torch.float64))
    if expand:
        kc, vc = kc.repeat_interleave(h // hk, 1), vc.repeat_interleave(h // hk, 1)
    dq, dk, dv = _FLASH_BWD(go.contiguous(), qc, kc, vc, oc, lc, 0.0, plan.native_causal, attn_mask=m,
                            scale=plan.scale)
    if expand:
        b, _, nkc, _ = dk.shape
        dk = dk.to(plan.work).reshape(b, hk, h // hk, nkc, -1).sum(2)
        dv = dv.to(plan.work).reshape(b, hk, h // hk, nkc, -1).sum(2)
    return dq, dk, dv


# ----------------------------------------------------------------------------- chunk loops
def _chunks(plan: _Plan):
    for i0 in range(0, plan.nq, plan.chunk):
        i1 = min(plan.nq, i0 + plan.chunk)
        yield i0, i1, _keys_for(plan, i1)


def _flip(x, rev):
    """Whole tensors go to the loop's row order once (reversed when the mask is a Toeplitz view)."""
    return x.flip(2) if rev else x


def _rows(plan: _Plan, x, i0, i1, rev):
    """Query rows i0:i1 of a tensor already in the loop's row order (a view, no copy)."""
    return x[:, :, plan.nq - i1: plan.nq - i0] if rev else x[:, :, i0:i1]


def _rvec(plan: _Plan, ts):
    return _distance_vector(plan, ts[1]).flip(-1).contiguous() if plan.toeplitz else None


def _forward(plan: _Plan, q, k, v, ts):
    """-> out, and in the loop's row order: log-sum-exp (b, h, nq), top-k thresholds (b, h, nq, 1)."""
    b, h, nq = plan.b, plan.h, plan.nq
    rev = plan.toeplitz
    if plan.ext:  # one parallel region in the extension; lse -inf for a row with no key; top-k: no kth kept
        w = plan.work
        out, lse = _ext_ops().attention_distance_fwd(
            q.to(w), k.to(w), v.to(w), _ext_rvec(plan, ts, q.device), plan.scale, plan.k_prefix, plan.q_offset,
            plan.causal, plan.topk or 0, EXT_BLOCK_ROWS, EXT_MIN_TASKS)
        return out.to(q.dtype), _flip(lse, rev), None
    qL = _flip(q, rev)
    outL = q.new_empty(b, h, nq, plan.dv)
    lseL = None
    kthL = torch.full((b, h, nq, 1), float("-inf"), dtype=plan.work, device=q.device) if plan.topk else None
    rvec = _rvec(plan, ts)
    for i0, i1, nkc in _chunks(plan):
        qc, kc, vc = _rows(plan, qL, i0, i1, rev), k[:, :, :nkc], v[:, :, :nkc]
        m, empty, kth = _chunk_mask(plan, ts, rvec, i0, i1, nkc, scores=lambda: _scores(plan, qc, kc))
        oc, lc = _core_fwd(plan, qc, kc, vc, m)
        if empty is not None:
            oc = oc.masked_fill(empty[..., None], 0.0)
        if lseL is None:
            lseL = torch.empty(b, h, nq, dtype=lc.dtype, device=q.device)
        _rows(plan, outL, i0, i1, rev).copy_(oc)
        _rows(plan, lseL[..., None], i0, i1, rev).copy_(lc[..., None])
        if kth is not None:
            _rows(plan, kthL, i0, i1, rev).copy_(kth)
    return _flip(outL, rev), lseL, kthL


DIAG_ROWS = 64  # rows per diagonal-sum view (the zero padding of the dS buffer is DIAG_ROWS - 1)


def _add_diagonal_sums(g: torch.Tensor, ds: torch.Tensor, off: int, scratch: Optional[_Scratch] = None) -> None:
    """``g[:, off + t] += sum of ds[..., r, j] over the batch and r + j = t``: the gradient of a
    Toeplitz view (``_toeplitz_view``) of ``g`` (float64, (h|1, R)); ``ds`` (b, h, c, nkc) is a
    view of a buffer whose rows end in at least ``DIAG_ROWS - 1`` zero columns. A block of ``k``
    rows is copied whole (padding included) to a float64 buffer, where a strided view with row
    stride (buffer row - 1) puts each anti-diagonal in one column (what it reads past a row's end
    is the padding): one float64 sum over the block's rows and the batch gives the block's
    diagonal sums. (Float32 sums are cheaper but measurably less accurate: these sums cancel.)"""
    b, h, c, nkc = ds.shape
    sb, sh, sr, one = ds.stride()
    assert one == 1 and sr >= nkc + min(c, DIAG_ROWS) - 1
    scratch = scratch or _Scratch(g.dtype, g.device)
    for r0 in range(0, c, DIAG_ROWS):
        k = min(DIAG_ROWS, c - r0)
        width = nkc + k - 1
        block = scratch.get("diag", b, h, k, sr)
        block.copy_(ds.as_strided((b, h, k, sr), (sb, sh, sr, 1), ds.storage_offset() + r0 * sr))
        view = block.as_strided((b, h, k, width), (h * k * sr, k * sr, sr - 1, 1))
        part = view.sum((0, 2)) if g.shape[0] == h else view.sum((0, 1, 2))[None]
        g[:, off + r0: off + r0 + width] += part


def _backward_plan(plan: _Plan, need) -> _Plan:
    """The plan of the backward: with a learned mask input (``need``) and the flash core, dS is
    formed by the math core, whose ``(b, h, c, nkc)`` temporaries get their own budget of rows
    per chunk (the rows of a chunk need not match the forward's: everything is per row); causal
    chunks cut keys, so smaller ones skip more of the masked half. Else the plan unchanged."""
    if any(need) and plan.flash:
        rows = max(16, min(MATERIALIZED_ELEMS, LEARNED_BWD_ELEMS) // max(1, plan.b * plan.h * plan.nk))
        plan = replace(plan, chunk=min(plan.chunk, rows, LEARNED_CAUSAL_CHUNK if plan.causal else rows))
    return plan


def _dense_accumulators(plan: _Plan, ts, need) -> list:
    """``[(index in ts, 4-D view, float64 accumulator)]`` for the dense learned inputs whose
    gradient ``need`` asks for: ``attn_mask`` (index 0) and a dense bias tensor (index 1). The
    view is the tensor with leading 1s up to 4-D (its broadcast shape against ``(b, h, nq, nk)``);
    the accumulator, float64 zeros of that shape."""
    am, bt = ts
    dense = []
    for idx, t in ((0, am), (1, bt if plan.dense_bias else None)):
        if need[idx] and t is not None:
            t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
            dense.append((idx, t4, torch.zeros(t4.shape, dtype=torch.float64, device=t.device)))
    return dense


def _accumulate_dense(dense: list, ds: torch.Tensor, rev: bool, i0: int, i1: int, nkc: int) -> None:
    """Adds one chunk's ``dS`` (b, h, c = i1 - i0, nkc), in the loop's row order (reversed when
    ``rev``), converted once to float64, into each accumulator of ``dense``
    (``_dense_accumulators``): summed to the input's broadcast shape, at query rows i0:i1 and
    keys 0:nkc (all of a broadcast dim of size 1)."""
    if not dense:
        return
    c = i1 - i0
    ds64 = ds.to(torch.float64)
    for _, t4, acc in dense:
        g = ds64.flip(2) if rev else ds64
        rows = slice(i0, i1) if t4.shape[-2] != 1 else slice(None)
        cols = slice(0, nkc) if t4.shape[-1] != 1 else slice(None)
        size = (t4.shape[0], t4.shape[1], c if t4.shape[-2] != 1 else 1, nkc if t4.shape[-1] != 1 else 1)
        acc[..., rows, cols] += g.sum_to_size(size)


def _distance_vector_grad(plan: _Plan, bt: torch.Tensor, g_rvec: torch.Tensor) -> torch.Tensor:
    """The gradient of the position bias's learned tensor ``bt`` (table or slopes), in ``bt``'s
    dtype, from ``g_rvec`` (float64, ``(h|1, nq + nk - 1)``), the gradient of the reversed
    distance vector: one small float64 autograd graph through ``_rvec``; distances whose entry is
    infinite (causal -inf) pass no gradient."""
    with torch.enable_grad():
        leaf = bt.to(torch.float64).requires_grad_()
        vec = _rvec(replace(plan, work=torch.float64), [None, leaf])
        return torch.autograd.grad(vec, leaf, g_rvec.masked_fill(torch.isinf(vec), 0.0))[0].to(bt.dtype)


def _ext_rvec(plan: _Plan, ts, device) -> torch.Tensor:
    """The reversed distance vector the extension reads: ``_rvec``, or zeros without a position
    bias or causal mask (top-k alone)."""
    if plan.toeplitz:
        return _rvec(plan, ts)
    return torch.zeros(1, plan.nq + plan.nk - 1, dtype=plan.work, device=device)


def _ext_backward(plan: _Plan, go, q, k, v, ts, need):
    """``_backward`` of an ``ext`` plan: ``xtk::attention_distance_bwd``, the math core's formulas in
    ``EXT_BLOCK_ROWS``-row blocks, the distance vector's gradient summed in float64 when the bias
    is learned. -> dq, dk, dv in the inputs' dtypes, [None, gradient of the bias's learned tensor | None]."""
    w = plan.work
    ts = [None if t is None else t.detach() for t in ts]
    learned = bool(need[1]) and plan.pos_bias is not None
    dq, dk, dv, g_rvec = _ext_ops().attention_distance_bwd(
        q.to(w), k.to(w), v.to(w), go.to(w), _ext_rvec(plan, ts, q.device), plan.scale, plan.k_prefix, plan.q_offset,
        plan.causal, plan.topk or 0, learned, EXT_BLOCK_ROWS, EXT_MIN_TASKS)
    dbias = _distance_vector_grad(plan, ts[1], g_rvec) if learned else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), [None, dbias]


def _backward(plan: _Plan, go, q, k, v, out, lseL, kthL, ts, need):
    """Gradients of q, k, v and of the learned mask inputs ``ts`` where ``need`` says so.

    Learned inputs get ``dS = P (dP - D)`` of every chunk, reduced in float64 (a sum over ~n^2
    logits): summed along diagonals into the distance vector (Toeplitz pieces), or summed to a
    dense piece's broadcast shape; the distance vector's gradient then flows to the table or
    slopes through one small autograd graph. An ``ext`` plan: ``_ext_backward``."""
    if plan.ext:
        return _ext_backward(plan, go, q, k, v, ts, need)
    plan = _backward_plan(plan, need)
    rev = plan.toeplitz
    w = plan.work
    qL, outL, goL = _flip(q, rev), _flip(out, rev), _flip(go, rev)
    dqL = torch.empty(q.shape, dtype=w, device=q.device)
    dk = torch.zeros(k.shape, dtype=w, device=k.device)
    dv = torch.zeros(v.shape, dtype=w, device=v.device)
    ts = [None if t is None else t.detach() for t in ts]
    rvec = _rvec(plan, ts)
    scratch, scratch64 = _Scratch(w, q.device), _Scratch(torch.float64, q.device)
    g_rvec = None
    if need[1] and plan.pos_bias is not None:
        g_rvec = torch.zeros(rvec.shape, dtype=torch.float64, device=q.device)
    dense = _dense_accumulators(plan, ts, need)
    for i0, i1, nkc in _chunks(plan):
        c = i1 - i0
        qc, kc, vc = _rows(plan, qL, i0, i1, rev), k[:, :, :nkc], v[:, :, :nkc]
        oc, gc = _rows(plan, outL, i0, i1, rev), _rows(plan, goL, i0, i1, rev)
        lc = _rows(plan, lseL[..., None], i0, i1, rev)[..., 0]
        kth = None if kthL is None else _rows(plan, kthL, i0, i1, rev)
        m, empty, _ = _chunk_mask(plan, ts, rvec, i0, i1, nkc, scores=lambda: _scores(plan, qc, kc), kth=kth)
        if empty is not None:
            gc = gc.masked_fill(empty[..., None], 0.0)
        if g_rvec is not None or dense:
            pad = min(c, DIAG_ROWS) - 1 if g_rvec is not None else 0
            dqc, dkc, dvc, ds = _math_bwd(plan, gc, qc, kc, vc, oc, lc, m, pad, scratch)
            _accumulate_dense(dense, ds, rev, i0, i1, nkc)
            if g_rvec is not None:
                if plan.k_prefix > 0:  # prefix keys carry no position bias (dS is not needed after this)
                    ds[..., : plan.k_prefix] = 0.0
                _add_diagonal_sums(g_rvec, ds, plan.nq - i0 - c, scratch64)
        else:
            dqc, dkc, dvc = _core_bwd(plan, gc, qc, kc, vc, oc, lc, m, scratch)
        _rows(plan, dqL, i0, i1, rev).copy_(dqc)
        dk[:, :, :nkc] += dkc
        dv[:, :, :nkc] += dvc
    dts = [None, None]
    if g_rvec is not None:
        dts[1] = _distance_vector_grad(plan, ts[1], g_rvec)
    for idx, t4, acc in dense:
        dts[idx] = acc.reshape(ts[idx].shape).to(ts[idx].dtype)
    return _flip(dqL, rev).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dts


def _graph_backward(ctx, go, q, k, v, am, bt, create_graph=True):
    """The gradients of q, k, v, am, bt as a differentiable graph (``create_graph=True``: double
    backward, gradient penalties): the eager reference recomputed on the saved inputs, by autograd.
    It materializes the ``(b, h, nq, nk)`` scores, as the eager backend does; the chunked backward
    is written with in-place and ``out=`` products (and the fused kernel's backward), which
    autograd cannot differentiate again. ``create_graph=False``: the reference's gradients of a
    call whose chunked backward gave NaN/inf (the NaN rule, see the module docstring)."""
    plan = ctx.plan
    with torch.enable_grad():
        # one view per input: the same tensor may come as q, k and v (self-attention on one x)
        # and must get each role's gradient, not the sum of all of them three times
        q, k, v, am, bt = (None if t is None else t.view_as(t) for t in (q, k, v, am, bt))
        bias = ctx.bias if bt is None else ctx.bias.with_learned(bt)
        out = reference.attention(q, k, v, am, is_causal=plan.causal, scale=plan.scale, bias=bias,
                                  topk=plan.topk, q_offset=plan.q_offset, k_prefix=plan.k_prefix)
    tensors = (q, k, v, am, bt)
    wanted = [i for i in range(5) if ctx.needs_input_grad[i + 2]]  # forward's inputs 2..6
    grads = torch.autograd.grad(out, [tensors[i] for i in wanted], go, create_graph=create_graph,
                                allow_unused=True)
    result = [None] * 5
    for i, g in zip(wanted, grads):
        result[i] = g
    return result


def _finite(*ts) -> bool:
    """No NaN/inf in ``ts``: one sum each (a fraction of ``isfinite().all()``'s cost; a sum that
    overflows only costs a recomputation by the reference)."""
    return all(t is None or bool(torch.isfinite(t.sum(dtype=torch.promote_types(t.dtype, torch.float32))))
               for t in ts)


def _saw_nonfinite(lse, q, k) -> bool:
    """Whether NaN/inf inputs reached the forward: a NaN/inf log-sum-exp, or one exactly 0, which
    the fused kernel gives (with a zero output row) for a row whose logits are all NaN; a finite
    row has log-sum-exp 0 only by chance, so then q and k themselves are checked. (One reduction:
    a few microseconds, next to a decode step's hundreds.)"""
    if not lse.numel():
        return False
    lo, hi = (x.item() for x in torch.aminmax(lse.abs()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return True
    return lo == 0 and not _finite(q, k)


def _rows_of(t, i0: int, i1: int):
    """Query rows i0:i1 of a mask or dense bias broadcastable to (b, h, nq, nk)."""
    return t if t is None or t.dim() < 2 or t.shape[-2] == 1 else t[..., i0:i1, :]


def _reference_rows(inputs, q, k, scale):
    """The eager reference (the NaN rule) on the prepared q, k (QK-norm, rotary, a learned scale
    applied), a chunk of query rows at a time: its (b, h, c, nk) scores stay within the budget of
    the fused path's masks, so NaN inputs at long context do not materialize the whole matrix."""
    b, h, nq, _ = q.shape
    c = max(16, MATERIALIZED_ELEMS // max(1, b * h * k.shape[2]))
    bias, outs = inputs.bias, []
    for i0 in range(0, nq, c):
        i1 = min(nq, i0 + c)
        rows_bias = bias.with_learned(_rows_of(bias.learned, i0, i1)) if bias is not None and bias.dense else bias
        outs.append(reference.attention(q[:, :, i0:i1], k, inputs.v, _rows_of(inputs.attn_mask, i0, i1),
                                        is_causal=inputs.is_causal, scale=scale, bias=rows_bias, topk=inputs.topk,
                                        q_offset=inputs.q_offset + i0, k_prefix=inputs.k_prefix))
    return torch.cat(outs, dim=2)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, bias, q, k, v, am, bt):
        out, lse, kth = _forward(plan, q, k, v, [am, bt])
        ctx.plan, ctx.bias = plan, bias
        ctx.save_for_backward(q, k, v, out, lse, kth, am, bt)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, go, _):
        q, k, v, out, lse, kth, am, bt = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the backward itself must be differentiable
            return (None, None, *_graph_backward(ctx, go, q, k, v, am, bt))
        need = [ctx.needs_input_grad[5] and am is not None and am.is_floating_point(),
                ctx.needs_input_grad[6] and bt is not None and bt.is_floating_point()]
        dq, dk, dv, dts = _backward(ctx.plan, go, q, k, v, out, lse, kth, [am, bt], need)
        if not _finite(dq, dk, dv, *dts):  # NaN/inf inputs (0 x NaN where a masked pair meets them)
            return (None, None, *_graph_backward(ctx, go, q, k, v, am, bt, create_graph=False))
        return None, None, dq, dk, dv, dts[0], dts[1]


# ----------------------------------------------------------------------------- entry
def _prepare(inputs):
    """QK-norm and rotary/xpos on q and k (ordinary autograd), and the logit scale as a float."""
    # a learned logit scale is folded into q so that it gets its gradient (the reference's NaN-rule
    # handling of poisoned rows included)
    q, k, scale = _qk_features(inputs.q, inputs.k, inputs.scale, inputs.qk_norm, inputs.rotary, inputs.q_offset,
                               inputs.k_prefix, fold_scale=True)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return q, k, float(scale)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim has stride 1, else a contiguous copy: the fused CPU kernel
    (forward and backward) reads each row of q, k and v as contiguous memory and ignores a last-dim
    stride (transposed, ``[..., ::2]`` and expanded last dims gave wrong outputs). Its other strides,
    0 included, and every stride of the mask are honored, so nothing else is copied."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def run(inputs):
    inputs, back = in_interleave_order(inputs)  # gqa_order='repeat': the fused kernel knows SDPA's order only
    out = _run(inputs)
    return out if back is None else out.index_select(1, back)


def _run(inputs):
    q, k, scale = _prepare(inputs)
    v = inputs.v
    b, h, nq, _ = q.shape
    if nq == 0 or k.shape[2] == 0:
        return q.new_zeros(b, h, nq, v.shape[3]) + 0.0 * (q.sum() + k.sum() + v.sum())
    am, bt = _learned(inputs)
    plan = _make_plan(inputs, q, scale)
    if plan.flash:
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    tensors = (q, k, v, am, bt)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, lse = _Attention.apply(plan, inputs.bias, q, k, v, am, bt)
    else:
        out, lse, _ = _forward(plan, q, k, v, [am, bt])
    if _saw_nonfinite(lse, q, k):  # the eager reference follows the NaN rule
        return _reference_rows(inputs, q, k, scale)
    return out


BACKEND = backends.Backend("chunked", "attention", reasons, run)
