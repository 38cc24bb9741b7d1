"""Split-KV decode attention over a KV cache: ``_decode_split`` (partials) and ``_decode_combine``.

The kernels behind ``xtk.attention_with_kvcache`` (issue 14). One ``_decode_split`` program per
(kv-row block, split, batch * kv head), folded onto grid axis 0 (``_fold``: axes 1 and 2 hold only
65,535): it packs the query rows of the ``G = H // HK`` query heads that read one kv head -- ``G x
NQ`` rows, row ``r`` = head ``r // NQ`` of the group, query ``r % NQ`` -- into one M tile (at least
16 rows, padded), so each cached key is read once per kv head, not once per query head (an M larger
than the tile's BLOCK_M takes several row blocks). Split ``s`` of ``SPLITS`` walks its own
BLOCK_N-aligned key range of the sequence and writes its normalized partial output (fp32) and the
natural log-sum-exp of its logits; ``_decode_combine`` weighs the splits by ``exp(lse_s - max)`` into
the output (in q's dtype) and the row's log-sum-exp (fp32, -inf for a row with no key).

Keys and values: a contiguous cache ``(B, HK, n_max, d)``, sequence ``b`` in row ``ROWS[b]``, or a
paged one ``(num_pages, HK, PAGE, d)``, key ``j`` of sequence ``b`` in page ``BT[b, j // PAGE]`` at
slot ``j % PAGE`` (PAGED, PAGE constexprs). ``SEQLENS[b]`` (int32, read on the device) cached keys,
``NEW`` of them (0 or NQ) the new ones the op already wrote; the sequence has ``SEQLENS[b] + NEW``
keys, query ``i`` sits at ``SEQLENS[b] - k_prefix + i`` (``attention_common``'s positions with
``q_offset = SEQLENS[b] - k_prefix``), rotary/xpos's ``max_half = (SEQLENS[b] - k_prefix + NQ) // 2``
(what the forward launcher computes for that one sequence). Logits, bias, masks and the QK features
are the attention family's (``_logits``, ``_qk_tile_fwd``, ``_group_norm_factor``,
``_rotate_pairs``): BIAS_KIND none / ALiBi / distance table (T5 arrives as one), per-row head data
(slopes, table columns, q dim scales) gathered by the row's query head. Top-k in two launches of
the same kernel (TOPK_PASS): pass 1 stores every row's logits (bit-identical to the attention pass's:
same code, same tiles) into an fp32 scratch the launcher filled with -inf, the launcher takes each
row's k-th largest on the device (``torch.topk``), pass 2 masks the logits below it. No dense bias,
no dropout here (the op's backend says why). Accumulation in fp32; the dots in the input dtype
(PRECISION 'ieee' for exact fp32 products, as the forward). Launcher: ``attention_decode_op.py``.
"""
import triton
import triton.language as tl

from .attention_common import (TABLE_STRIDE, _ALIBI, _fold, _group_norm_factor, _logits, _qk_tile_fwd, _rotate_pairs,
                               _tile_ptrs, _tile_ptrs_t)
from .kinds import TOPK_LOGITS, TOPK_MASK

_TOPK_LOGITS = tl.constexpr(TOPK_LOGITS)
_TOPK_MASK = tl.constexpr(TOPK_MASK)


@triton.jit
def _group_rows(off_hk, start_r, H, HK, NQ, BLOCK_M: tl.constexpr, GQA_REPEAT: tl.constexpr):
    """The tile's rows: (query head, query index (NQ on padding rows: masked), valid) of rows
    ``start_r ..``: row r = head r // NQ of kv head ``off_hk``'s group, query r % NQ."""
    G = H // HK
    r = start_r + tl.arange(0, BLOCK_M)
    ok = r < G * NQ
    gi = r // NQ
    if GQA_REPEAT:
        head = gi * HK + off_hk
    else:
        head = off_hk * G + gi
    return tl.where(ok, head, 0), tl.where(ok, r % NQ, NQ), ok


@triton.jit
def _load_q_rows(Q, off_b, head, qi, ok, offs_d, sqb, sqh, sqm, sqd, D, q_offset, QSC, INV_FREQ, XPOS, R, interp,
                 max_half, xpos_base, HAS_NORM: tl.constexpr, GROUPS: tl.constexpr, HAS_DSCALE: tl.constexpr,
                 HAS_ROT: tl.constexpr, HAS_XPOS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (BLOCK_M, BLOCK_D) q' tile, one query head per row (``_load_q`` with a per-row head: the
    dim scale row is the row's head's)."""
    rows = head.to(tl.int64) * sqh + qi.to(tl.int64) * sqm
    q = tl.load(_tile_ptrs(Q + off_b.to(tl.int64) * sqb, rows, offs_d, 1, sqd),
                mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if HAS_NORM or HAS_DSCALE or HAS_ROT:
        x = q.to(tl.float32)
        if HAS_NORM:
            inv, _ = _group_norm_factor(x, offs_d, D, GROUPS)
            x = x * inv
        if HAS_DSCALE:
            x = x * tl.load(QSC + head[:, None] * D + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
        if HAS_ROT:
            x = _rotate_pairs(x, q_offset + qi, ok, INV_FREQ, XPOS, R, interp, max_half, xpos_base, 1.0, False,
                              HAS_XPOS, BLOCK_M, BLOCK_D)
        q = x.to(q.dtype)
    return q


@triton.jit
def _cache_rows(BT, off_b, sbt, row_b, offs_n, nk, s_page, s_slot, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """int64 element offsets of keys ``offs_n`` of one sequence in a cache (its kv head's base
    excluded): page ``BT[b, j // PAGE]`` slot ``j % PAGE`` (paged) or row ``row_b`` slot ``j``."""
    if PAGED:
        page = tl.load(BT + off_b.to(tl.int64) * sbt + offs_n // PAGE, mask=offs_n < nk, other=0)
        return page.to(tl.int64) * s_page + (offs_n % PAGE).to(tl.int64) * s_slot
    else:
        return row_b.to(tl.int64) * s_page + offs_n.to(tl.int64) * s_slot


@triton.jit(do_not_specialize=["tab_center", "SPLITS"] + TABLE_STRIDE)
def _decode_split(
        Q, K, V, OP, LSEP, SEQLENS, BT, ROWS, SLOPES, TAB, QSC, KSC, INV_FREQ, XPOS, SCR, KTH,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbt, stab_l, stab_h, tab_center, s_scr,
        B, H, HK, NQ, D, DV, NEW, SPLITS, k_prefix, sm_scale, R, xpos_base, interp,
        IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, PRECISION: tl.constexpr,
        HAS_NORM: tl.constexpr, GROUPS: tl.constexpr, HAS_DSCALE: tl.constexpr, HAS_ROT: tl.constexpr,
        HAS_XPOS: tl.constexpr, GQA_REPEAT: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
        TOPK_PASS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """TOPK_PASS 0: attention; 1 (the top-k pre-pass): each row's logits, exactly as pass 0/2 forms
    them, stored into SCR ``(B, H, NQ, s_scr)`` fp32 at key slot j (nothing else written); 2:
    attention with the logits below the row's threshold KTH ``(B, H, NQ)`` fp32 masked."""
    n_mb = tl.cdiv((H // HK) * NQ, BLOCK_M)
    pid_ms, off_bhk = _fold(n_mb * SPLITS)
    split, start_r = pid_ms // n_mb, (pid_ms % n_mb) * BLOCK_M
    off_b, off_hk = off_bhk // HK, off_bhk % HK
    head, qi, ok = _group_rows(off_hk, start_r, H, HK, NQ, BLOCK_M, GQA_REPEAT)
    seqlen = tl.load(SEQLENS + off_b)
    nk = seqlen + NEW
    q_offset = seqlen - k_prefix
    max_half = (q_offset + NQ) // 2
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_q_rows(Q, off_b, head, qi, ok, offs_d, sqb, sqh, sqm, sqd, D, q_offset, QSC, INV_FREQ, XPOS, R, interp,
                     max_half, xpos_base, HAS_NORM, GROUPS, HAS_DSCALE, HAS_ROT, HAS_XPOS, BLOCK_M, BLOCK_D)
    slope = tl.zeros([BLOCK_M], tl.float32)
    if BIAS_KIND == _ALIBI:
        slope = tl.load(SLOPES + head).to(tl.float32)
    tab = TAB + head * stab_h
    row_b = 0
    if not PAGED:
        row_b = tl.load(ROWS + off_b)
    k_base = K + off_hk.to(tl.int64) * skh
    v_base = V + off_hk.to(tl.int64) * svh
    chunk = tl.cdiv(tl.cdiv(nk, SPLITS), BLOCK_N) * BLOCK_N  # BLOCK_N-aligned: no tile straddles two splits
    lo = split * chunk
    hi = tl.minimum(lo + chunk, nk)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    row_bh = ((off_b * H).to(tl.int64) + head) * NQ + qi  # the row (b, head, i) in (B, H, NQ)
    if TOPK_PASS == _TOPK_MASK:
        kth = tl.load(KTH + row_bh, mask=ok, other=float("-inf"))
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < nk
        krow = _cache_rows(BT, off_b, sbt, row_b, offs_n, nk, skb, skn, PAGED, PAGE)
        if HAS_NORM or HAS_DSCALE or HAS_ROT:
            k = tl.load(_tile_ptrs(k_base, krow, offs_d, 1, skd), mask=col_ok[:, None] & (offs_d[None, :] < D),
                        other=0.0)
            kp = _qk_tile_fwd(k, offs_d, D, offs_n - k_prefix, offs_n >= k_prefix, KSC + off_hk * D, INV_FREQ, XPOS,
                              R, interp, max_half, xpos_base, -1.0, HAS_NORM, GROUPS, HAS_DSCALE, HAS_ROT, HAS_XPOS,
                              BLOCK_N, BLOCK_D)
            kt = tl.trans(kp.to(k.dtype))
        else:
            kt = tl.load(_tile_ptrs_t(k_base, offs_d, krow, skd, 1), mask=col_ok[None, :] & (offs_d[:, None] < D),
                         other=0.0)
        s = _logits(tl.dot(q, kt, input_precision=PRECISION), qi, offs_n, off_b, 0, NQ, nk, q_offset, k_prefix,
                    sm_scale, slope[:, None], tab[:, None], stab_l, tab_center,
                    Q, 0, 0, 0, 0, Q, 0, 0, 0, 0, IS_CAUSAL, BIAS_KIND, 0, False)
        if TOPK_PASS == _TOPK_LOGITS:
            tl.store(SCR + row_bh[:, None] * s_scr + offs_n[None, :], s, mask=ok[:, None] & col_ok[None, :])
        else:
            if TOPK_PASS == _TOPK_MASK:
                s = tl.where(s < kth[:, None], float("-inf"), s)  # ties with the k-th kept; NaN never dropped
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vrow = _cache_rows(BT, off_b, sbt, row_b, offs_n, nk, svb, svn, PAGED, PAGE)
            v = tl.load(_tile_ptrs(v_base, vrow, offs_dv, 1, svd), mask=col_ok[:, None] & (offs_dv[None, :] < DV),
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    if TOPK_PASS != _TOPK_LOGITS:
        _store_partials(OP, LSEP, acc, l_i, m_i, split, off_b, head, qi, ok, offs_dv, B, H, NQ, DV)


@triton.jit
def _store_partials(OP, LSEP, acc, l_i, m_i, split, off_b, head, qi, ok, offs_dv, B, H, NQ, DV):
    """One split's normalized partial rows and their natural log-sum-exps (-inf: no key), into the
    partials (SPLITS, B, H, NQ, DV) and (SPLITS, B, H, NQ), fp32, contiguous."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    prow = ((split * B + off_b).to(tl.int64) * H + head) * NQ + qi
    tl.store(OP + prow[:, None] * DV + offs_dv[None, :], out, mask=ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSEP + prow, lse, mask=ok)


@triton.jit(do_not_specialize=["SPLITS"])
def _decode_combine(OP, LSEP, O, LSE, sob, soh, som, sod, H, NQ, DV, ROWS_TOTAL, SPLITS,
                    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program per output row (b, h, i): ``sum_s w_s o_s / sum_s w_s`` with ``w_s = exp(lse_s -
    max_s lse_s)``; the row's lse ``max + log(sum w)`` (-inf and output 0 when no split saw a key).
    The lse of every split in one (BLOCK_S >= SPLITS) vector, the partial rows one split at a time
    (a (SPLITS, DV) tile would hold up to 128 x 256 fp32 values)."""
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(LSEP + s.to(tl.int64) * ROWS_TOTAL + row, mask=s < SPLITS, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(lse - m_safe), axis=0)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for split in range(0, SPLITS):
        part = split * ROWS_TOTAL + row.to(tl.int64)
        w = tl.exp(tl.load(LSEP + part) - m_safe)  # 0 for a split that saw no key (its partial row is 0)
        acc += w * tl.load(OP + part * DV + dv, mask=dv < DV, other=0.0)
    out = acc / tl.where(total == 0.0, 1.0, total)
    b, h, i = row // (H * NQ), (row // NQ) % H, row % NQ
    optr = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + i.to(tl.int64) * som + dv * sod
    tl.store(optr, out.to(O.dtype.element_ty), mask=dv < DV)
    tl.store(LSE + row, tl.where(total == 0.0, float("-inf"), m_safe + tl.log(tl.where(total == 0.0, 1.0, total))))
