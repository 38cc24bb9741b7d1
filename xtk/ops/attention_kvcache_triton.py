"""The ``triton`` backend of ``xtk.attention_with_kvcache``: the split-KV decode kernel.

Data flow: ``attention_with_kvcache`` checks (host metadata) and writes the new keys -> ``reasons`` here (what the
kernel cannot run, in words) -> ``run``: the bias descriptor gives its kernel arguments
(``Bias.kernel_args``: ALiBi slopes padded to all heads; T5 as a per-distance table over every
distance the cache can form, gathered with the reference bucket function; a DistanceTable as it is),
QK-norm and rotary/xpos become ``QKArgs`` (``attention_triton._qk_args``), then
``kernels/attention_decode_op.decode`` (top-k's logits pass and per-row thresholds when ``topk`` is
below the cache's capacity, the split kernel and the combine). ``cache_seqlens``, the
block table and ``cache_batch_idx`` stay on the device: nothing here reads them, and ``reasons``
rests on host metadata alone.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .. import backends
from ..kernels import tiles
from ..kernels.attention_decode_op import MAX_SPLITS, decode, tile_refusal
from ..kernels.attention_op import DTYPES, MAX_HEAD_DIM, _arch, interpreting
from ..kernels.kinds import BIAS_ALIBI, BIAS_NONE, BIAS_TABLE
from .attention_triton import _qk_args

Tensor = torch.Tensor


def reasons(inputs, forced: bool) -> list:
    """Why the decode kernel cannot run ``inputs`` (a ``KVCacheInputs``); empty: it can."""
    why = []
    q = inputs.q
    if q.device.type == "cpu":
        if not (forced and interpreting()):
            why.append("CPU tensors run only when backend='triton' is forced with TRITON_INTERPRET=1")
    elif q.device.type != "cuda":
        why.append(f"device {q.device.type} is not supported (cuda, or cpu under TRITON_INTERPRET=1)")
    else:
        refused = tiles.unsupported_reason(_arch(q.device))
        if refused:
            why.append(refused)
    if q.dtype not in DTYPES:
        why.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    d, dv = q.shape[-1], inputs.v_cache.shape[-1]
    if max(d, dv) > MAX_HEAD_DIM:
        why.append(f"head dim {max(d, dv)} > {MAX_HEAD_DIM}")
    bias = inputs.bias
    if bias is not None and bias.kernel_kind not in (BIAS_ALIBI, BIAS_TABLE):
        why.append(f"bias {type(bias).__name__}: the decode kernel expands ALiBi, T5 and DistanceTable only")
    elif not why:
        kind = bias.kernel_kind if bias is not None else BIAS_NONE
        uses_qk = inputs.qk_norm is not None or inputs.rotary is not None
        refused = tile_refusal(q, inputs.k_cache.shape[1], dv, kind, uses_qk)
        if refused:
            why.append(refused)
    if inputs.num_splits > MAX_SPLITS:
        why.append(f"num_splits {inputs.num_splits} > {MAX_SPLITS} (the combine kernel's tile)")
    return why


def _bias_args(inputs, capacity: int):
    """(slopes | None, table | None) for the kernel, host sizes only: T5's table ends where its
    buckets saturate (the kernel clamps farther distances to its edge rows); a DistanceTable's is
    the user's, checked per row of the cache on the host (``attention_kvcache``)."""
    bias, h, nq = inputs.bias, inputs.q.shape[1], inputs.q.shape[2]
    if bias is None:
        return None, None
    if bias.kernel_kind == BIAS_ALIBI:
        return bias.kernel_args(h, nq, 0, 0, 0).slopes, None
    return None, bias.kernel_args(h, 1, capacity + nq + 1, 0, 0).table


def run(inputs):
    """-> (out ``(b, h, nq, dv)`` in q's dtype, lse ``(b, h, nq)`` fp32; computed whether or not asked for)."""
    q, layout = inputs.q, inputs.layout
    qk, scale = _qk_args(SimpleNamespace(q=q, k=inputs.k_cache, scale=inputs.scale, qk_norm=inputs.qk_norm,
                                         rotary=inputs.rotary, q_offset=0, k_prefix=inputs.k_prefix))
    slopes, table = _bias_args(inputs, layout.capacity)
    b, hk = q.shape[0], inputs.k_cache.shape[1]
    rows = table_rows = None  # the kernel indexes both with unit stride along the last dim
    if layout.paged:
        table_rows = inputs.block_table if inputs.block_table.stride(1) == 1 else inputs.block_table.contiguous()
    else:
        rows = (inputs.cache_batch_idx.contiguous() if inputs.cache_batch_idx is not None
                else torch.arange(b, dtype=torch.int32, device=q.device))
    return decode(q, inputs.k_cache, inputs.v_cache, inputs.seqlens.contiguous(), table_rows, rows,
                  q.shape[2] if inputs.writes else 0, slopes, table, scale, inputs.is_causal, inputs.k_prefix,
                  inputs.num_splits, qk, inputs.gqa_order == "repeat" and hk not in (1, q.shape[1]), inputs.topk)


BACKEND = backends.Backend("triton", "attention_with_kvcache", reasons, run)
