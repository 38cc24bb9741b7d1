"""Attention backward: recompute P from the saved row max and log-sum (see attention_fwd), then dK/dV and dQ (flash-attention-2).

``delta = rowsum(dO * O)`` is the preprocess (computed by the launcher, O(n)). With
``dS = P * (dP - delta)`` (the gradient of the biased logits):
- ``_attn_bwd_dkdv``: one program per (key block, batch * kv head, slice of the GQA group); it
  loops over the query heads of its slice and over the query blocks, so dK/dV are written once, no
  atomics. The slice is the whole group unless GROUP_SPLIT (the launcher's ``dkdv_split``: only
  where the plain grid would leave SMs idle, e.g. MQA at batch 1): then ``n_split`` programs share
  the group and slice s writes its fp32 partial dK/dV as heads ``s * HK + kv head`` of buffers the
  launcher sums over s (deterministic). A switch, not a runtime branch: the everyday kernel stays
  the code the tile tables were chosen on (the split's index math moved ptxas's register counts
  by up to +70 in the heavy classes when always compiled in).
- ``_attn_bwd_dq``: one program per (query block, batch * head) over the key blocks; it also
  produces the gradients of the learned bias inputs in its one pass over the keys (before
  2026-11-29 every learned input's gradient took a first pass more, two more products per tile,
  for delta and l from the kernel's own logits; now only a dense bias's dS and the guard twin do,
  and the slope and logit-scale sums, whose weights amplify the saved delta's rounding, form their
  own delta in the same pass: ``ROW_FIX``): ALiBi slope partials per program
  (summed by the launcher: deterministic), distance-table gradient as each tile's diagonal sums
  (``_table_grad_tile``: BLOCK_M + BLOCK_N - 1 relaxed atomics per tile, not one per element; a
  tile wholly beyond an edge of the table -- most of a T5 table's, which ends where its buckets
  saturate -- adds to a running sum instead, one atomic per edge per program;
  unordered, so in deterministic mode the launcher takes dS whole and sums its diagonals
  instead), dense-bias gradient as the
  dS tile stored into a (b, h, nq, nk) buffer (only when a dense bias requires grad).
NaN rule (README "NaN, inf and masking"): the everyday kernels break it where a masked pair meets
NaN/inf (a NaN row's statistics make P NaN on its masked pairs too; a masked NaN/inf q or k row
reaches dK, dQ as 0 x NaN inside ``dS^T @ Q`` / ``dS @ K``; delta = dO . O is NaN where a masked
key's v made O NaN), and each in-kernel fix spilled shipped tiles (2026-11-27: selects on P and dS
up to 860 B on fp32 tiles; zeroing the operand tiles up to 1,860 B). So the rule lives in guard
twins (NAN_GUARD): the launcher runs the everyday dK/dV and dQ kernels, then the dQ twin, then the
dK/dV twin; each twin returns at once unless the device flag NANF says q, k or v holds a NaN/inf,
and otherwise redoes its block with the selects (P and dS 0 on masked pairs, ``_finite`` operands
in the gradient products, delta recomputed as the sum of P dP over unmasked pairs and stored for
the dK/dV twin) and overwrites the everyday results (the table gradient goes to a buffer of its
own: the everyday kernel's atomics cannot be taken back).
Dropout: the same counter-based keep-mask as the forward (``_dropout_keep``), keyed by the seed
the forward drew on the device (``SEED``, a pointer: no host sync).
Grids: one axis, (blocks x batch * heads) folded (``_fold``), so no axis meets CUDA's 65,535 limit.
"""
import triton
import triton.language as tl

from .attention_common import (NOT_SPECIALIZED, _causal_key_end, _causal_query_start, _dropout_keep, _finite, _fold,
                               _head_bias, _load_kt, _load_q, _logits, _query_program, _seq_span, _table_grad_tile,
                               _tile_ptrs, _tile_ptrs_t)


# n_split unspecialized: one compiled GROUP_SPLIT kernel serves every split count
@triton.jit(do_not_specialize=NOT_SPECIALIZED + ["n_split"])
def _attn_bwd_dkdv(
        Q, K, V, DO, DK, DV_, STATS, DELTA, THR, SLOPES, TAB, MASK, BIAS, CU_Q, CU_K, NANF,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
        sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
        stab_l, stab_h, tab_center, smb, smh, smm, smn, sbb, sbh, sbm, sbn,
        H, HK, NQ, NK, D, DV, q_offset, k_prefix, sm_scale, dropout_p, SEED, n_split,
        IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, MASK_KIND: tl.constexpr, HAS_TOPK: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        GQA_REPEAT: tl.constexpr, VARLEN: tl.constexpr, NAN_GUARD: tl.constexpr, GROUP_SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    if NAN_GUARD:  # the guard twin: runs only when q, k or v holds NaN/inf (the device flag NANF)
        if tl.load(NANF) == 0:
            return
    n_kblocks = tl.cdiv(NK, BLOCK_N)
    pid_n, off_bhk = _fold(n_kblocks)
    group = H // HK
    g_start, g_end, split = 0, group, 0
    if GROUP_SPLIT:  # n_split programs per (key block, batch * kv head), each a slice of the group
        split = off_bhk % n_split
        off_bhk = off_bhk // n_split
        g_start = split * tl.cdiv(group, n_split)
        g_end = tl.minimum(group, g_start + tl.cdiv(group, n_split))
    off_b = off_bhk // HK
    off_hk = off_bhk % HK
    start_n = pid_n * BLOCK_N
    q0, nq, k0, nk, _ = _seq_span(CU_Q, CU_K, off_b, NQ, NK, q_offset, k_prefix, 0, VARLEN)
    if VARLEN:
        if start_n >= nk:  # a key block past its sequence's end
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < nk
    k_base = K + off_b.to(tl.int64) * skb + k0 * skn + off_hk.to(tl.int64) * skh
    kt = _load_kt(k_base, offs_n, offs_d, skn, skd, nk, D)
    vt = tl.load(_tile_ptrs_t(V + off_b.to(tl.int64) * svb + k0 * svn + off_hk.to(tl.int64) * svh, offs_dv, offs_n,
                              svd, svn),
                 mask=col_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    start_q = _causal_query_start(start_n, BLOCK_M, q_offset, k_prefix, IS_CAUSAL)
    for g in range(g_start, g_end):
        if GQA_REPEAT:  # x-transformers' order: query head h reads kv head h % HK
            off_h = g * HK + off_hk
        else:  # SDPA's: query head h reads kv head h // group
            off_h = off_hk * group + g
        off_bh = off_b * H + off_h
        q_base = Q + off_b.to(tl.int64) * sqb + q0 * sqm + off_h.to(tl.int64) * sqh
        do_base = DO + off_b.to(tl.int64) * sdob + q0 * sdom + off_h.to(tl.int64) * sdoh
        slope, tab = _head_bias(SLOPES, TAB, off_h, stab_h, BIAS_KIND)
        for start_m in range(start_q, nq, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < nq
            q = _load_q(q_base, offs_m, offs_d, sqm, sqd, nq, D)
            do = tl.load(_tile_ptrs(do_base, offs_m, offs_dv, sdom, sdod),
                         mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            m_row = tl.load(STATS + off_bh.to(tl.int64) * 2 * NQ + offs_m, mask=row_ok, other=float("inf"))
            inv_l = 1.0 / tl.load(STATS + off_bh.to(tl.int64) * 2 * NQ + NQ + offs_m, mask=row_ok, other=1.0)
            delta = tl.load(DELTA + off_bh.to(tl.int64) * NQ + offs_m, mask=row_ok, other=0.0)
            s = _logits(tl.dot(q, kt, input_precision=PRECISION), offs_m, offs_n, off_b, off_h, nq, nk, q_offset,
                        k_prefix, sm_scale, slope, tab, stab_l, tab_center,
                        MASK, smb, smh, smm, smn, BIAS, sbb, sbh, sbm, sbn, IS_CAUSAL, BIAS_KIND, MASK_KIND,
                        NAN_GUARD)
            if HAS_TOPK:
                thr = tl.load(THR + off_bh.to(tl.int64) * NQ + offs_m, mask=row_ok, other=float("-inf"))
                s = tl.where(s < thr[:, None], float("-inf"), s)
            p = tl.exp(s - m_row[:, None]) * inv_l[:, None]
            if NAN_GUARD:  # a masked pair's P is 0 even in a NaN row (exp(-inf - NaN))
                p = tl.where(s == float("-inf"), 0.0, p)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, off_bh, offs_m, offs_n, dropout_p)
                pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            else:
                pd = p
            dv += tl.dot(tl.trans(pd).to(do.dtype), do, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if NAN_GUARD:  # nothing flows back through a masked pair (0 x NaN where its v is NaN)
                ds = tl.where(s == float("-inf"), 0.0, ds)
                q = _finite(q)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    dk = dk * sm_scale
    if GROUP_SPLIT:  # slice s writes heads s * HK + kv head of the fp32 partial buffers
        off_hk = split * HK + off_hk
    tl.store(_tile_ptrs(DK + off_b.to(tl.int64) * sdkb + k0 * sdkn + off_hk.to(tl.int64) * sdkh, offs_n, offs_d, sdkn,
                        sdkd), dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(_tile_ptrs(DV_ + off_b.to(tl.int64) * sdvb + k0 * sdvn + off_hk.to(tl.int64) * sdvh, offs_n, offs_dv, sdvn,
                        sdvd),
             dv.to(DV_.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_key_tile(q, do, thr, seed, k_base, v_base, offs_m, offs_n, offs_d, offs_dv, off_b, off_h, off_bh,
                 skn, skd, svn, svd, NQ, NK, D, DV, q_offset, k_prefix, sm_scale, dropout_p, slope, tab, stab_l,
                 tab_center, MASK, smb, smh, smm, smn, BIAS, sbb, sbh, sbm, sbn,
                 IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, MASK_KIND: tl.constexpr,
                 HAS_TOPK: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, NAN_GUARD: tl.constexpr):
    """One key block of the dQ kernel's loops (its delta pass and its gradient pass): the k tile
    (transposed), ``q.k`` (fp32), the masked logits (top-k applied, masked = -inf) and ``dP = dO
    . v`` (dropout applied), each (BLOCK_M, BLOCK_N)."""
    col_ok = offs_n < NK
    kt = _load_kt(k_base, offs_n, offs_d, skn, skd, NK, D)
    vt = tl.load(_tile_ptrs_t(v_base, offs_dv, offs_n, svd, svn), mask=col_ok[None, :] & (offs_dv[:, None] < DV),
                 other=0.0)
    qk = tl.dot(q, kt, input_precision=PRECISION)
    s = _logits(qk, offs_m, offs_n, off_b, off_h, NQ, NK, q_offset, k_prefix, sm_scale, slope, tab, stab_l,
                tab_center, MASK, smb, smh, smm, smn, BIAS, sbb, sbh, sbm, sbn, IS_CAUSAL, BIAS_KIND, MASK_KIND,
                NAN_GUARD)
    if HAS_TOPK:
        s = tl.where(s < thr[:, None], float("-inf"), s)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, off_bh, offs_m, offs_n, dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    return kt, qk, s, dp


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _attn_bwd_dq(
        Q, K, V, DO, DQ, STATS, DELTA, THR, SLOPES, TAB, MASK, BIAS, DSLOPE, DTAB, DS, DLSC, CU_Q, CU_K, NANF,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
        sdqb, sdqh, sdqm, sdqd,
        stab_l, stab_h, tab_center, smb, smh, smm, smn, sbb, sbh, sbm, sbn,
        H, HK, NQ, NK, D, DV, q_offset, k_prefix, sm_scale, dropout_p, SEED,
        IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, MASK_KIND: tl.constexpr, HAS_TOPK: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        GQA_REPEAT: tl.constexpr, VARLEN: tl.constexpr, NAN_GUARD: tl.constexpr,
        NEED_DSLOPE: tl.constexpr, NEED_DTAB: tl.constexpr, NEED_DS: tl.constexpr, NEED_DLSC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    if NAN_GUARD:  # the guard twin: runs only when q, k or v holds NaN/inf (the device flag NANF)
        if tl.load(NANF) == 0:
            return
    pid_m, off_bh, off_b, off_h, off_hk, start_m = _query_program(H, HK, NQ, BLOCK_M, GQA_REPEAT)
    q0, nq, k0, nk, _ = _seq_span(CU_Q, CU_K, off_b, NQ, NK, q_offset, k_prefix, 0, VARLEN)
    if VARLEN:
        if start_m >= nq:  # a block past its sequence's end (its partial-sum slots stay 0)
            return
    n_mblocks = tl.cdiv(NQ, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < nq
    q_base = Q + off_b.to(tl.int64) * sqb + q0 * sqm + off_h.to(tl.int64) * sqh
    q = _load_q(q_base, offs_m, offs_d, sqm, sqd, nq, D)
    do = tl.load(_tile_ptrs(DO + off_b.to(tl.int64) * sdob + q0 * sdom + off_h.to(tl.int64) * sdoh, offs_m, offs_dv,
                            sdom, sdod),
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    m_row = tl.load(STATS + off_bh.to(tl.int64) * 2 * NQ + offs_m, mask=row_ok, other=float("inf"))
    inv_l = 1.0 / tl.load(STATS + off_bh.to(tl.int64) * 2 * NQ + NQ + offs_m, mask=row_ok, other=1.0)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * NQ + offs_m, mask=row_ok, other=0.0)
    thr = 0.0  # read only under HAS_TOPK
    if HAS_TOPK:
        thr = tl.load(THR + off_bh.to(tl.int64) * NQ + offs_m, mask=row_ok, other=float("-inf"))
    seed = 0  # read only under HAS_DROPOUT
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    k_base = K + off_b.to(tl.int64) * skb + k0 * skn + off_hk.to(tl.int64) * skh
    v_base = V + off_b.to(tl.int64) * svb + k0 * svn + off_hk.to(tl.int64) * svh
    slope, tab = _head_bias(SLOPES, TAB, off_h, stab_h, BIAS_KIND)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dslope = tl.zeros([BLOCK_M], tl.float32)
    dlsc = tl.zeros([BLOCK_M], tl.float32)
    dtab_lo = tl.zeros([BLOCK_M], tl.float32)  # NEED_DTAB: dS of the tiles wholly beyond the table's lower / upper edge
    dtab_hi = tl.zeros([BLOCK_M], tl.float32)
    # ... and, in one pass (ROW_FIX below), the slope and scale sums' second halves: sum w e (the first: sum w e dP)
    dslope_e = tl.zeros([BLOCK_M], tl.float32)
    dlsc_e = tl.zeros([BLOCK_M], tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)  # sum_j e and sum_j e dP, e = exp(s - m): this kernel's own l and l * delta
    pdp = tl.zeros([BLOCK_M], tl.float32)
    pi = q_offset + offs_m
    end_n = _causal_key_end(start_m, BLOCK_M, nk, q_offset, k_prefix, IS_CAUSAL)
    # The slope and logit-scale gradients sum dS over whole rows with large weights (|p_i - p_j| up
    # to n; q'.k'), which amplifies the rounding of delta = dO . O (O rounded to 16 bits) and of the
    # online-softmax row sum l: they take l = sum_j e and delta = sum_j e dP / l from this kernel's
    # own logits, e = exp(s - m). ROW_FIX: in the gradient pass itself, as per-row sums of w e dP and
    # w e (sum_j w dS = (sum_j w e dP - delta sum_j w e) / l once the row is done). The dense bias
    # gradient (dS stored whole) and the guard twin (over unmasked pairs only: dO . O is NaN where a
    # masked key's v is) take a first pass over the keys for l and delta. Everything else -- dQ, the
    # table gradient -- takes the saved l and delta, as dK/dV does (bf16, 4 draws: a T5 table's
    # saturated edge bucket 0.06x the eager error so, 0.04x with its own delta; the ALiBi slope 0.81x
    # so, 0.18x with it: tests/test_attention_triton.py).
    ROW_FIX: tl.constexpr = (NEED_DSLOPE or NEED_DLSC) and not (NEED_DS or NAN_GUARD)
    if NEED_DS or NAN_GUARD:
        for start_n in range(0, end_n, BLOCK_N):
            offs_n = start_n + offs_n0
            kt, qk, s, dp = _dq_key_tile(
                q, do, thr, seed, k_base, v_base, offs_m, offs_n, offs_d, offs_dv, off_b, off_h, off_bh,
                skn, skd, svn, svd, nq, nk, D, DV, q_offset, k_prefix, sm_scale, dropout_p, slope, tab, stab_l,
                tab_center, MASK, smb, smh, smm, smn, BIAS, sbb, sbh, sbm, sbn,
                IS_CAUSAL, BIAS_KIND, MASK_KIND, HAS_TOPK, HAS_DROPOUT, PRECISION, NAN_GUARD)
            e = tl.exp(s - m_row[:, None])
            edp = e * dp
            if NAN_GUARD:
                e = tl.where(s == float("-inf"), 0.0, e)
                edp = tl.where(s == float("-inf"), 0.0, edp)
            l_sum += tl.sum(e, axis=1)
            pdp += tl.sum(edp, axis=1)
        inv_l = 1.0 / tl.where(l_sum == 0.0, 1.0, l_sum)
        delta = pdp * inv_l
        if NAN_GUARD:  # for the dK/dV twin, which runs next
            tl.store(DELTA + off_bh.to(tl.int64) * NQ + offs_m, delta, mask=row_ok)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < nk
        kt, qk, s, dp = _dq_key_tile(
            q, do, thr, seed, k_base, v_base, offs_m, offs_n, offs_d, offs_dv, off_b, off_h, off_bh,
            skn, skd, svn, svd, nq, nk, D, DV, q_offset, k_prefix, sm_scale, dropout_p, slope, tab, stab_l,
            tab_center, MASK, smb, smh, smm, smn, BIAS, sbb, sbh, sbm, sbn,
            IS_CAUSAL, BIAS_KIND, MASK_KIND, HAS_TOPK, HAS_DROPOUT, PRECISION, NAN_GUARD)
        e = tl.exp(s - m_row[:, None])
        ds = e * inv_l[:, None] * (dp - delta[:, None])
        if NAN_GUARD:  # nothing flows back through a masked pair (P NaN in a NaN row, 0 x NaN where v is NaN)
            ds = tl.where(s == float("-inf"), 0.0, ds)
            kt = _finite(kt)
        if not ROW_FIX:
            dq += tl.dot(ds.to(q.dtype), tl.trans(kt), input_precision=PRECISION)
        positional = (offs_n >= k_prefix) & col_ok
        dist = pi[:, None] - (offs_n - k_prefix)[None, :]
        edp = ds  # what the rows' sums of w dS below add: dS, or under ROW_FIX e dP (and e apart)
        if ROW_FIX:
            edp = e * dp
            l_sum += tl.sum(e, axis=1)
            pdp += tl.sum(edp, axis=1)
        if NEED_DSLOPE:
            w = tl.where(positional[None, :], -tl.abs(dist).to(tl.float32), 0.0)
            dslope += tl.sum(w * edp, axis=1)
            dslope_e += tl.sum(w * e, axis=1)
        if NEED_DLSC:  # fp32 dS times the fp32 q'.k' (not the rounded dS of the dq product)
            if NAN_GUARD:
                dlsc += tl.sum(tl.where(s == float("-inf"), 0.0, ds * qk), axis=1)
            else:
                dlsc += tl.sum(edp * qk, axis=1)
                dlsc_e += tl.sum(e * qk, axis=1)
        if NEED_DTAB:
            first = q_offset + start_m - (start_n + BLOCK_N - 1 - k_prefix) + tab_center  # row of the lowest distance
            keep = positional[None, :] & row_ok[:, None]
            upper = first >= 2 * tab_center  # the whole tile at or beyond the table's upper edge
            lower = first + BLOCK_M + BLOCK_N - 2 <= 0  # ... or its lower edge
            # the edge sums are formed on every tile and selected, not branched around: an if/elif here
            # spilled 56 B (AOT, sm_80 TF32 d64); only the diagonal path below is skipped
            row_sums = tl.sum(tl.where(keep, ds, 0.0), axis=1)
            dtab_hi += tl.where(upper, row_sums, 0.0)
            dtab_lo += tl.where(lower, row_sums, 0.0)
            if ~(upper | lower):  # diagonal sums, one atomic each
                _table_grad_tile(DTAB + off_h * stab_h, stab_l, ds, keep, first, 2 * tab_center + 1, BLOCK_M, BLOCK_N)
        if NEED_DS:
            ds_off = offs_m.to(tl.int64)[:, None] * NK + offs_n[None, :]  # int64: nq * nk passes 2^31
            tl.store(DS + off_bh.to(tl.int64) * NQ * NK + ds_off, ds, mask=row_ok[:, None] & col_ok[None, :])
        if ROW_FIX:  # after the rows' sums, so that e and dP are dead across the product
            dq += tl.dot(ds.to(q.dtype), tl.trans(kt), input_precision=PRECISION)
    if ROW_FIX:  # sum_j w dS = (sum_j w e dP - delta sum_j w e) / l, per row
        inv_l = 1.0 / tl.where(l_sum == 0.0, 1.0, l_sum)
        delta = pdp * inv_l
        dslope = (dslope - delta * dslope_e) * inv_l
        dlsc = (dlsc - delta * dlsc_e) * inv_l
    dq = dq * sm_scale
    tl.store(_tile_ptrs(DQ + off_b.to(tl.int64) * sdqb + q0 * sdqm + off_h.to(tl.int64) * sdqh, offs_m, offs_d, sdqm,
                        sdqd),
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    if NEED_DSLOPE:
        tl.store(DSLOPE + off_bh.to(tl.int64) * n_mblocks + pid_m, tl.sum(dslope, axis=0))
    if NEED_DLSC:
        tl.store(DLSC + off_bh.to(tl.int64) * n_mblocks + pid_m, tl.sum(dlsc, axis=0) * sm_scale)
    if NEED_DTAB:  # the edge rows' sums, one atomic each
        tl.atomic_add(DTAB + off_h * stab_h, tl.sum(dtab_lo, axis=0), sem="relaxed")
        tl.atomic_add(DTAB + off_h * stab_h + (2 * tab_center).to(tl.int64) * stab_l, tl.sum(dtab_hi, axis=0),
                      sem="relaxed")
