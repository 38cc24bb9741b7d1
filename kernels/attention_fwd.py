"""Attention forward: the top-k threshold pass and the flash-attention-2 style forward kernel.

One program per (query block, batch * head). Online softmax in fp32, log-sum-exp saved for
the backward as two numbers per row, the row max ``m`` and the row sum ``l`` (STATS is
(b*h, 2, nq)): the backward's ``exp(s - m) / l`` is then as accurate as an eager softmax (a
folded ``exp(s - (m + log l))`` loses ``|s - m| * eps`` more, which the ALiBi slope gradient
amplifies). A row with no unmasked key stores output 0 and ``m = +inf`` (so the recomputed P is 0
everywhere).

NAN_GUARD, the twins of the NaN rule (README "NaN, inf and masking"), launched after the everyday
kernel (NAN_GUARD 0) to overwrite its results where the rule needs selects that spilled shipped
tiles when built into it (12-88 B, 2026-11-27): 1, with a float mask or dense bias, returns at
once unless the device flag NANF says q, k or v holds a NaN/inf, and otherwise redoes its block
with a -inf float entry masking a NaN logit (``_dense_tile``) and an empty row's output 0 where a
masked key's v is NaN (0 x NaN in ``acc``); 2, on every other call (``attention_op.fwd_guard``),
only stores 0 in the rows the everyday kernel found empty (its stored ``m = +inf, l = 1``): it
reads the row statistics and writes nothing else.

GQA: query head ``h`` reads kv head ``h // (H // HK)``, or ``h % HK`` under GQA_REPEAT.
VARLEN (a packed batch, ``attention_common._seq_span``): batch entries are sequences, NQ / NK the
longest lengths allowed, so STATS and THR are (B*h, [2,] max_seqlen_q) with each sequence's rows first.

Top-k (HAS_TOPK): ``_attn_topk_threshold`` streams the key blocks, keeps the K2 (a power of two
>= topk) largest logits of each row in a (BLOCK_M, K2) buffer merged tile by tile -- by extraction
(``_merge_by_extraction``, the nearest key block first) for K2 <= THR_K2, else with ``tl.topk``
(a bitonic network over the whole tile whatever the data: 2.9x the plain forward's time at topk
8, b4 h16 n4096 d128 bf16 on an H200, 2026-11-28, when it served every K2) -- and stores the row's topk-th largest unmasked logit (-inf when the row has fewer
than topk unmasked keys, i.e. keep all; NaN logits rank first, as in torch.topk, and a NaN
threshold keeps all; the guard twin ranks +inf next, so that topk +inf logits keep only those). The forward and backward then mask ``s < threshold`` (never a NaN logit).
"""
import triton
import triton.language as tl

from .attention_common import (NOT_SPECIALIZED, _causal_key_end, _dropout_keep, _fold, _head_bias, _load_kt, _load_q,
                               _logits, _query_program, _seq_span, _tile_ptrs)
from .tiles import THR_K2

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # the largest finite float32
EXTRACT_MAX_K2 = tl.constexpr(THR_K2)  # buffers up to this merge tiles by extraction, wider ones by tl.topk


@triton.jit
def _ranked_logits(q, k_base, start_n, offs_m, offs_n0, offs_d, skn, skd, off_b, off_h, nq, nk, D, q_offset,
                   k_prefix, sm_scale, slope, tab, stab_l, tab_center, MASK, smb, smh, smm, smn,
                   BIAS, sbb, sbh, sbm, sbn, IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr,
                   MASK_KIND: tl.constexpr, PRECISION: tl.constexpr, NAN_GUARD: tl.constexpr):
    """The threshold pass's logits of one key block (BLOCK_M, BLOCK_N) fp32, ranked: NaN ranks above
    everything (as in torch.topk) as +inf; the guard twin ranks +inf just below it (as the largest
    finite float), so that a k-th that is +inf stays one."""
    offs_n = start_n + offs_n0
    kt = _load_kt(k_base, offs_n, offs_d, skn, skd, nk, D)
    s = _logits(tl.dot(q, kt, input_precision=PRECISION), offs_m, offs_n, off_b, off_h, nq, nk, q_offset,
                k_prefix, sm_scale, slope, tab, stab_l, tab_center,
                MASK, smb, smh, smm, smn, BIAS, sbb, sbh, sbm, sbn, IS_CAUSAL, BIAS_KIND, MASK_KIND, NAN_GUARD)
    if NAN_GUARD:
        return tl.where(s != s, float("inf"), tl.where(s == float("inf"), FLT_MAX, s))
    return tl.where(s != s, float("inf"), s)


@triton.jit
def _merge_by_extraction(ranked_s, best, floor, at, offs_n0):
    """Merge one tile into the rows' K2 largest so far: while some row's largest remaining tile value
    beats its floor (the smallest kept), that value replaces one copy of the floor and leaves the tile.

    ranked_s: (BLOCK_M, BLOCK_N) fp32, no NaN; best: (BLOCK_M, K2) fp32, unordered, the multiset of
    the K2 largest values seen; floor, at: (BLOCK_M,) its minimum and a column holding it. Exact:
    when the loop stops every value left in the tile is <= its row's floor. Rounds: one per value
    that enters (K2 at most per row), plus one; few once the buffer holds the row's large values.
    floor and at are carried from tile to tile although ``best`` determines them: taken afresh per
    tile (one tl.min more), ptxas spilled 20-64 B in 3 of the CI set's 65 thr specializations
    (sm_80 TF32 d128 and fp32 d64 top-k 32; sm_90 fp32 d64 under 3.6; AOT 2026-11-28)."""
    cols = tl.arange(0, best.shape[1])
    top, where_top = tl.max(ranked_s, axis=1, return_indices=True)
    while tl.max((top > floor).to(tl.int32), axis=0) > 0:
        enter = top > floor
        best = tl.where(enter[:, None] & (cols[None, :] == at[:, None]), top[:, None], best)
        ranked_s = tl.where(enter[:, None] & (offs_n0[None, :] == where_top[:, None]), float("-inf"), ranked_s)
        floor, at = tl.min(best, axis=1, return_indices=True)
        top, where_top = tl.max(ranked_s, axis=1, return_indices=True)
    return best, floor, at


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _attn_topk_threshold(
        Q, K, THR, SLOPES, TAB, MASK, BIAS, CU_Q, CU_K, NANF,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd,
        stab_l, stab_h, tab_center, smb, smh, smm, smn, sbb, sbh, sbm, sbn,
        H, HK, NQ, NK, D, q_offset, k_prefix, sm_scale, TOPK,
        IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
        GQA_REPEAT: tl.constexpr, VARLEN: tl.constexpr, NAN_GUARD: tl.constexpr,
        K2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    if NAN_GUARD:  # the guard twin: runs only when the inputs hold NaN/inf (the device flag NANF)
        if tl.load(NANF) == 0:
            return
    pid_m, off_bh, off_b, off_h, off_hk, start_m = _query_program(H, HK, NQ, BLOCK_M, GQA_REPEAT)
    q0, nq, k0, nk, _ = _seq_span(CU_Q, CU_K, off_b, NQ, NK, q_offset, k_prefix, 0, VARLEN)
    if VARLEN:
        if start_m >= nq:  # a block past its sequence's end
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_q(Q + off_b.to(tl.int64) * sqb + q0 * sqm + off_h.to(tl.int64) * sqh, offs_m, offs_d, sqm, sqd, nq, D)
    k_base = K + off_b.to(tl.int64) * skb + k0 * skn + off_hk.to(tl.int64) * skh
    slope, tab = _head_bias(SLOPES, TAB, off_h, stab_h, BIAS_KIND)
    end_n = _causal_key_end(start_m, BLOCK_M, nk, q_offset, k_prefix, IS_CAUSAL)
    best = tl.full([BLOCK_M, K2], float("-inf"), tl.float32)
    if K2 <= EXTRACT_MAX_K2:
        floor, at = tl.min(best, axis=1, return_indices=True)  # the row's K2-th largest so far, and where
        last_n = tl.cdiv(end_n, BLOCK_N) - 1
        for i in range(0, last_n + 1):
            # the nearest key block first: a recency bias (ALiBi, causal) puts the largest logits
            # there, and later blocks then rarely enter the buffer
            ranked_s = _ranked_logits(
                q, k_base, (last_n - i) * BLOCK_N, offs_m, offs_n0, offs_d, skn, skd, off_b, off_h, nq, nk, D,
                q_offset, k_prefix, sm_scale, slope, tab, stab_l, tab_center, MASK, smb, smh, smm, smn,
                BIAS, sbb, sbh, sbm, sbn, IS_CAUSAL, BIAS_KIND, MASK_KIND, PRECISION, NAN_GUARD)
            if K2 == 1:  # the row's maximum
                best = tl.maximum(best, tl.max(ranked_s, axis=1, keep_dims=True))
            else:
                best, floor, at = _merge_by_extraction(ranked_s, best, floor, at, offs_n0)
    else:
        for start_n in range(0, end_n, BLOCK_N):
            ranked_s = _ranked_logits(
                q, k_base, start_n, offs_m, offs_n0, offs_d, skn, skd, off_b, off_h, nq, nk, D,
                q_offset, k_prefix, sm_scale, slope, tab, stab_l, tab_center, MASK, smb, smh, smm, smn,
                BIAS, sbb, sbh, sbm, sbn, IS_CAUSAL, BIAS_KIND, MASK_KIND, PRECISION, NAN_GUARD)
            tile_top = tl.topk(ranked_s, K2, dim=1)
            best = tl.topk(tl.reshape(tl.join(best, tile_top), [BLOCK_M, 2 * K2]), K2, dim=1)
    # the topk-th largest of the kept multiset (sorted largest first); +inf there means topk NaN
    # (or, in the everyday kernel, +inf) logits: NaN, which keeps every key (the reference's
    # threshold is NaN when topk logits are NaN; with topk +inf ones it keeps only those, as the
    # guard twin does: the row is NaN either way, but the keys it drops must get no gradient)
    ranked = tl.sort(best, dim=1, descending=True)
    col = tl.arange(0, K2)
    kth = tl.max(tl.where(col[None, :] == TOPK - 1, ranked, float("-inf")), axis=1)
    kth = tl.where(kth == float("inf"), float("nan"), kth)
    if NAN_GUARD:
        kth = tl.where(kth == FLT_MAX, float("inf"), kth)
    tl.store(THR + off_bh.to(tl.int64) * NQ + offs_m, kth, mask=offs_m < nq)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _attn_fwd(
        Q, K, V, O, STATS, THR, SLOPES, TAB, MASK, BIAS, CU_Q, CU_K, NANF,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        stab_l, stab_h, tab_center, smb, smh, smm, smn, sbb, sbh, sbm, sbn,
        H, HK, NQ, NK, D, DV, q_offset, k_prefix, sm_scale, dropout_p, SEED,
        IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, MASK_KIND: tl.constexpr, HAS_TOPK: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        GQA_REPEAT: tl.constexpr, VARLEN: tl.constexpr, NAN_GUARD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    if NAN_GUARD == 1:  # the guard twin: runs only when the inputs hold NaN/inf (the device flag NANF)
        if tl.load(NANF) == 0:
            return
    pid_m, off_bh, off_b, off_h, off_hk, start_m = _query_program(H, HK, NQ, BLOCK_M, GQA_REPEAT)
    q0, nq, k0, nk, _ = _seq_span(CU_Q, CU_K, off_b, NQ, NK, q_offset, k_prefix, 0, VARLEN)
    if VARLEN:
        if start_m >= nq:  # a block past its sequence's end
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < nq
    if NAN_GUARD == 2:  # the empty-row twin: the rows the everyday kernel found empty get 0
        m_prev = tl.load(STATS + off_bh.to(tl.int64) * 2 * NQ + offs_m, mask=row_ok, other=0.0)
        l_prev = tl.load(STATS + off_bh.to(tl.int64) * 2 * NQ + NQ + offs_m, mask=row_ok, other=0.0)
        empty = row_ok & (m_prev == float("inf")) & (l_prev == 1.0)  # (a +inf logit's row: m = +inf, l NaN)
        zero = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32).to(O.dtype.element_ty)
        o_base = O + off_b.to(tl.int64) * sob + q0 * som + off_h.to(tl.int64) * soh
        tl.store(_tile_ptrs(o_base, offs_m, offs_dv, som, sod), zero, mask=empty[:, None] & (offs_dv[None, :] < DV))
        return
    q = _load_q(Q + off_b.to(tl.int64) * sqb + q0 * sqm + off_h.to(tl.int64) * sqh, offs_m, offs_d, sqm, sqd, nq, D)
    k_base = K + off_b.to(tl.int64) * skb + k0 * skn + off_hk.to(tl.int64) * skh
    v_base = V + off_b.to(tl.int64) * svb + k0 * svn + off_hk.to(tl.int64) * svh
    slope, tab = _head_bias(SLOPES, TAB, off_h, stab_h, BIAS_KIND)
    if HAS_TOPK:
        thr = tl.load(THR + off_bh.to(tl.int64) * NQ + offs_m, mask=row_ok, other=float("-inf"))
    if HAS_DROPOUT:
        seed = tl.load(SEED)  # drawn on the device per call (CUDA graphs replay a fresh one)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    end_n = _causal_key_end(start_m, BLOCK_M, nk, q_offset, k_prefix, IS_CAUSAL)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < nk
        kt = _load_kt(k_base, offs_n, offs_d, skn, skd, nk, D)
        s = _logits(tl.dot(q, kt, input_precision=PRECISION), offs_m, offs_n, off_b, off_h, nq, nk, q_offset,
                    k_prefix, sm_scale, slope, tab, stab_l, tab_center,
                    MASK, smb, smh, smm, smn, BIAS, sbb, sbh, sbm, sbn, IS_CAUSAL, BIAS_KIND, MASK_KIND, NAN_GUARD)
        if HAS_TOPK:  # a NaN logit is never dropped (NaN < thr is false): its row stays NaN
            s = tl.where(s < thr[:, None], float("-inf"), s)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, off_bh, offs_m, offs_n, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = tl.load(_tile_ptrs(v_base, offs_n, offs_dv, svn, svd), mask=col_ok[:, None] & (offs_dv[None, :] < DV),
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if NAN_GUARD == 1:  # a row with no unmasked key is 0 even where a masked key's v was NaN (0 x NaN in acc)
        out = tl.where(empty[:, None], 0.0, out)
    m_row = tl.where(empty, float("inf"), m_i)
    l_row = tl.where(empty, 1.0, l_i)
    tl.store(_tile_ptrs(O + off_b.to(tl.int64) * sob + q0 * som + off_h.to(tl.int64) * soh, offs_m, offs_dv, som, sod),
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(STATS + off_bh.to(tl.int64) * 2 * NQ + offs_m, m_row, mask=row_ok)
    tl.store(STATS + off_bh.to(tl.int64) * 2 * NQ + NQ + offs_m, l_row, mask=row_ok)


@triton.jit(do_not_specialize=["NQ", "NK"])
def _dropout_mask_kernel(OUT, H, NQ, NK, dropout_p, SEED, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Debug: the boolean keep-mask (b*h, nq, nk) the forward and backward draw for the seed at ``SEED``.
    One program per (query block, batch * head), as the forward, walking the key blocks."""
    pid_m, off_bh = _fold(tl.cdiv(NQ, BLOCK_M))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(SEED)
    out = OUT + off_bh.to(tl.int64) * NQ * NK
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, off_bh, offs_m, offs_n, dropout_p)
        tl.store(out + (offs_m.to(tl.int64)[:, None] * NK + offs_n[None, :]), keep.to(tl.int8),
                 mask=(offs_m[:, None] < NQ) & (offs_n[None, :] < NK))  # int64: nq * nk passes 2^31
