"""Shared ``@triton.jit`` helpers of the attention kernels (forward, top-k threshold, backward).

One definition of the logits: ``_logits`` turns ``q @ k^T`` of one (BLOCK_M, BLOCK_N) tile into
the biased, masked logits of SPEC §2 steps 4-6 (masked = -inf). Every pass (threshold,
forward, both backward kernels) calls it, so they agree on which keys a row sees.

Positions: query ``i`` sits at ``q_offset + i``; key ``j >= k_prefix`` at ``j - k_prefix``; the
first ``k_prefix`` keys carry no position (no position bias, never causally masked).

Switches (``tl.constexpr``):
- BIAS_KIND: 0 none, 1 alibi (one slope per head, 0 for heads without one), 2 distance table
  ``tab[(p_i - p_j) + center, h]`` (DistanceTable, and T5 turned into one by the launcher),
  3 dense additive float, 4 dense boolean keep-mask (tile loads with broadcast strides).
- MASK_KIND: the ``attn_mask`` slot: 0 none, 1 additive float, 2 boolean keep-mask.
- IS_CAUSAL: ``p_j > p_i`` masked for positional keys.
"""
import triton
import triton.language as tl

BIAS_NONE, BIAS_ALIBI, BIAS_TABLE, BIAS_DENSE_FLOAT, BIAS_DENSE_BOOL = 0, 1, 2, 3, 4
MASK_NONE, MASK_FLOAT, MASK_BOOL = 0, 1, 2


@triton.jit
def _dense_tile(s, ptr, sb, sh, sm, sn, off_b, off_h, offs_m, offs_n, NQ, NK, KIND: tl.constexpr):
    """Add (KIND 1) or apply as keep-mask (KIND 2) one tile of a broadcast (b, h, nq, nk) tensor."""
    inb = (offs_m[:, None] < NQ) & (offs_n[None, :] < NK)
    p = ptr + off_b.to(tl.int64) * sb + off_h.to(tl.int64) * sh \
        + offs_m[:, None].to(tl.int64) * sm + offs_n[None, :].to(tl.int64) * sn
    if KIND == 1:
        s = s + tl.load(p, mask=inb, other=0.0).to(tl.float32)
    else:
        keep = tl.load(p, mask=inb, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    return s


@triton.jit
def _logits(qk, offs_m, offs_n, off_b, off_h, NQ, NK, q_offset, k_prefix, sm_scale,
            slope, TAB, stride_tab, tab_center,
            MASK, smb, smh, smm, smn, BIAS, sbb, sbh, sbm, sbn,
            IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, MASK_KIND: tl.constexpr):
    """Scaled, biased, masked logits of one tile (fp32, masked = -inf)."""
    s = qk * sm_scale
    pi = q_offset + offs_m
    pj = offs_n - k_prefix
    positional = offs_n >= k_prefix
    dist = pi[:, None] - pj[None, :]
    if BIAS_KIND == 1:
        s = s - tl.where(positional[None, :], slope * tl.abs(dist).to(tl.float32), 0.0)
    if BIAS_KIND == 2:
        ok = positional[None, :] & (offs_m[:, None] < NQ) & (offs_n[None, :] < NK)
        s = s + tl.load(TAB + (dist + tab_center).to(tl.int64) * stride_tab, mask=ok, other=0.0).to(tl.float32)
    if BIAS_KIND == 3:
        s = _dense_tile(s, BIAS, sbb, sbh, sbm, sbn, off_b, off_h, offs_m, offs_n, NQ, NK, 1)
    if BIAS_KIND == 4:
        s = _dense_tile(s, BIAS, sbb, sbh, sbm, sbn, off_b, off_h, offs_m, offs_n, NQ, NK, 2)
    if MASK_KIND == 1:
        s = _dense_tile(s, MASK, smb, smh, smm, smn, off_b, off_h, offs_m, offs_n, NQ, NK, 1)
    if MASK_KIND == 2:
        s = _dense_tile(s, MASK, smb, smh, smm, smn, off_b, off_h, offs_m, offs_n, NQ, NK, 2)
    valid = (offs_n[None, :] < NK) & (offs_m[:, None] < NQ)
    if IS_CAUSAL:
        valid = valid & ~((pj[None, :] > pi[:, None]) & positional[None, :])
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _dropout_keep(seed, off_bh, offs_m, offs_n, NK, dropout_p):
    """Boolean keep-mask of one tile from a counter-based generator: stream ``seed + off_bh``, counter ``i * nk + j``."""
    rnd = tl.rand(seed + off_bh, offs_m[:, None] * NK + offs_n[None, :])
    return rnd >= dropout_p


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
