"""The QK features of the attention kernels (SPEC §2 steps 2-3), once per q or k row: ``_qk_rows``.

QK-norm (grouped l2 norm), the per-dim scales and rotary/xpos act on each q and k row alone, from
its position, so they run here once per row -- O(n d) -- and the attention kernels take the
resulting q' / k' (in q's / k's dtype, exactly the rounded tiles they formed in-kernel before:
``_qk_tile_fwd`` in fp32, then one rounding). Applied inside the attention kernels instead, every
k tile was re-normalized and re-rotated by every query block (and every q tile by every key block
in dK/dV): O(n^2 d / BLOCK) sin/cos and norms, 7.7x the plain forward on an H200 (2026-11-28).

BACKWARD 0: ``Y = x'`` of the raw rows ``X``. BACKWARD 1: ``Y = dL/dx`` from ``G = dL/dx'``
(fp32, the attention backward's accumulated gradient, already scaled), chained through the same
fp32 math (``_qk_tile_bwd``), and this block's per-dim partial of dL/d(dim scale) into DSC_PART
(heads x blocks, d) fp32. The raw rows enter the backward through ``_finite``: a NaN/inf row only
ever meets G = 0 or G NaN (the attention's NaN rule, README "NaN, inf and masking"), so the
masked NaN row gets dx = 0 and a poisoned one stays NaN.

IS_KEY: the rows are keys -- key ``j`` at position ``j - k_prefix``, the first ``k_prefix`` keys
(memory) unrotated, xpos's scale inverted -- else queries at ``q_offset + i``. One program per (row
block, batch * head), folded onto grid axis 0 (``_fold``); VARLEN: a packed batch, positions and
xpos's max_half per sequence (``_seq_span``), the batch strides 0.
"""
import triton
import triton.language as tl

from .attention_common import _finite, _fold, _qk_tile_bwd, _qk_tile_fwd, _seq_span, _tile_ptrs

ROWS_WARPS = 8


def rows_config(d: int) -> dict:
    """The row kernel's fixed tile (no table): 1024 fp32 values per program, 8 warps (4 values per
    thread), whatever the head dim. AOT sm_80/sm_90 over ``aot._qk_rows_specs``, 2026-11-28: spill-free
    under triton 3.6 and 3.9 (40 / 54 registers at most); 1024 x 4 warps spilled 8 B under 3.6, 2048 x
    4 and 2048 x 8 spilled 8-16 B under both (with rotary/xpos), ptxas's choice at 40-96 registers."""
    bd = max(16, triton.next_power_of_2(d))
    return dict(BLOCK_N=max(4, 1024 // bd), BLOCK_D=bd, num_warps=ROWS_WARPS, num_stages=1)


@triton.jit(do_not_specialize=["NQ", "NK", "q_offset", "max_half"])
def _qk_rows(X, G, Y, DSC, DSC_PART, INV_FREQ, XPOS, CU_Q, CU_K,
             sxb, sxh, sxn, sxd, sgb, sgh, sgn, sgd, syb, syh, syn, syd,
             HEADS, NQ, NK, D, q_offset, k_prefix, R, max_half, xpos_base, interp,
             IS_KEY: tl.constexpr, BACKWARD: tl.constexpr, HAS_NORM: tl.constexpr, GROUPS: tl.constexpr,
             HAS_DSCALE: tl.constexpr, HAS_ROT: tl.constexpr, HAS_XPOS: tl.constexpr, VARLEN: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    if IS_KEY:
        n_blocks = tl.cdiv(NK, BLOCK_N)
    else:
        n_blocks = tl.cdiv(NQ, BLOCK_N)
    pid_n, off_bh = _fold(n_blocks)
    off_b = off_bh // HEADS
    off_h = off_bh % HEADS
    q0, nq, k0, nk, max_half = _seq_span(CU_Q, CU_K, off_b, NQ, NK, q_offset, k_prefix, max_half, VARLEN)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if IS_KEY:
        r0 = k0
        ok = rows < nk
        pos = rows - k_prefix
        rot_row = rows >= k_prefix
        sign = -1.0
    else:
        r0 = q0
        ok = rows < nq
        pos = q_offset + rows
        rot_row = rows >= 0
        sign = 1.0
    inb = ok[:, None] & (offs_d[None, :] < D)
    x = tl.load(_tile_ptrs(X + off_b.to(tl.int64) * sxb + r0 * sxn + off_h.to(tl.int64) * sxh, rows, offs_d, sxn, sxd),
                mask=inb, other=0.0)
    dsc_row = DSC + off_h * D
    if BACKWARD:
        g = tl.load(_tile_ptrs(G + off_b.to(tl.int64) * sgb + r0 * sgn + off_h.to(tl.int64) * sgh, rows, offs_d, sgn,
                               sgd), mask=inb, other=0.0)
        y, dsc = _qk_tile_bwd(_finite(x), g, offs_d, D, pos, rot_row, dsc_row, INV_FREQ, XPOS, R, interp, max_half,
                              xpos_base, sign, HAS_NORM, GROUPS, HAS_DSCALE, HAS_ROT, HAS_XPOS, BLOCK_N, BLOCK_D)
        if HAS_DSCALE:
            tl.store(DSC_PART + (off_bh.to(tl.int64) * n_blocks + pid_n) * D + offs_d, dsc, mask=offs_d < D)
    else:
        y = _qk_tile_fwd(x, offs_d, D, pos, rot_row, dsc_row, INV_FREQ, XPOS, R, interp, max_half, xpos_base, sign,
                         HAS_NORM, GROUPS, HAS_DSCALE, HAS_ROT, HAS_XPOS, BLOCK_N, BLOCK_D)
    tl.store(_tile_ptrs(Y + off_b.to(tl.int64) * syb + r0 * syn + off_h.to(tl.int64) * syh, rows, offs_d, syn, syd),
             y.to(Y.dtype.element_ty), mask=inb)
