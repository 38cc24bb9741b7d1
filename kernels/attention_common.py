"""Shared ``@triton.jit`` helpers of the attention kernels (forward, top-k threshold, backward).

One definition of the logits: ``_logits`` turns ``q @ k^T`` of one (BLOCK_M, BLOCK_N) tile into
the biased, masked logits of SPEC §2 steps 4-6 (masked = -inf). Every pass (threshold,
forward, both backward kernels) calls it, so they agree on which keys a row sees.

Positions: query ``i`` sits at ``q_offset + i``; key ``j >= k_prefix`` at ``j - k_prefix``; the
first ``k_prefix`` keys carry no position (no position bias, never causally masked).

Launch hazards (issue 11): every grid is one axis of (blocks x batch * heads) programs (``_fold``;
CUDA caps axes 1 and 2 at 65,535); tile addresses take int64 row offsets (``_tile_ptrs``: n *
row stride and nq * nk pass 2^31); the dropout seed is a device tensor the kernels load
(``SEED``); the integers that change every decode step are not specialized (``DECODE_INTS``).

Switches (``tl.constexpr``):
- BIAS_KIND (``kinds.BIAS_*``): none, ALiBi (one slope per head, 0 for heads without one), distance
  table ``tab[clamp(p_i - p_j, -C, C) + C, h]`` (DistanceTable, and T5 turned into one by its
  descriptor, ending where its buckets saturate: ``_table_tile``),
  dense additive float, dense boolean keep-mask (tile loads with broadcast strides).
- MASK_KIND (``kinds.MASK_*``): the ``attn_mask`` slot: none, additive float, boolean keep-mask.
- IS_CAUSAL: ``p_j > p_i`` masked for positional keys.
- VARLEN: the batch axis is the sequence index of a packed batch (``_seq_span``): q/k/v/O rows
  offset by the sequence's starts in ``cu_seqlens_q`` / ``cu_seqlens_k``, its own nq / nk in every
  mask, positions from 0; a program whose block lies past its sequence's length returns at once.
- GQA_REPEAT: query head ``h`` reads kv head ``h % HK`` (x-transformers' order) instead of
  ``h // (H // HK)`` (SDPA's); the dK/dV kernel walks a kv head's query heads in the same order.
- QK features (SPEC §2 steps 2-3): not switches of these kernels. The launcher applies them once
  per row (``attention_qk._qk_rows``) and the kernels take q' / k'; their fp32 math lives here
  (``_qk_tile_fwd`` / ``_qk_tile_bwd``), shared with the decode kernel, which applies them to its
  cache tiles in-kernel (each key once per step).

Every tile takes ``_logits``' selects (key bound, causal, prefix), interior tiles too. Splitting the
key loop into select-free interior blocks and edge blocks (the Triton tutorial's off-band/on-band
loops) was built and dropped on 2026-11-28 without a GPU to time it: with the shipped tiles it
added 25-50 registers per thread to the plain 16-bit forward and spilled in 8-26 of the CI set's
104 forward and 16 of its 107 dK/dV specializations (AOT, triton 3.6 / 3.9); a runtime branch
around the logits instead failed triton 3.6's pipeliner. Worth timing on a GPU for the plain
16-bit forward, the one class that stayed spill-free.
"""
import triton
import triton.language as tl

from . import kinds

# the switch values (kernels/kinds.py) as the constexpr globals @triton.jit code may read
_ALIBI = tl.constexpr(kinds.BIAS_ALIBI)
_TABLE = tl.constexpr(kinds.BIAS_TABLE)
_DENSE_FLOAT = tl.constexpr(kinds.BIAS_DENSE_FLOAT)
_DENSE_BOOL = tl.constexpr(kinds.BIAS_DENSE_BOOL)
_MASK_FLOAT = tl.constexpr(kinds.MASK_FLOAT)
_MASK_BOOL = tl.constexpr(kinds.MASK_BOOL)

# Integers that change from one decode step to the next (``do_not_specialize`` of every attention
# kernel): the key count, the query offset, the distance table's center and rotary's max_half
# (both grow with the cache). Triton would otherwise compile a variant per value class (== 1,
# % 16 == 0, other), so a decode loop would compile several kernels. Kept specialized: the strides
# (they decide vector loads), nq and k_prefix (fixed through a decode loop: nq = 1 or the draft
# length, k_prefix = the memory key count); NQ's % 16 hint is worth keeping: without it the AOT
# dq kernel needed up to 40 more registers per thread (the row-statistics loads lose their alignment).
DECODE_INTS = ["NK", "q_offset", "tab_center", "max_half"]
# ... and the distance table's row stride: the launchers pass tables head-major (stab_l = 1,
# ``attention_op.head_major``), which Triton would turn into a constant -- a code change that moved
# ptxas's spills by -300..+470 B in 10 of the 296 table specializations of the AOT set (2026-11-28);
# unspecialized, the kernels compile as the AOT set always compiled them (a plain i32 stride).
TABLE_STRIDE = ["stab_l"]
NOT_SPECIALIZED = DECODE_INTS + TABLE_STRIDE


@triton.jit
def _fold(n_blocks):
    """(block, batch * head) of this program in a 1-D grid of ``n_blocks * (batch * heads)``
    programs, blocks fastest (the launcher's ``launch_grids``): axis 0 holds 2^31 - 1 programs,
    where CUDA caps axes 1 and 2 at 65,535 (a decode batch of 2,048 x 32 heads passes that)."""
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _query_program(H, HK, NQ, BLOCK_M: tl.constexpr, GQA_REPEAT: tl.constexpr):
    """A program over (query block, batch * head): (pid_m, off_bh, off_b, off_h, off_hk, start_m);
    GQA: query head ``h`` reads kv head ``h // (H // HK)`` (SDPA's order), or ``h % HK`` with
    GQA_REPEAT (x-transformers' ``(r kvh)`` order)."""
    pid_m, off_bh = _fold(tl.cdiv(NQ, BLOCK_M))
    off_h = off_bh % H
    if GQA_REPEAT:
        off_hk = off_h % HK
    else:
        off_hk = off_h // (H // HK)
    return pid_m, off_bh, off_bh // H, off_h, off_hk, pid_m * BLOCK_M


@triton.jit
def _seq_span(CU_Q, CU_K, off_b, NQ, NK, q_offset, k_prefix, max_half, VARLEN: tl.constexpr):
    """(first q row, nq, first k row, nk, max_half) of batch entry ``off_b``.

    Without VARLEN: (0, NQ, 0, NK, max_half) -- rows are addressed through the batch strides.
    With VARLEN the batch entry is sequence ``off_b`` of a packed batch: its q rows are
    ``CU_Q[off_b]:CU_Q[off_b + 1]`` and its k rows ``CU_K[off_b]:CU_K[off_b + 1]`` (int32 cu_seqlens on
    the device, the launcher passes batch strides 0), the starts as int64 rows (times a row stride
    they pass 2^31), and NQ / NK are the grid's and the row-statistics' sizes (max_seqlen_q /
    max_seqlen_k), not the sequence's. Positions restart at 0 per sequence, so xpos's max_half is
    the sequence's own: ``max(q_offset + nq, nk - k_prefix) // 2`` (floor, as the per-sequence
    launcher's Python computes it)."""
    if VARLEN:
        q0 = tl.load(CU_Q + off_b)
        nq = tl.load(CU_Q + off_b + 1) - q0
        k0 = tl.load(CU_K + off_b)
        nk = tl.load(CU_K + off_b + 1) - k0
        mh = tl.maximum(q_offset + nq, nk - k_prefix)
        half = tl.where(mh >= 0, mh // 2, -((1 - mh) // 2))  # floor, with non-negative operands only
        return q0.to(tl.int64), nq, k0.to(tl.int64), nk, half
    else:
        return 0, NQ, 0, NK, max_half


@triton.jit
def _tile_ptrs(base, rows, cols, s_row, s_col):
    """Pointers ``base + rows * s_row + cols * s_col`` of a q/k/v/dO/O (or gradient) tile whose rows
    are sequence positions and columns the head dim.

    The row offsets are int64: a position times a row stride passes 2^31 elements for long
    sequences with wide rows (a packed qkv (b, n, 3, h, d) with h*d = 4096 at n >= 174,763). The
    column offsets keep the cheap int32 math: the head dim (< 256) times a feature stride that the
    launcher keeps below 2^23 (``attention_op._narrow_cols``). The rows are added first: in the
    loops they are what changes, and the loop-invariant head-dim offsets stay an int32 vector
    (added first, they would be hoisted as 64-bit pointers: more registers, spills in the AOT set).
    Dense (nq, nk) tiles (``_dense_tile``, the dS store) sum int64 row and column offsets before
    the pointer instead: there i * nk, and j * nq for a transposed mask, pass 2^31. Index math
    stays int32 (every index < n < 2^31)."""
    return base + (rows.to(tl.int64) * s_row)[:, None] + (cols * s_col)[None, :]


@triton.jit
def _tile_ptrs_t(base, rows, cols, s_row, s_col):
    """``_tile_ptrs`` of a transposed tile (k^T, v^T): rows are the head dim (int32 offsets),
    columns the sequence positions (int64 offsets). The positions are added first (as in
    ``_tile_ptrs``): they change every key block, while the head-dim offsets stay loop-invariant
    int32 (added first, they would be hoisted as a column of 64-bit pointers: more registers)."""
    return base + (cols.to(tl.int64) * s_col)[None, :] + (rows * s_row)[:, None]


@triton.jit
def _head_bias(SLOPES, TAB, off_h, stab_h, BIAS_KIND: tl.constexpr):
    """Head ``off_h``'s ALiBi slope (0.0 unless BIAS_KIND is ALiBi) and its distance-table column."""
    slope = 0.0
    if BIAS_KIND == _ALIBI:
        slope = tl.load(SLOPES + off_h).to(tl.float32)
    return slope, TAB + off_h * stab_h


@triton.jit
def _dense_tile(s, ptr, sb, sh, sm, sn, off_b, off_h, offs_m, offs_n, NQ, NK, KIND: tl.constexpr,
                NAN_GUARD: tl.constexpr):
    """Add (KIND ``_MASK_FLOAT``) or apply as keep-mask (``_MASK_BOOL``) one tile of a broadcast (b, h, nq, nk)
    tensor. A -inf float entry over a NaN logit gives NaN, not -inf, unless NAN_GUARD (the guard
    twin, see ``_finite``): there it selects -inf (the select spilled heavy forward tiles, 36-88 B
    on the AOT set, 2026-11-27, so the everyday kernels leave it out)."""
    inb = (offs_m[:, None] < NQ) & (offs_n[None, :] < NK)
    # int64 offsets, summed before they meet the pointer: this association keeps the loop-invariant
    # half (rows in the forward and dq, columns in dK/dV) an offset vector, not a column of pointers
    off = offs_m.to(tl.int64)[:, None] * sm + offs_n.to(tl.int64)[None, :] * sn
    p = ptr + off_b.to(tl.int64) * sb + off_h.to(tl.int64) * sh + off
    if KIND == _MASK_FLOAT:
        add = tl.load(p, mask=inb, other=0.0).to(tl.float32)
        if NAN_GUARD:
            s = tl.where(add == float("-inf"), float("-inf"), s + add)
        else:
            s = s + add
    else:
        keep = tl.load(p, mask=inb, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    return s


@triton.jit
def _table_tile(TAB, stride_tab, dist, tab_center, ok):
    """One tile's bias from a per-distance table (fp32, 0 where not ``ok``), ``tab[clamp(p_i - p_j,
    -C, C) + C]`` with C = ``tab_center``: distances beyond the table take its edge rows (a T5 table
    ends where its buckets saturate, ``T5.kernel_args``; a DistanceTable covers every distance of the
    call). A tile wholly beyond an edge loads one address in every lane (a broadcast). Deciding that
    per tile to skip the gather (tile extremes by tl.min/tl.max) cost registers: AOT, fp32 d256 on
    sm_80 went from 0 to 19.8 KB of spills, bf16 d128 on sm_90 from 0 to 8-56 B."""
    row = tl.minimum(tl.maximum(dist, -tab_center), tab_center) + tab_center
    return tl.load(TAB + row.to(tl.int64) * stride_tab, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _logits(qk, offs_m, offs_n, off_b, off_h, NQ, NK, q_offset, k_prefix, sm_scale,
            slope, TAB, stride_tab, tab_center,
            MASK, smb, smh, smm, smn, BIAS, sbb, sbh, sbm, sbn,
            IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, MASK_KIND: tl.constexpr, NAN_GUARD: tl.constexpr):
    """Scaled, biased, masked logits of one tile (fp32, masked = -inf; under NAN_GUARD a -inf float
    mask or bias entry masks a NaN logit too)."""
    s = qk * sm_scale
    pi = q_offset + offs_m
    pj = offs_n - k_prefix
    positional = offs_n >= k_prefix
    dist = pi[:, None] - pj[None, :]
    if BIAS_KIND == _ALIBI:
        s = s - tl.where(positional[None, :], slope * tl.abs(dist).to(tl.float32), 0.0)
    if BIAS_KIND == _TABLE:
        ok = positional[None, :] & (offs_m[:, None] < NQ) & (offs_n[None, :] < NK)
        s = s + _table_tile(TAB, stride_tab, dist, tab_center, ok)
    if BIAS_KIND == _DENSE_FLOAT:
        s = _dense_tile(s, BIAS, sbb, sbh, sbm, sbn, off_b, off_h, offs_m, offs_n, NQ, NK, _MASK_FLOAT,
                        NAN_GUARD)
    if BIAS_KIND == _DENSE_BOOL:
        s = _dense_tile(s, BIAS, sbb, sbh, sbm, sbn, off_b, off_h, offs_m, offs_n, NQ, NK, _MASK_BOOL,
                        NAN_GUARD)
    if MASK_KIND == _MASK_FLOAT:
        s = _dense_tile(s, MASK, smb, smh, smm, smn, off_b, off_h, offs_m, offs_n, NQ, NK, _MASK_FLOAT,
                        NAN_GUARD)
    if MASK_KIND == _MASK_BOOL:
        s = _dense_tile(s, MASK, smb, smh, smm, smn, off_b, off_h, offs_m, offs_n, NQ, NK, _MASK_BOOL,
                        NAN_GUARD)
    valid = (offs_n[None, :] < NK) & (offs_m[:, None] < NQ)
    if IS_CAUSAL:
        valid = valid & ~((pj[None, :] > pi[:, None]) & positional[None, :])
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _finite(x):
    """``x`` with every NaN/inf element replaced by 0: the guard twins' operand of a gradient
    product (``dS @ K``, ``dS^T @ Q``). Exact under the NaN rule: a pair whose logit is finite has
    finite q and k rows, so a zeroed element only ever meets dS = 0 (a masked pair), where the
    product must add nothing; a row whose unmasked logit it poisons has dS NaN there anyway."""
    return tl.where(tl.abs(x) < float("inf"), x, 0.0).to(x.dtype)


@triton.jit
def _table_grad_tile(DTAB_H, stab_l, ds, keep, first, n_tab, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add one tile's dS to the distance-table gradient column of one head (``DTAB_H``).

    The tile's elements lie on BLOCK_M + BLOCK_N - 1 diagonals (one distance each). One gather
    skews the tile: row ``i`` of column ``c`` takes element (i, (i - c) mod BLOCK_N), whose local
    distance ``i - j`` is ``u * BLOCK_N + c`` with ``u = i // BLOCK_N - (i % BLOCK_N < c)``, so a
    column sum per ``u`` (cdiv(BLOCK_M, BLOCK_N) + 1 of them) yields BLOCK_N diagonals, and one
    relaxed atomic per diagonal adds each to the table -- in place of one atomic per element (and of
    one gather per BLOCK_N diagonals, as before 2026-11-28). ``keep``: the elements that carry a
    position bias; ``first``: the table row of local distance -(BLOCK_N - 1); diagonals beyond the
    table add to its edge rows, as ``_table_tile`` reads them (a DistanceTable's hold no kept element)."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    skewed = tl.gather(tl.where(keep, ds, 0.0), (rows[:, None] - cols[None, :]) & (BLOCK_N - 1), axis=1)
    # unrolled: as a loop, ptxas spilled 208-424 B on the sm_90 16-bit d128 dQ tile under triton 3.9
    for u in tl.static_range(-1, (BLOCK_M + BLOCK_N - 1) // BLOCK_N):
        in_group = (rows[:, None] // BLOCK_N - u) == ((rows[:, None] % BLOCK_N) < cols[None, :]).to(tl.int32)
        diag = tl.sum(tl.where(in_group, skewed, 0.0), axis=0)
        dist = u * BLOCK_N + cols  # the local distance i - j of each column's diagonal in this group
        row = tl.minimum(tl.maximum(first + (BLOCK_N - 1) + dist, 0), n_tab - 1)  # beyond the table: its edges
        tl.atomic_add(DTAB_H + row.to(tl.int64) * stab_l, diag, mask=(dist > -BLOCK_N) & (dist < BLOCK_M),
                      sem="relaxed")


@triton.jit
def _dropout_keep(seed, off_bh, offs_m, offs_n, dropout_p):
    """Boolean keep-mask of one tile from Philox: key ``seed``, counter ``(key j, query i, b * h, 0)``.

    One 32-bit word per coordinate, so every (b, h, i, j) below 2^32 each gets its own draw at any
    size (no ``i * nk + j`` that wraps past 2^31), and two seeds never share a stream."""
    zero = tl.zeros([offs_m.shape[0], offs_n.shape[0]], tl.uint32)
    c0 = zero + offs_n[None, :].to(tl.uint32)
    c1 = zero + offs_m[:, None].to(tl.uint32)
    c2 = zero + off_bh.to(tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _causal_key_end(start_m, BLOCK_M: tl.constexpr, NK, q_offset, k_prefix, IS_CAUSAL: tl.constexpr):
    """One past the last key a query block can see (all prefix keys, positional keys up to its last position)."""
    if IS_CAUSAL:
        end = tl.maximum(k_prefix + q_offset + start_m + BLOCK_M, k_prefix)
        return tl.maximum(tl.minimum(end, NK), 0)
    else:
        return NK


@triton.jit
def _causal_query_start(start_n, BLOCK_M: tl.constexpr, q_offset, k_prefix, IS_CAUSAL: tl.constexpr):
    """First query block (aligned to BLOCK_M) that can see any key of the block starting at ``start_n``."""
    if IS_CAUSAL:
        lo = tl.maximum(start_n - k_prefix - q_offset, 0)
        lo = tl.where(start_n < k_prefix, 0, lo)
        return (lo // BLOCK_M) * BLOCK_M
    else:
        return 0


@triton.jit
def _rotate_pairs(x, pos, rot_row, INV_FREQ, XPOS, R, interp, max_half, xpos_base, xpos_sign, inverse,
                  HAS_XPOS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate interleaved pairs (2m, 2m+1), m < R/2, of a (BLOCK_N, BLOCK_D) fp32 tile by
    ``pos * inv_freq[m] / interp``, times the xpos scale
    ``s_m ** (xpos_sign * (pos - max_half) / xpos_base)``. ``inverse``: the transpose (backward).

    The angle is carried as an unevaluated fp32 sum ``hi + lo`` (the exact product by an fma,
    then the division's exact remainder) and reduced mod 2 pi with a two-word 2 pi (Cody-Waite,
    fma), all in fp32: the reduced angle is within ~5e-7 rad of the exact one for every
    ``|pos| < 2^24``, as good as rounding the reference's fp64 angle to fp32, with no fp64 (slow on
    most GPUs). A plain fp32 ``pos * inv_freq`` would be off by ~pos * 6e-8 rad."""
    x0, x1 = tl.split(tl.reshape(x, [BLOCK_N, BLOCK_D // 2, 2]))
    m = tl.arange(0, BLOCK_D // 2)
    m_ok = m < R // 2
    inv_freq = tl.load(INV_FREQ + m, mask=m_ok, other=0.0).to(tl.float32)
    pf = pos.to(tl.float32)[:, None]
    hi = pf * inv_freq[None, :]
    lo = tl.fma(pf, inv_freq[None, :], -hi)      # pos * inv_freq = hi + lo exactly
    hi_q = hi / interp
    lo = (tl.fma(-hi_q, interp, hi) + lo) / interp  # (hi + lo) / interp = hi_q + lo, to ~2^-48 relative
    turns = tl.floor(hi_q * 0.15915494309189535 + 0.5)
    theta = tl.fma(-turns, 6.2831854820251465, hi_q)  # 2 pi = 6.2831854820251465 - 1.7484556e-07 (+ 1e-15)
    theta = tl.fma(-turns, -1.7484555314695172e-07, theta) + lo
    c = tl.cos(theta)
    s = tl.sin(theta)
    if inverse:
        s = -s
    y0 = x0 * c - x1 * s
    y1 = x1 * c + x0 * s
    if HAS_XPOS:
        xs = tl.load(XPOS + m, mask=m_ok, other=1.0).to(tl.float32)
        power = xpos_sign * (pos - max_half).to(tl.float32) / xpos_base
        sc = tl.exp(power[:, None] * tl.log(xs[None, :]))
        y0 = y0 * sc
        y1 = y1 * sc
    apply = rot_row[:, None] & m_ok[None, :]
    y0 = tl.where(apply, y0, x0)
    y1 = tl.where(apply, y1, x1)
    return tl.reshape(tl.join(y0, y1), [BLOCK_N, BLOCK_D])


@triton.jit
def _group_norm_factor(x, offs_d, D, GROUPS: tl.constexpr):
    """Per element 1 / max(||x_group||, 1e-12) of the QK-norm groups (D // GROUPS features each), and the norm."""
    gsize = D // GROUPS
    gid = offs_d // gsize
    inv = tl.zeros(x.shape, tl.float32)
    nrm = tl.zeros(x.shape, tl.float32)
    for g in tl.static_range(GROUPS):
        in_g = (gid == g)[None, :]
        # sqrt.approx and div.full (1-2 ulp) put the fp32 dK of QK-norm with rotary at 4.7x the eager
        # error on an H100 (2026-11-27); one Newton step on each, residuals by fma, brings both to
        # about eager's correctly rounded sqrt and division (tl.sqrt_rn / tl.div_rn cost ~20
        # registers here, and spills)
        ss = tl.sum(tl.where(in_g, x * x, 0.0), axis=1)
        n = tl.sqrt(ss)
        n = tl.where(n > 0.0, tl.fma(tl.fma(-n, n, ss), 0.5 / n, n), n)
        r = tl.maximum(n, 1e-12)
        r_inv = 1.0 / r
        r_inv = tl.fma(r_inv, tl.fma(-r, r_inv, 1.0), r_inv)
        inv = tl.where(in_g, r_inv[:, None], inv)
        nrm = tl.where(in_g, n[:, None], nrm)
    return inv, nrm



@triton.jit
def _qk_tile_fwd(x, offs_d, D, pos, rot_row, DSCALE_ROW, INV_FREQ, XPOS, R, interp, max_half, xpos_base, xpos_sign,
                 HAS_NORM: tl.constexpr, GROUPS: tl.constexpr, HAS_DSCALE: tl.constexpr, HAS_ROT: tl.constexpr,
                 HAS_XPOS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """q' or k' of one raw (BLOCK_N, BLOCK_D) tile, fp32: grouped l2 norm, per-dim scale (row
    ``DSCALE_ROW``), rotary/xpos at positions ``pos`` for the rows ``rot_row``."""
    x = x.to(tl.float32)
    if HAS_NORM:
        inv, _ = _group_norm_factor(x, offs_d, D, GROUPS)
        x = x * inv
    if HAS_DSCALE:
        x = x * tl.load(DSCALE_ROW + offs_d, mask=offs_d < D, other=0.0)[None, :]
    if HAS_ROT:
        x = _rotate_pairs(x, pos, rot_row, INV_FREQ, XPOS, R, interp, max_half, xpos_base, xpos_sign,
                          False, HAS_XPOS, BLOCK_N, BLOCK_D)
    return x


@triton.jit
def _qk_tile_bwd(x, g, offs_d, D, pos, rot_row, DSCALE_ROW, INV_FREQ, XPOS, R, interp, max_half, xpos_base, xpos_sign,
                 HAS_NORM: tl.constexpr, GROUPS: tl.constexpr, HAS_DSCALE: tl.constexpr, HAS_ROT: tl.constexpr,
                 HAS_XPOS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Chain ``g`` = dL/d(x') of one tile back through ``_qk_tile_fwd``: (dL/dx fp32, this tile's
    per-column dL/d(dim scale) partial (zeros without HAS_DSCALE))."""
    x = x.to(tl.float32)
    g = g.to(tl.float32)
    if HAS_ROT:
        g = _rotate_pairs(g, pos, rot_row, INV_FREQ, XPOS, R, interp, max_half, xpos_base, xpos_sign,
                          True, HAS_XPOS, BLOCK_N, BLOCK_D)
    xn = x
    if HAS_NORM:
        inv, _ = _group_norm_factor(x, offs_d, D, GROUPS)
        xn = x * inv
    dscale = tl.zeros([BLOCK_D], tl.float32)
    if HAS_DSCALE:
        dscale = tl.sum(g * xn, axis=0)
        g = g * tl.load(DSCALE_ROW + offs_d, mask=offs_d < D, other=0.0)[None, :]
    if HAS_NORM:
        gsize = D // GROUPS
        gid = offs_d // gsize
        proj = tl.zeros(x.shape, tl.float32)
        for grp in tl.static_range(GROUPS):
            in_g = (gid == grp)[None, :]
            dot = tl.sum(tl.where(in_g, xn * g, 0.0), axis=1)
            proj = tl.where(in_g, dot[:, None], proj)
        # d/dx of x / max(||x||, eps): (g - xn (xn . g)) / ||x|| above eps, g / eps below (inv = 1 / eps
        # there; both forms agree at x = 0, so the test on inv instead of ||x|| only moves the
        # switch by an ulp)
        g = tl.where(inv < 1e12, (g - xn * proj) * inv, g * inv)
    return g, dscale


@triton.jit
def _load_q(q_base, offs_m, offs_d, sqm, sqd, NQ, D):
    """The (BLOCK_M, BLOCK_D) q tile (q' where the launcher applied QK features)."""
    return tl.load(_tile_ptrs(q_base, offs_m, offs_d, sqm, sqd), mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D),
                   other=0.0)


@triton.jit
def _load_kt(k_base, offs_n, offs_d, skn, skd, NK, D):
    """The transposed (BLOCK_D, BLOCK_N) k tile (k' where the launcher applied QK features)."""
    return tl.load(_tile_ptrs_t(k_base, offs_d, offs_n, skd, skn), mask=(offs_n[None, :] < NK) & (offs_d[:, None] < D),
                   other=0.0)
