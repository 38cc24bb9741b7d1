"""Launcher of the split-KV decode kernels (``attention_decode.py``): ``decode`` and the split count.

Plain tensors in, tensors out (imports nothing from ``xtk``); the adapter from
``attention_with_kvcache``'s inputs is ``xtk/ops/attention_kvcache_triton.py``. Memory besides the
output: the fp32 partials ``(splits, b, h, nq, dv)`` and their log-sum-exps ``(splits, b, h, nq)``.
Two launches, no host synchronisation: ``cache_seqlens`` (and the block table) are read on the device.
Top-k adds a third launch before them (``_row_thresholds``: the logits pass into an fp32 scratch
``(b, h, nq, capacity)``, then ``torch.topk`` on the device), skipped when ``topk >= capacity``
(every row keeps all its keys).
"""
import torch
import triton

from .attention_decode import _decode_combine, _decode_split
from .attention_op import (QKArgs, _arch, _device_guard, _narrow_cols, _precision, _qk_slots, _uses_qk, block_d,
                           head_major)
from .kinds import BIAS_ALIBI, BIAS_NONE, BIAS_TABLE, MASK_NONE, TOPK_LOGITS, TOPK_MASK, TOPK_NONE
from .tiles import TileConfigError, config, precision_of, spec_class

Tensor = torch.Tensor
MAX_SPLITS = 128  # the combine kernel's lse vector
CPU_SPLIT_KEYS = 64  # num_splits=0 off CUDA: one split per this many cache slots, at most 4 (a fixed rule)


def pick_splits(b: int, hk: int, capacity: int, block_n: int, device) -> int:
    """``num_splits=0``: the split count from the sizes alone (no read of ``cache_seqlens``).

    CUDA: enough programs for two waves over the SMs, ``ceil(2 * SMs / (b * hk))``, but never a
    split shorter than 4 key tiles of the cache's capacity (``capacity / (4 * BLOCK_N)``), nor more
    than MAX_SPLITS. Elsewhere (CPU, the interpreter): one split per CPU_SPLIT_KEYS slots of the
    capacity, at most 4 -- a fixed rule."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, max(1, b * hk))
        return max(1, min(want, capacity // (4 * block_n), MAX_SPLITS))
    return max(1, min(4, capacity // CPU_SPLIT_KEYS))


def _tile(q, hk: int, d: int, dv: int, bias_kind: int, qk_meta: dict) -> dict:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the split kernel: the table's ``decode`` entry
    (``tiles.config``), BLOCK_M cut to the group's rows padded to a power of two >= 16."""
    tprec = precision_of(_precision(q.dtype), q.element_size())
    cls = spec_class(bias_kind, MASK_NONE, False, False, _uses_qk(qk_meta))
    cfg = config("decode", d, dv, _arch(q.device), 0, precision=tprec, cls=cls)
    rows = (q.shape[1] // hk) * q.shape[2]
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(16, triton.next_power_of_2(rows)))
    return cfg


def tile_refusal(q: Tensor, hk: int, dv: int, bias_kind: int, uses_qk: bool):
    """None when the tile tables hold a decode tile for this launch, else why not: the keys where no
    tile compiles without spilling are left out of the tables (exact fp32 at head dim 256 on sm_80;
    exact fp32 with in-kernel QK features at 256, and at 128 on sm_90: ``tiles.py``), and such
    launches are refused, not run spilling."""
    try:
        _tile(q, hk, q.shape[-1], dv, bias_kind, dict(HAS_NORM=uses_qk, HAS_DSCALE=False, HAS_ROT=False))
    except TileConfigError as e:
        return f"no decode tile: {e} (no tile of that key compiles without spilling)"
    return None


def decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, block_table, rows, new: int, slopes, table,
           scale: float, is_causal: bool, k_prefix: int, num_splits: int, qk: QKArgs = QKArgs(),
           gqa_repeat: bool = False, topk=None) -> tuple[Tensor, Tensor]:
    """-> (out ``(b, h, nq, dv)`` in q's dtype, lse ``(b, h, nq)`` fp32, natural log, -inf for rows
    with no key). q ``(b, h, nq, d)``; caches contiguous ``(B, hk, n_max, d|dv)`` with ``rows`` (b,)
    int32, or paged ``(num_pages, hk, page, d|dv)`` with ``block_table`` (b, max_pages) int32;
    ``seqlens`` (b,) int32 on q's device (cached keys, ``new`` of the rows after them already
    written); slopes (h,) fp32 | table (2L-1, h) fp32 with center row L-1 | neither; ``num_splits``:
    0 (``pick_splits``) or 1..MAX_SPLITS; ``qk``: ``QKArgs`` (its ``max_half`` is ignored: per
    sequence, in-kernel); ``topk``: None or k >= 1: each row keeps its logits >= its k-th largest
    unmasked one (all of them when it has fewer than k)."""
    q = _narrow_cols(q)
    b, h, nq, d = q.shape
    hk, dv = k_cache.shape[1], v_cache.shape[3]
    qk_ptrs, qk_scal, qk_meta = _qk_slots(q, qk)
    bias_kind = BIAS_ALIBI if slopes is not None else BIAS_TABLE if table is not None else BIAS_NONE
    cfg = _tile(q, hk, d, dv, bias_kind, qk_meta)
    capacity = k_cache.shape[2] * (block_table.shape[1] if block_table is not None else 1)
    if num_splits == 0:
        num_splits = pick_splits(b, hk, capacity, cfg["BLOCK_N"], q.device)
    out = torch.empty(b, h, nq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    if b * h * nq == 0:
        return out, lse
    part = torch.empty(num_splits, b, h, nq, dv, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_splits, b, h, nq, dtype=torch.float32, device=q.device)
    paged = block_table is not None
    index = block_table if paged else rows
    table = head_major(table)
    tab = table if table is not None else part
    tstr = (table.stride(0), table.stride(1), (table.shape[0] - 1) // 2) if table is not None else (0, 0, 0)
    n_mb = triton.cdiv((h // hk) * nq, cfg["BLOCK_M"])

    def split(topk_pass, scratch, kth):
        _decode_split[(n_mb * num_splits * b * hk,)](
            q, k_cache, v_cache, part, part_lse, seqlens, index, index, slopes if slopes is not None else part, tab,
            *qk_ptrs, scratch, kth, *q.stride(), *k_cache.stride(), *v_cache.stride(), index.stride(0) if paged else 0,
            *tstr, scratch.shape[-1], b, h, hk, nq, d, dv, new, num_splits, k_prefix, scale, qk_scal[0], qk_scal[2],
            qk_scal[3], IS_CAUSAL=is_causal, BIAS_KIND=bias_kind, PRECISION=_precision(q.dtype), **qk_meta,
            GQA_REPEAT=gqa_repeat, PAGED=paged, PAGE=k_cache.shape[2] if paged else 16, TOPK_PASS=topk_pass,
            BLOCK_D=block_d(d), BLOCK_DV=block_d(dv), **cfg)

    with _device_guard(q.device):
        if topk is not None and topk < capacity:
            split(TOPK_MASK, part, _row_thresholds(split, (b, h, nq, capacity), topk, q.device))
        else:
            split(TOPK_NONE, part, part)
        _decode_combine[(b * h * nq,)](part, part_lse, out, lse, *out.stride(), h, nq, dv, b * h * nq, num_splits,
                                       BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_DV=block_d(dv))
    return out, lse


def _row_thresholds(split, shape: tuple, topk: int, device) -> Tensor:
    """Each row's top-k threshold ``(b, h, nq)`` fp32 on the device: the logits pass (``split`` with
    TOPK_PASS=1) writes every row's logits over the ``capacity`` slots of ``shape`` ``(b, h, nq,
    capacity)`` into a scratch filled with -inf (masked logits and the slots past a sequence's keys
    stay -inf), and the k-th largest of each row is its threshold: -inf for a row with fewer than
    ``topk`` unmasked logits (it keeps them all); ties with the k-th are kept, and a NaN logit
    (ranked highest by ``torch.topk``) is never below it -- the reference's ``_topk_keep`` rule."""
    scratch = torch.full(shape, float("-inf"), dtype=torch.float32, device=device)
    split(TOPK_LOGITS, scratch, scratch)
    return scratch.topk(topk, dim=-1).values[..., topk - 1].contiguous()
