"""Launchers and the ``xtk::attention_fwd`` / ``xtk::attention_bwd`` custom ops with their autograd rule.

Plain tensors in, tensors out: this module imports nothing from ``xtk``. The adapter from
``xtk.attention``'s inputs (bias descriptors, QK-norm, rotary) is the Triton backend,
``xtk/ops/attention_triton.py``; it calls ``torch.ops.xtk.attention_fwd``. The op takes q/k/v with
any strides (no copies) and dense masks/biases as broadcast views (stride 0 on broadcast dims, no
copies); the QK features go in as the fields of ``QKArgs``.

Memory: besides the outputs, the forward allocates the (b, h, nq) log-sum-exp (and the top-k
threshold); the backward allocates dq/dk/dv, the (b, h, nq) delta, an (h, 2L-1) table gradient
and per-program ALiBi and QK dim-scale partials ((n / BLOCK) x d) -- all linear in n; where the
GQA group is split over programs (``dkdv_split``: grids smaller than the GPU), fp32 partial dK/dV
of s x their size. QK-norm and
rotary/xpos run once per row before the attention kernels (``attention_qk._qk_rows``): the forward
allocates q' and k' (q's and k's size and dtype), the backward recomputes them and holds dL/dq',
dL/dk' in fp32 for the chain back to q and k. Only a dense bias that requires grad gets a (b, h, nq,
nk) gradient buffer (its gradient has that size anyway).

The NaN rule (README "NaN, inf and masking") runs in guard twins, launched after the everyday
kernels (``fwd_guard``; every backward): the NaN flag ``nan_flag`` reads q, k and v once (three
max-|x| reductions, a 0-d result, no host sync) and a table gradient gets a second (h, 2L-1)
buffer; on clean inputs the twins' programs return at once.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple, Optional, Union

import torch
import triton

from .attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq
from .attention_fwd import _attn_fwd, _attn_topk_threshold, _dropout_mask_kernel
from .attention_qk import _qk_rows, rows_config
from .kinds import BIAS_ALIBI, BIAS_DENSE_BOOL, BIAS_DENSE_FLOAT, BIAS_NONE, BIAS_TABLE, MASK_BOOL, MASK_FLOAT, MASK_NONE
from .tiles import config, dq_class, precision_of, spec_class  # tile tables: kernels/tiles_sm80.json, tiles_sm90.json

Tensor = torch.Tensor
MAX_HEAD_DIM = 256
MAX_TOPK = 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- configs (pinned, no autotune)

def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# Tile configs: kernels/tiles.py (``config``), tables in kernels/tiles_sm80.json and tiles_sm90.json.


def _arch(device) -> int:
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _precision(dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 operands


# ----------------------------------------------------------------------------- launch helpers

def _dense4(t: Optional[Tensor], b, h, nq, nk):
    """(view, strides, MASK_* kind) of a dense mask/bias broadcast to (b, h, nq, nk) without a copy."""
    if t is None:
        return None, (0, 0, 0, 0), MASK_NONE
    view = t.expand(b, h, nq, nk)
    if view.dtype == torch.bool:
        view = view.view(torch.uint8)
        kind = MASK_BOOL
    else:
        kind = MASK_FLOAT
    return view, tuple(view.stride()), kind


def head_major(table: Optional[Tensor]) -> Optional[Tensor]:
    """A (2L-1, h) distance table as the kernels read it: the same values, each head's column
    contiguous (strides (1, 2L-1)), so that the neighbouring distances of a tile's gather are
    neighbouring addresses. The (h, 1) strides of a row-major table put them 4h bytes apart: about
    16 L1 wavefronts per warp load at h = 16, which the H200 profile of 2026-11-28 (session 11)
    matches with the table costing 2.7 ms in each of the T5 forward and dK/dV (1.5 ms plain)."""
    if table is None or table.t().is_contiguous():
        return table
    return table.t().contiguous().t()


def _slots(q, slopes, table, mask, dense, b, h, nq, nk):
    """Kernel arguments shared by every pass: pointers, strides and the bias/mask kinds."""
    mview, mstr, mkind = _dense4(mask, b, h, nq, nk)
    bview, bstr, bkind = _dense4(dense, b, h, nq, nk)
    if slopes is not None:
        bias_kind = BIAS_ALIBI
    elif table is not None:
        bias_kind = BIAS_TABLE
    elif dense is not None:
        bias_kind = BIAS_DENSE_FLOAT if bkind == MASK_FLOAT else BIAS_DENSE_BOOL
    else:
        bias_kind = BIAS_NONE
    mask_kind = mkind
    tab = table if table is not None else q
    tstr = tuple(table.stride()) if table is not None else (0, 0)
    center = (table.shape[0] - 1) // 2 if table is not None else 0
    ptrs = (slopes if slopes is not None else q, tab, mview if mview is not None else q,
            bview if bview is not None else q)
    scal = (tstr[0], tstr[1], center) + mstr + bstr
    return ptrs, scal, bias_kind, mask_kind


def _seed(seed: int, device) -> Tensor:
    """The dropout seed as a 0-d int64 tensor on ``device``; the kernels load it from its pointer.

    ``seed >= 0``: that seed (the same Philox streams as ever: bit-reproducible). Otherwise drawn on
    the device with torch's generator -- no host round trip, and on CUDA the draw advances the
    generator's Philox offset, which CUDA-graph capture records, so each replay of a captured graph
    draws a fresh seed (a host-drawn int would be baked into the graph: one mask forever)."""
    if seed >= 0:
        return torch.full((), seed, dtype=torch.int64, device=device)
    return torch.randint(0, 2 ** 30, (), dtype=torch.int64, device=device)


MAX_PROGRAMS = 2 ** 31 - 1  # CUDA grid axis 0 (axes 1 and 2: 65,535)


def launch_grids(b: int, h: int, hk: int, nq: int, nk: int, tiles: dict, dkdv_split: int = 1) -> dict:
    """The grid of each launch, ``kind -> (programs,)``: (blocks x batch*heads) folded onto axis 0,
    blocks fastest, as the kernels decode it (``attention_common._fold``).

    ``tiles``: kind -> (BLOCK_M, BLOCK_N) for any of 'fwd', 'thr', 'dq', 'mask' (the dropout-mask
    debug kernel): query blocks x b*h; 'dkdv': key blocks x b*hk x ``dkdv_split`` (``dkdv_split``'s
    slices of the GQA group). Axis 0 holds 2^31 - 1 programs
    where axes 1 and 2 hold 65,535 (b*h on axis 1 failed to launch at a decode batch of 2,048 x 32
    heads); raises ValueError past that (a q of that many tiles fits in no GPU's memory)."""
    grids = {}
    for kind, (bm, bn) in tiles.items():
        n = triton.cdiv(nk, bn) * b * hk * dkdv_split if kind == "dkdv" else triton.cdiv(nq, bm) * b * h
        if n > MAX_PROGRAMS:
            raise ValueError(f"xtk attention: {kind} launch needs {n} programs > {MAX_PROGRAMS} (grid axis 0)")
        grids[kind] = (n,)
    return grids


def dkdv_split(programs: int, group: int, sms: int) -> int:
    """Slices of the GQA group for the dK/dV kernel (``attention_bwd._attn_bwd_dkdv``), given its
    ``programs`` (key blocks x b*hk) unsplit, the ``group`` size h // hk and the GPU's ``sms``.

    One program walks its whole group serially, so MQA at batch 1 (n 4096, 64-key blocks: 64
    programs of 16 heads each) leaves half of a 132-SM GPU idle. Only when ``programs < sms``: the
    split s minimizing the modelled time (waves of programs * s on ``sms``) x (heads per slice),
    one program per SM assumed, the smallest s on a tie, among the splits whose every slice holds
    heads; taken only where it models at most 0.8x the unsplit time (the partial dK/dV buffers,
    fp32, s x the dK/dV size, and their sum are paid only where they buy clear parallelism; never
    timed on a GPU). 1 on no GPU (``sms`` 0) and whenever the grid already fills the GPU."""
    if programs <= 0 or programs >= sms or group <= 1:
        return 1

    def modelled_time(s):
        return triton.cdiv(programs * s, sms) * triton.cdiv(group, s)
    splits = {triton.cdiv(group, triton.cdiv(group, s)) for s in range(1, group + 1)}  # no empty slice
    best = min(splits, key=lambda s: (modelled_time(s), s))
    return best if modelled_time(best) <= 0.8 * modelled_time(1) else 1


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device``; 0 off CUDA (the interpreter: no split, see ``dkdv_split``)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 0


def _blocks(cfg: dict) -> tuple:
    """(BLOCK_M, BLOCK_N) of a tile config, for ``launch_grids``."""
    return cfg["BLOCK_M"], cfg["BLOCK_N"]


MAX_FEATURE_STRIDE = 2 ** 23  # x 256 head-dim columns: a tile's int32 column offsets stay below 2^31


def _narrow_cols(t: Tensor) -> Tensor:
    """``t``, or a contiguous copy when its feature (last-dim) stride reaches 2^23 elements: the
    kernels address a tile's columns (the head dim, < 256) with int32 offsets and only its rows
    with int64 ones (``attention_common._tile_ptrs``). Models never make such a layout (their
    feature stride is 1); a view that does pays one copy instead of every tile paying int64 math."""
    if t.dim() and t.stride(-1) >= MAX_FEATURE_STRIDE:
        return t.contiguous()
    return t


def _device_guard(device):
    """Launch on ``device``: under ``torch.cuda.device(device)`` Triton takes that device's context
    and current stream (tensors on cuda:1 while cuda:0 is current would otherwise launch on cuda:0)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class QKArgs(NamedTuple):
    """The QK features: the trailing arguments of both custom ops, in their order (applied per row
    by ``_qk_rows`` before the attention kernels; in-kernel by the decode kernel).

    groups > 0: grouped l2 norm; q_scale (h, d) and k_scale (hk, d) fp32 per-dim scales (both or
    neither); rot_dim > 0: rotary with inv_freq (rot_dim // 2,) fp32, xpos (rot_dim // 2,) fp32
    when given, max_half = max(q_offset + nq, nk - k_prefix) // 2, xpos_base and interp (the
    interpolation factor) as in ``attention_common._rotate_pairs``; logit_scale: a 0-d fp32 learned
    QK-norm scale (then the op's ``scale`` is 1 and q_scale / k_scale are given), multiplied into
    q_scale in the kernels, its gradient formed apart (NEED_DLSC)."""

    q_scale: Optional[Tensor] = None
    k_scale: Optional[Tensor] = None
    inv_freq: Optional[Tensor] = None
    xpos: Optional[Tensor] = None
    groups: int = 0
    rot_dim: int = 0
    max_half: int = 0
    xpos_base: float = 1.0
    interp: float = 1.0
    logit_scale: Optional[Tensor] = None


NO_QK = QKArgs()


def _qk_slots(q, qk: QKArgs):
    """Kernel arguments of QK-norm / rotary / xpos (the row kernel's, the decode kernel's): pointers
    (q scale, k scale, inv_freq, xpos), scalars (R, max_half, xpos_base, interp), constexprs."""
    qsc = qk.q_scale
    if qk.logit_scale is not None:  # a learned QK-norm logit scale: folded into q's dim scale
        qsc = qsc * qk.logit_scale
    ptrs = tuple(t if t is not None else q for t in (qsc, qk.k_scale, qk.inv_freq, qk.xpos))
    scal = (qk.rot_dim, qk.max_half, float(qk.xpos_base), float(qk.interp))
    meta = dict(HAS_NORM=qk.groups > 0, GROUPS=max(qk.groups, 1), HAS_DSCALE=qsc is not None, HAS_ROT=qk.rot_dim > 0,
                HAS_XPOS=qk.xpos is not None)
    return ptrs, scal, meta


def _uses_qk(meta) -> bool:
    return bool(meta["HAS_NORM"] or meta["HAS_DSCALE"] or meta["HAS_ROT"])


class Varlen(NamedTuple):
    """A packed batch of variable-length sequences (the VARLEN switch): q/k/v/out/dO and their
    gradients are the packed ``(total, heads, d)`` tensors seen as ``(1, heads, total, d)`` views;
    ``cu_q`` / ``cu_k`` the int32 ``(B + 1,)`` device offsets (never read on the host); ``max_q`` /
    ``max_k`` bound every sequence's length and size the grids and the row statistics, which are
    (B, h, [2,] max_q) with sequence b's rows first (the rest never written nor read)."""

    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int


def _sizes(q, k, v, varlen: Optional[Varlen]):
    """(b, h, nq, d, hk, nk, dv) as the grids and row statistics count them: the batch entries and
    their length, or for a packed batch the sequences and the longest lengths allowed."""
    b, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    if varlen is not None:
        b, nq, nk = varlen.cu_q.shape[0] - 1, varlen.max_q, varlen.max_k
    return b, h, nq, d, hk, nk, dv


def _strides(varlen: Optional[Varlen], *ts: Tensor) -> tuple:
    """The kernels' (batch, head, row, feature) strides of each of ``ts``, one flat tuple: a packed
    tensor's rows are found from the sequence starts, so its batch stride is 0."""
    return tuple(x for t in ts for x in ((0, *t.stride()[1:]) if varlen is not None else t.stride()))


def _cu_args(varlen: Optional[Varlen], dummy: Tensor) -> tuple:
    """The kernels' CU_Q, CU_K and VARLEN switch (any pointer stands in without VARLEN: never read)."""
    if varlen is None:
        return (dummy, dummy), dict(VARLEN=False)
    return (varlen.cu_q, varlen.cu_k), dict(VARLEN=True)


def _packed_out(q: Tensor, nrows: int, h: int, dv: int) -> Tensor:
    """A packed (nrows, h, dv) output seen as (1, h, nrows, dv), like q's view."""
    return torch.empty(nrows, h, dv, dtype=q.dtype, device=q.device).permute(1, 0, 2)[None]


def _pad_rows(x: Tensor, varlen: Varlen, n: int) -> Tensor:
    """Per-row values ``x`` (h, total_q) of a packed batch as (B, h, n), sequence b's rows at [b, :, :len_b]
    (zeros past them); the row -> (sequence, position) map is formed on the device, no host read."""
    rows = torch.arange(x.shape[-1], device=x.device)
    cu = varlen.cu_q.to(torch.int64)
    seq = torch.searchsorted(cu[1:], rows, right=True)
    out = x.new_zeros(cu.shape[0] - 1, x.shape[0], n)
    out[seq, :, rows - cu[seq]] = x.t()
    return out


# ----------------------------------------------------------------------------- the NaN rule's guard twins

def nan_flag(*ts: Tensor) -> Tensor:
    """The guard twins' NANF: a 0-d int32 on the tensors' device, 1 when any of ``ts`` holds a NaN
    or inf, else 0. One max-|x| reduction per tensor (a NaN propagates through it), no host read:
    the twins read it on the device and return at once when it is 0."""
    peaks = [torch.linalg.vector_norm(t, float("inf")).float().reshape(1) for t in ts if t.numel()]
    if not peaks:
        return torch.zeros((), dtype=torch.int32, device=ts[0].device)
    return (~torch.isfinite(torch.cat(peaks))).any().to(torch.int32)


def fwd_guard(mask_kind: int, bias_kind: int) -> int:
    """The forward's guard twin (``attention_fwd``'s NAN_GUARD): 1 (the flagged redo) with a float
    mask or dense bias, where a -inf entry must mask a NaN logit; 2 (zero the empty rows: it reads
    the row statistics, writes only those rows) otherwise, so that a masked key's NaN v never
    reaches a row with no unmasked key as 0 x NaN (bool masks, causal rows before every key, and
    rows whose every logit is -inf, an inf in q or k: any call can have one). With top-k the
    threshold pass has a flagged twin too, on every call (topk +inf logits keep only those)."""
    return 1 if mask_kind == MASK_FLOAT or bias_kind == BIAS_DENSE_FLOAT else 2


def _qk_rows_launch(x: Tensor, g: Optional[Tensor], y: Tensor, dsc_part: Tensor, is_key: bool, slots: tuple,
                    b: int, nq: int, nk: int, q_offset: int, k_prefix: int, varlen: Optional[Varlen]):
    """One launch of ``attention_qk._qk_rows`` over the rows of ``x`` (q: (b, h, nq, d); k: (b, hk, nk, d);
    packed views under ``varlen``): ``y = x'`` (``g`` None) or ``y = dL/dx`` from ``g = dL/dx'``
    (fp32), the dim-scale partials into ``dsc_part`` (b, heads, blocks, d) fp32. ``slots``: the
    call's ``_qk_slots`` (formed once per call: it multiplies a learned scale into q's)."""
    heads, n, d = x.shape[1], (nk if is_key else nq), x.shape[3]
    cfg = rows_config(d)
    ptrs, scal, meta = slots  # (q scale, k scale, inv_freq, xpos) pointers
    cu_ptrs, cu_meta = _cu_args(varlen, x)
    backward = g is not None
    g = g if backward else x  # any pointer: the forward never reads G
    _qk_rows[(triton.cdiv(n, cfg["BLOCK_N"]) * b * heads,)](
        x, g, y, ptrs[1] if is_key else ptrs[0], dsc_part, ptrs[2], ptrs[3], *cu_ptrs, *_strides(varlen, x, g, y),
        heads, nq, nk, d, q_offset, k_prefix, *scal, IS_KEY=is_key, BACKWARD=backward, **meta, **cu_meta, **cfg)


def _qk_apply(q: Tensor, k: Tensor, slots: tuple, b, nq, nk, q_offset, k_prefix, varlen) -> tuple[Tensor, Tensor]:
    """(q', k'): the QK features applied once per row, in q's / k's dtype (call under the device guard)."""
    qp, kp = torch.empty_like(q), torch.empty_like(k)
    for x, y, is_key in ((q, qp, False), (k, kp, True)):
        _qk_rows_launch(x, None, y, x, is_key, slots, b, nq, nk, q_offset, k_prefix, varlen)
    return qp, kp


def _qk_chain(q, k, dqp, dkp, slots: tuple, b, nq, nk, q_offset, k_prefix, varlen) -> tuple:
    """(dq, dk, d q-scale (h, d) | (0,), d k-scale (hk, d) | (0,)) from the fp32 dL/dq', dL/dk' of the
    attention backward: chained through the QK features per row; the dim-scale gradients summed
    from per-block partials here (deterministic). Call under the device guard."""
    has_dsc = slots[2]["HAS_DSCALE"]
    out = []
    for x, g, is_key, n in ((q, dqp, False, nq), (k, dkp, True, nk)):
        dx = torch.empty_like(x)
        blocks = triton.cdiv(n, rows_config(x.shape[3])["BLOCK_N"]) if has_dsc else 0
        part = torch.zeros(b, x.shape[1], blocks, x.shape[3], dtype=torch.float32, device=x.device)
        if x.numel():
            _qk_rows_launch(x, g, dx, part, is_key, slots, b, nq, nk, q_offset, k_prefix, varlen)
        out.append((dx, part.sum((0, 2)) if has_dsc else part.new_empty(0)))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def _forward(q, k, v, slopes, table, mask, dense, scale, is_causal, q_offset, k_prefix, topk, dropout_p, seed,
             qk=NO_QK, gqa_repeat=False, varlen: Optional[Varlen] = None):
    q, k, v = (_narrow_cols(t) for t in (q, k, v))
    table = head_major(table)
    b, h, nq, d, hk, nk, dv = _sizes(q, k, v, varlen)
    if varlen is None:
        out = torch.empty(b, h, nq, dv, dtype=q.dtype, device=q.device)
    else:
        out = _packed_out(q, q.shape[2], h, dv)
    # a packed batch's row statistics past a sequence's length are never written: zeros, not garbage
    rows = torch.empty if varlen is None else torch.zeros
    stats = rows(b, h, 2, nq, dtype=torch.float32, device=q.device)  # row max, row sum
    has_topk = 0 < topk < nk
    thr = rows(b, h, nq if has_topk else 0, dtype=torch.float32, device=q.device)
    qk_slots = _qk_slots(q, qk)
    uses_qk = _uses_qk(qk_slots[2])  # applied to the rows first: not part of the kernels' class
    cls = spec_class(*_slots(q, slopes, table, mask, dense, b, h, nq, nk)[2:], has_topk, dropout_p > 0.0)
    tprec = precision_of(_precision(q.dtype), q.element_size())
    cfg = config("fwd", d, dv, _arch(q.device), topk if has_topk else 0, precision=tprec, cls=cls)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    ptrs, scal, bias_kind, mask_kind = _slots(q, slopes, table, mask, dense, b, h, nq, nk)
    prec = _precision(q.dtype)
    if nq == 0 or b * h == 0:
        return out, stats, thr
    cu_ptrs, cu_meta = _cu_args(varlen, stats)
    guard = fwd_guard(mask_kind, bias_kind)
    with _device_guard(q.device):
        if uses_qk:
            q, k = _qk_apply(q, k, qk_slots, b, nq, nk, q_offset, k_prefix, varlen)
        # NANF (any pointer where no twin reads it); top-k's threshold twin runs on every top-k call
        flag = nan_flag(q, k, v) if guard == 1 or has_topk else stats
        if has_topk:
            cfg_thr = config("thr", d, dv, _arch(q.device), topk, precision=tprec, cls=cls)
            grid_thr = launch_grids(b, h, hk, nq, nk, dict(thr=_blocks(cfg_thr)))["thr"]
            for mode in (0, 1):
                _attn_topk_threshold[grid_thr](
                    q, k, thr, *ptrs, *cu_ptrs, flag, *_strides(varlen, q, k), *scal,
                    h, hk, nq, nk, d, q_offset, k_prefix, scale, topk,
                    IS_CAUSAL=is_causal, BIAS_KIND=bias_kind, MASK_KIND=mask_kind, PRECISION=prec,
                    GQA_REPEAT=gqa_repeat, **cu_meta, NAN_GUARD=mode, K2=triton.next_power_of_2(topk),
                    BLOCK_D=block_d(d), **cfg_thr)
        grid = launch_grids(b, h, hk, nq, nk, dict(fwd=(bm, bn)))["fwd"]
        for mode in (0, guard):  # the everyday kernel, then its guard twin
            _attn_fwd[grid](
                q, k, v, out, stats, thr if has_topk else stats, *ptrs, *cu_ptrs, flag,
                *_strides(varlen, q, k, v, out), *scal,
                h, hk, nq, nk, d, dv, q_offset, k_prefix, scale, dropout_p, seed,
                IS_CAUSAL=is_causal, BIAS_KIND=bias_kind, MASK_KIND=mask_kind, HAS_TOPK=has_topk,
                HAS_DROPOUT=dropout_p > 0.0, PRECISION=prec, GQA_REPEAT=gqa_repeat, **cu_meta,
                NAN_GUARD=mode, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(d), BLOCK_DV=block_d(dv),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, stats, thr


def _backward(do, q, k, v, out, stats, thr, seed, slopes, table, mask, dense, scale, is_causal, q_offset,
              k_prefix, topk, dropout_p, need_dslopes, need_dtable, need_ds, qk=NO_QK, need_dlsc=False,
              gqa_repeat=False, varlen: Optional[Varlen] = None):
    do, q, k, v = (_narrow_cols(t) for t in (do, q, k, v))
    table = head_major(table)  # the table gradient's atomics take the same layout (zeros_like keeps strides)
    b, h, nq, d, hk, nk, dv = _sizes(q, k, v, varlen)
    has_topk = 0 < topk < nk
    arch = _arch(q.device)
    tprec = precision_of(_precision(q.dtype), q.element_size())
    qk_slots = _qk_slots(q, qk)
    uses_qk = _uses_qk(qk_slots[2])  # applied to the rows first: not part of the kernels' class
    cls = spec_class(*_slots(q, slopes, table, mask, dense, b, h, nq, nk)[2:], has_topk, dropout_p > 0.0)
    cfg_kv = config("dkdv", d, dv, arch, topk if has_topk else 0, precision=tprec, cls=cls)
    cfg = config("dq", d, dv, arch, topk if has_topk else 0, precision=tprec, cls=dq_class(cls, need_dlsc))
    n_mblocks = triton.cdiv(nq, cfg["BLOCK_M"])
    dslopes = torch.zeros(b, h, n_mblocks if need_dslopes else 0, dtype=torch.float32, device=q.device)
    dtab = torch.zeros_like(table, dtype=torch.float32) if need_dtable else q.new_empty(0, dtype=torch.float32)
    dlsc = torch.zeros(b, h, n_mblocks if need_dlsc else 0, dtype=torch.float32, device=q.device)
    ds = torch.zeros(b, h, nq, nk, dtype=torch.float32, device=q.device) if need_ds else q.new_empty(0, dtype=torch.float32)
    # with QK features the kernels take q', k' and give fp32 dL/dq', dL/dk' for ``_qk_chain``
    grad_of = (lambda x: torch.empty_like(x, dtype=torch.float32)) if uses_qk else torch.empty_like
    dq, dk, dvv = grad_of(q), grad_of(k), torch.empty_like(v)
    dqsc, dksc = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    with _device_guard(q.device):
        if b * h == 0 or nq == 0 or nk == 0:
            dq.zero_(), dk.zero_(), dvv.zero_()
        else:
            qp, kp = _qk_apply(q, k, qk_slots, b, nq, nk, q_offset, k_prefix, varlen) if uses_qk else (q, k)
            dtab = _backward_kernels(do, qp, kp, v, out, stats, thr, seed, slopes, table, mask, dense, scale,
                                     is_causal, q_offset, k_prefix, topk, dropout_p, (dq, dk, dvv, dslopes, dtab, ds,
                                     dlsc), (cfg_kv, cfg), gqa_repeat, varlen)
        if uses_qk:
            dq, dk, dqsc, dksc = _qk_chain(q, k, dq, dk, qk_slots, b, nq, nk, q_offset, k_prefix, varlen)
    return (dq, dk, dvv, dslopes.sum((0, 2)), dtab.contiguous(), ds, dqsc, dksc,
            dlsc.sum() if need_dlsc else dlsc.new_empty(0))


def _backward_kernels(do, q, k, v, out, stats, thr, seed, slopes, table, mask, dense, scale, is_causal, q_offset,
                      k_prefix, topk, dropout_p, bufs, cfgs, gqa_repeat, varlen):
    """The dK/dV and dQ kernels and their guard twins into ``bufs`` (dq, dk, dv, ALiBi partials, table
    gradient, dS, logit-scale partials; the unused ones (0,)-sized); -> the table gradient."""
    dq, dk, dvv, dslopes, dtab, ds, dlsc = bufs
    cfg_kv, cfg = cfgs
    b, h, nq, d, hk, nk, dv = _sizes(q, k, v, varlen)
    need_dslopes, need_dtable, need_ds, need_dlsc = (t.numel() > 0 for t in (dslopes, dtab, ds, dlsc))
    delta = (do.float() * out.float()).sum(-1)  # (b, h, nq): the preprocess, O(n)
    if varlen is not None:
        delta = _pad_rows(delta[0], varlen, nq)
    cu_ptrs, cu_meta = _cu_args(varlen, stats)
    ptrs, scal, bias_kind, mask_kind = _slots(q, slopes, table, mask, dense, b, h, nq, nk)
    has_topk = 0 < topk < nk
    common = dict(IS_CAUSAL=is_causal, BIAS_KIND=bias_kind, MASK_KIND=mask_kind, HAS_TOPK=has_topk,
                  HAS_DROPOUT=dropout_p > 0.0, PRECISION=_precision(q.dtype), BLOCK_D=block_d(d), BLOCK_DV=block_d(dv),
                  GQA_REPEAT=gqa_repeat, **cu_meta)
    thr_arg = thr if has_topk else stats
    seed = seed.to(q.device)  # the forward's device seed (a no-op); a host seed tensor is copied over
    kv_programs = launch_grids(b, h, hk, nq, nk, dict(dkdv=_blocks(cfg_kv)))["dkdv"][0]
    n_split = dkdv_split(kv_programs, h // hk, sm_count(q.device))
    grids = launch_grids(b, h, hk, nq, nk, dict(dkdv=_blocks(cfg_kv), dq=_blocks(cfg)), dkdv_split=n_split)
    # split: each slice of the group writes fp32 partials as heads s * hk + kv head, summed below
    dk_out, dv_out = (dk, dvv) if n_split == 1 else (
        torch.empty(t.shape[0], n_split * hk, *t.shape[2:], dtype=torch.float32, device=t.device) for t in (dk, dvv))
    # the guard twins run after every backward: any call can mask a pair -- by a mask, causal,
    # top-k, or a -inf logit (an inf in q or k) -- whose NaN/inf then meets the gradient products
    flag = nan_flag(q, k, v)
    # the table gradient's atomics cannot be taken back: the dQ twin adds into a buffer of its own
    dtab_guard = torch.zeros_like(dtab) if need_dtable else dtab

    def dkdv(mode):
        _attn_bwd_dkdv[grids["dkdv"]](
            q, k, v, do, dk_out, dv_out, stats, delta, thr_arg, *ptrs, *cu_ptrs, flag,
            *_strides(varlen, q, k, v, do, dk_out, dv_out), *scal,
            h, hk, nq, nk, d, dv, q_offset, k_prefix, scale, dropout_p, seed, n_split, **common, NAN_GUARD=mode,
            GROUP_SPLIT=n_split > 1, **cfg_kv)

    def dq_pass(mode, dtab_out):
        _attn_bwd_dq[grids["dq"]](
            q, k, v, do, dq, stats, delta, thr_arg, *ptrs, dslopes if need_dslopes else stats,
            dtab_out if need_dtable else stats, ds if need_ds else stats, dlsc if need_dlsc else stats, *cu_ptrs, flag,
            *_strides(varlen, q, k, v, do, dq), *scal,
            h, hk, nq, nk, d, dv, q_offset, k_prefix, scale, dropout_p, seed,
            NEED_DSLOPE=need_dslopes, NEED_DTAB=need_dtable, NEED_DS=need_ds, NEED_DLSC=need_dlsc, **common,
            NAN_GUARD=mode, **cfg)

    dkdv(False)
    dq_pass(False, dtab)
    dq_pass(True, dtab_guard)  # the twins: the dQ one first (it stores the delta the dK/dV one reads)
    dkdv(True)
    if n_split > 1:
        for out, part in ((dk, dk_out), (dvv, dv_out)):
            out.copy_(part.unflatten(1, (n_split, hk)).sum(1))
    return torch.where(flag != 0, dtab_guard, dtab) if need_dtable else dtab


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("xtk::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, slopes: Optional[Tensor], table: Optional[Tensor],
                  mask: Optional[Tensor], dense: Optional[Tensor], scale: float, is_causal: bool, q_offset: int,
                  k_prefix: int, topk: int, dropout_p: float, seed: int, q_scale: Optional[Tensor] = None, k_scale: Optional[Tensor] = None,
                  inv_freq: Optional[Tensor] = None, xpos: Optional[Tensor] = None, groups: int = 0, rot_dim: int = 0,
                  max_half: int = 0, xpos_base: float = 1.0, interp: float = 1.0,
                  logit_scale: Optional[Tensor] = None, gqa_repeat: bool = False,
                  cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0,
                  max_seqlen_k: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out (b,h,nq,dv), softmax stats (b,h,2,nq) fp32 (row max, row sum), top-k threshold (b,h,nq|0) fp32,
    the dropout seed used (int64 0-d, on q's device; 0 without dropout)).

    slopes: (h,) fp32 ALiBi slopes (0 for heads without one) | table: (2L-1, h) fp32 per-distance
    bias, row clamp(p_i - p_j, -(L-1), L-1) + L-1 (distances beyond it take the edge rows; any
    strides: the kernels read a head-major copy, ``head_major``) | dense:
    float or bool tensor broadcastable to (b,h,nq,nk); at most one of the three.
    mask: attn_mask, float or bool, broadcastable. topk 0: off. seed < 0: draw one on q's device
    with torch's generator (``_seed``: fresh per CUDA-graph replay); seed >= 0: reproducible.
    q_scale ... logit_scale: the QK features (``QKArgs``), applied once per q/k row (``_qk_rows``).
    gqa_repeat: query head i reads kv head i % hk (x-transformers' order) instead of i // (h / hk).
    cu_seqlens_q / cu_seqlens_k (int32 (B + 1,), on q's device) given: a packed batch of B sequences
    (``Varlen``): q/k/v are the packed (total, heads, d) tensors seen as (1, heads, total, d), every
    position and mask per sequence, and b / nq / nk above read B / max_seqlen_q / max_seqlen_k
    (the output is (1, h, total_q, dv), a view of a packed (total_q, h, dv) tensor)."""
    seed_t = _seed(seed if dropout_p > 0.0 else 0, q.device)
    out, stats, thr = _forward(q, k, v, slopes, table, mask, dense, scale, is_causal, q_offset, k_prefix, topk,
                               dropout_p, seed_t, QKArgs(q_scale, k_scale, inv_freq, xpos, groups, rot_dim, max_half,
                                                         xpos_base, interp, logit_scale), gqa_repeat,
                               _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return out, stats, thr, seed_t


def _varlen(cu_q, cu_k, max_q: int, max_k: int) -> Optional[Varlen]:
    return None if cu_q is None else Varlen(cu_q, cu_k, max_q, max_k)


@attention_fwd.register_fake
def _(q, k, v, slopes, table, mask, dense, scale, is_causal, q_offset, k_prefix, topk, dropout_p, seed, q_scale=None,
      k_scale=None, inv_freq=None, xpos=None, groups=0, rot_dim=0, max_half=0, xpos_base=1.0, interp=1.0,
      logit_scale=None, gqa_repeat=False, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    b, h, nq, _, _, nk, dv = _sizes(q, k, v, varlen)
    out = q.new_empty(b, h, nq, dv) if varlen is None else _packed_out(q, q.shape[2], h, dv)
    stats = q.new_empty(b, h, 2, nq, dtype=torch.float32)
    thr = q.new_empty(b, h, nq if 0 < topk < nk else 0, dtype=torch.float32)
    return out, stats, thr, q.new_empty((), dtype=torch.int64)


@torch.library.custom_op("xtk::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor, thr: Tensor,
                  seed: Tensor, slopes: Optional[Tensor], table: Optional[Tensor], mask: Optional[Tensor],
                  dense: Optional[Tensor], scale: float, is_causal: bool, q_offset: int, k_prefix: int, topk: int,
                  dropout_p: float, need_dslopes: bool, need_dtable: bool,
                  need_ds: bool, q_scale: Optional[Tensor] = None, k_scale: Optional[Tensor] = None,
                  inv_freq: Optional[Tensor] = None, xpos: Optional[Tensor] = None, groups: int = 0, rot_dim: int = 0,
                  max_half: int = 0, xpos_base: float = 1.0, interp: float = 1.0,
                  logit_scale: Optional[Tensor] = None, need_dlsc: bool = False, gqa_repeat: bool = False,
                  cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0,
                  max_seqlen_k: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv, dslopes (h,)|(0,), dtable like table|(0,), dS (b,h,nq,nk) fp32 | (0,),
    d q_scale (h, d) fp32 | (0,), d k_scale (hk, d) fp32 | (0,), sum of dS * (q'.k') * scale 0-d
    fp32 | (0,)): q' and k' are recomputed per row and the gradients chained back to the
    raw q and k; the dim-scale gradients are those of the effective q scale (q_scale * logit_scale).
    seed: the forward's 0-d int64 seed tensor, read by the kernels on the device (no host sync).
    cu_seqlens_q ... max_seqlen_k: a packed batch, as in ``attention_fwd`` (b, nq, nk of dS: B,
    max_seqlen_q, max_seqlen_k)."""
    return _backward(do, q, k, v, out, stats, thr, seed, slopes, table, mask, dense, scale, is_causal,
                     q_offset, k_prefix, topk, dropout_p, need_dslopes, need_dtable, need_ds,
                     QKArgs(q_scale, k_scale, inv_freq, xpos, groups, rot_dim, max_half, xpos_base, interp, logit_scale),
                     need_dlsc, gqa_repeat, _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


@attention_bwd.register_fake
def _(do, q, k, v, out, stats, thr, seed, slopes, table, mask, dense, scale, is_causal, q_offset, k_prefix, topk,
      dropout_p, need_dslopes, need_dtable, need_ds, q_scale=None, k_scale=None, inv_freq=None, xpos=None, groups=0,
      rot_dim=0, max_half=0, xpos_base=1.0, interp=1.0, logit_scale=None, need_dlsc=False, gqa_repeat=False,
      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    b, h, nq, d, hk, nk, _ = _sizes(q, k, v, _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(h if need_dslopes else 0, **f32),
            table.new_empty(table.shape, **f32) if need_dtable else q.new_empty(0, **f32),
            q.new_empty((b, h, nq, nk) if need_ds else (0,), **f32),
            q.new_empty((h, d) if q_scale is not None else (0,), **f32),
            q.new_empty((hk, d) if q_scale is not None else (0,), **f32),
            q.new_empty(() if need_dlsc else (0,), **f32))


_VARLEN_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
# the forward op's arguments, in order (checked against its schema below): the autograd rule reads
# them, their needs_input_grad and its saved tensors by name
_FWD_ARGS = ("q", "k", "v", "slopes", "table", "mask", "dense", "scale", "is_causal", "q_offset", "k_prefix", "topk",
             "dropout_p", "seed") + QKArgs._fields + ("gqa_repeat",) + _VARLEN_ARGS
_SAVED = ("q", "k", "v", "out", "stats", "thr", "seed_t", "slopes", "table", "mask", "dense", "q_scale", "k_scale",
          "inv_freq", "xpos", "logit_scale", "cu_seqlens_q", "cu_seqlens_k")
assert tuple(a.name for a in torch.ops.xtk.attention_fwd.default._schema.arguments) == _FWD_ARGS


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    args["out"], args["stats"], args["thr"], args["seed_t"] = output
    ctx.save_for_backward(*(args.get(n) for n in _SAVED))  # trailing arguments are absent when the call defaulted them
    ctx.args = {n: args.get(n, False) for n in ("scale", "is_causal", "q_offset", "k_prefix", "topk", "dropout_p",
                                                "gqa_repeat")}
    ctx.args.update(max_seqlen_q=args.get("max_seqlen_q", 0), max_seqlen_k=args.get("max_seqlen_k", 0))
    ctx.qk_ints = {n: args[n] for n in ("groups", "rot_dim", "max_half", "xpos_base", "interp")}


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a (b, h, nq, nk) gradient over the dims ``like`` broadcasts, back to ``like``'s shape."""
    shape = (1,) * (4 - like.dim()) + tuple(like.shape)
    dims = [i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1]
    if dims:
        grad = grad.sum(dims, keepdim=True)
    return grad.reshape(like.shape).to(like.dtype)


def _table_grad_from_ds(ds: Tensor, table: Tensor, q_offset: int, k_prefix: int) -> Tensor:
    """Deterministic distance-table gradient: the sums of dS (b, h, nq, nk) along each diagonal
    ``p_i - p_j`` of the positional keys, by the skew trick (pad, flatten, re-view), no scatter;
    the diagonals beyond the table summed into its edge rows (``attention_fwd``'s clamp)."""
    b, h, nq, nk = ds.shape
    dtab = torch.zeros(table.shape, dtype=torch.float32, device=ds.device)
    pos = ds[..., k_prefix:].sum(0).flip(-1)  # (h, nq, np); column c holds key j = np - 1 - c
    npos = pos.shape[-1]
    if npos == 0 or nq == 0:
        return dtab
    width = npos + nq
    skew = torch.nn.functional.pad(pos, (0, nq)).reshape(h, nq * width)[:, :nq * (width - 1)]
    diag = skew.reshape(h, nq, width - 1).sum(1).t()  # row t: p_i - p_j = q_offset + t - (np - 1)
    last = table.shape[0] - 1
    start = last // 2 + q_offset - (npos - 1)  # the table row of diagonal 0 (may lie outside the table)
    lo, hi = max(0, -start), min(diag.shape[0], last - start + 1)  # diagonals [lo, hi) fall inside
    if lo >= hi:  # every diagonal beyond one edge
        dtab[0 if start < 0 else last] += diag.sum(0)
        return dtab
    dtab[start + lo:start + hi] = diag[lo:hi]
    dtab[start + lo] += diag[:lo].sum(0)  # beyond the lower edge: onto the first row inside
    dtab[start + hi - 1] += diag[hi:].sum(0)
    return dtab


def _backward_rule(ctx, dout, dlse, dthr, dseed):
    t = dict(zip(_SAVED, ctx.saved_tensors))
    # needs_input_grad covers the arguments the call passed (the QK ones are defaulted): missing = False
    need = dict.fromkeys(_FWD_ARGS, False) | dict(zip(_FWD_ARGS, ctx.needs_input_grad))
    a = ctx.args
    slopes, table, mask, dense, logit_scale = t["slopes"], t["table"], t["mask"], t["dense"], t["logit_scale"]
    need_dslopes = bool(need["slopes"]) and slopes is not None
    need_dtable = bool(need["table"]) and table is not None
    need_dmask = bool(need["mask"]) and mask is not None and mask.is_floating_point()
    need_ddense = bool(need["dense"]) and dense is not None and dense.is_floating_point()
    # the table gradient scatters dS by distance with atomics (unordered); in deterministic mode
    # take dS whole instead (O(b h nq nk) memory, that mode only) and sum its diagonals in torch
    det_table = need_dtable and torch.are_deterministic_algorithms_enabled()
    need_dlsc = bool(need["logit_scale"]) and logit_scale is not None
    dq, dk, dv, dslopes, dtab, ds, dqsc, dksc, dlsc = attention_bwd(
        dout, t["q"], t["k"], t["v"], t["out"], t["stats"], t["thr"], t["seed_t"], slopes, table, mask, dense,
        a["scale"], a["is_causal"], a["q_offset"], a["k_prefix"], a["topk"], a["dropout_p"], need_dslopes,
        need_dtable and not det_table, need_dmask or need_ddense or det_table,
        t["q_scale"], t["k_scale"], t["inv_freq"], t["xpos"], **ctx.qk_ints, logit_scale=logit_scale,
        need_dlsc=need_dlsc, gqa_repeat=a["gqa_repeat"], cu_seqlens_q=t["cu_seqlens_q"],
        cu_seqlens_k=t["cu_seqlens_k"], max_seqlen_q=a["max_seqlen_q"], max_seqlen_k=a["max_seqlen_k"])
    if det_table:
        dtab = _table_grad_from_ds(ds, table, a["q_offset"], a["k_prefix"])
    if need_dlsc:
        # dL/d(lambda) = sum dS * d(logit)/d(lambda) = (sum dS * logit) / lambda; at lambda = 0 (q' = 0,
        # the logits carry no trace of it) from the effective q scale's gradient instead
        nonzero = logit_scale != 0
        dlsc = torch.where(nonzero, dlsc / torch.where(nonzero, logit_scale, 1.0), (dqsc * t["q_scale"]).sum())
    if logit_scale is not None:
        dqsc = dqsc * logit_scale  # the kernels' q scale is q_scale * logit_scale
    grads = dict(q=dq, k=dk, v=dv,
                 slopes=dslopes.to(slopes.dtype) if need_dslopes else None,
                 table=dtab.to(table.dtype) if need_dtable else None,
                 mask=_reduce_to(ds, mask) if need_dmask else None,
                 dense=_reduce_to(ds, dense) if need_ddense else None,
                 q_scale=dqsc if t["q_scale"] is not None and need["q_scale"] else None,
                 k_scale=dksc if t["k_scale"] is not None and need["k_scale"] else None,
                 logit_scale=dlsc.to(logit_scale.dtype) if need_dlsc else None)
    return tuple(grads.get(n) for n in _FWD_ARGS)


attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def dropout_keep_mask(seed: Union[int, Tensor], b: int, h: int, nq: int, nk: int, dropout_p: float,
                      device) -> Tensor:
    """Debug: the boolean keep-mask (b, h, nq, nk) the kernels draw for ``seed`` -- an int >= 0 or
    the 0-d seed tensor a forward returned (feed it to the reference's ``dropout_mask=``)."""
    device = torch.device(device)
    out = torch.empty(b * h, nq, nk, dtype=torch.int8, device=device)
    seed_t = seed.to(device=device, dtype=torch.int64) if isinstance(seed, Tensor) else _seed(seed, device)
    if out.numel():
        with _device_guard(out.device):
            _dropout_mask_kernel[launch_grids(b, h, h, nq, nk, dict(mask=(32, 32)))["mask"]](
                out, h, nq, nk, dropout_p, seed_t, BLOCK_M=32, BLOCK_N=32)
    return out.view(b, h, nq, nk).bool()
