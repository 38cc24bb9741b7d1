"""Launchers, the ``xtk::attention_fwd`` / ``xtk::attention_bwd`` custom ops and the Triton ``BACKEND``.

Data flow: ``xtk.attention`` validates -> ``backends.pick`` -> ``BACKEND.run(inputs)`` here:
QK-norm / rotary/xpos turned into kernel arguments (``_qk_args``; applied in-kernel to the q/k
tiles, forward and backward), bias descriptors turned into the kernel's O(n)
inputs (ALiBi slopes padded to all heads, T5 turned into a per-distance table by indexing the
(num_buckets, h) table with the reference bucket function, so autograd carries its gradient),
then the custom op. The op takes q/k/v with any strides (no copies) and dense masks/biases as
broadcast views (stride 0 on broadcast dims, no copies).

Memory: besides the outputs, the forward allocates the (b, h, nq) log-sum-exp (and the top-k
threshold); the backward allocates dq/dk/dv, the (b, h, nq) delta, an (h, 2L-1) table gradient
and per-program ALiBi and QK dim-scale partials ((n / BLOCK) x d) -- all linear in n. QK-norm and
rotary/xpos allocate nothing of q's or k's size: they run on the tiles inside every kernel. Only a
dense bias that requires grad gets a (b, h, nq, nk) gradient buffer (its gradient has that size anyway).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Union

import torch
import triton

from xtk import backends
from xtk.bias import Alibi, Dense, DistanceTable, T5, t5_bucket

from .attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq
from .attention_common import (BIAS_ALIBI, BIAS_DENSE_BOOL, BIAS_DENSE_FLOAT, BIAS_NONE, BIAS_TABLE,
                               MASK_BOOL, MASK_FLOAT, MASK_NONE)
from .attention_fwd import _attn_fwd, _attn_topk_threshold, _dropout_mask_kernel
from . import tiles
from .tiles import config, precision_of, spec_class  # tile tables: kernels/tiles_sm80.json, tiles_sm90.json

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
    """(view, strides, kind) of a dense mask/bias broadcast to (b, h, nq, nk) without a copy."""
    if t is None:
        return None, (0, 0, 0, 0), 0
    view = t.expand(b, h, nq, nk)
    if view.dtype == torch.bool:
        view = view.view(torch.uint8)
        kind = 2
    else:
        kind = 1
    return view, tuple(view.stride()), kind


def _slots(q, slopes, table, mask, dense, b, h, nq, nk):
    """Kernel arguments shared by every pass: pointers, strides and the bias/mask kinds."""
    mview, mstr, mkind = _dense4(mask, b, h, nq, nk)
    bview, bstr, bkind = _dense4(dense, b, h, nq, nk)
    if slopes is not None:
        bias_kind = BIAS_ALIBI
    elif table is not None:
        bias_kind = BIAS_TABLE
    elif dense is not None:
        bias_kind = BIAS_DENSE_FLOAT if bkind == 1 else BIAS_DENSE_BOOL
    else:
        bias_kind = BIAS_NONE
    mask_kind = {0: MASK_NONE, 1: MASK_FLOAT, 2: MASK_BOOL}[mkind]
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


def launch_grids(b: int, h: int, hk: int, nq: int, nk: int, tiles: dict) -> dict:
    """The grid of each launch, ``kind -> (programs,)``: (blocks x batch*heads) folded onto axis 0,
    blocks fastest, as the kernels decode it (``attention_common._fold``).

    ``tiles``: kind -> (BLOCK_M, BLOCK_N) for any of 'fwd', 'thr', 'dq', 'mask' (the dropout-mask
    debug kernel): query blocks x b*h; 'dkdv': key blocks x b*hk. Axis 0 holds 2^31 - 1 programs
    where axes 1 and 2 hold 65,535 (b*h on axis 1 failed to launch at a decode batch of 2,048 x 32
    heads); raises ValueError past that (a q of that many tiles fits in no GPU's memory)."""
    grids = {}
    for kind, (bm, bn) in tiles.items():
        n = triton.cdiv(nk, bn) * b * hk if kind == "dkdv" else triton.cdiv(nq, bm) * b * h
        if n > MAX_PROGRAMS:
            raise ValueError(f"xtk attention: {kind} launch needs {n} programs > {MAX_PROGRAMS} (grid axis 0)")
        grids[kind] = (n,)
    return grids


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


def _qk_slots(q, qk):
    """Kernel arguments of the in-kernel QK-norm / rotary / xpos: pointers, scalars, constexprs."""
    qsc, ksc, inv_freq, xpos, groups, rot_dim, max_half, xpos_base, interp, logit_scale = qk
    if logit_scale is not None:  # a learned QK-norm logit scale: folded into q's dim scale
        qsc = qsc * logit_scale
    ptrs = tuple(t if t is not None else q for t in (qsc, ksc, inv_freq, xpos))
    scal = (rot_dim, max_half, float(xpos_base), float(interp))
    meta = dict(HAS_NORM=groups > 0, GROUPS=max(groups, 1), HAS_DSCALE=qsc is not None, HAS_ROT=rot_dim > 0,
                HAS_XPOS=xpos is not None)
    return ptrs, scal, meta


def _uses_qk(meta) -> bool:
    return bool(meta["HAS_NORM"] or meta["HAS_DSCALE"] or meta["HAS_ROT"])


def _dsc_sums(dqsc, dksc, has_dsc):
    """Dim-scale gradients (h, d) / (hk, d) from the per-program partials (b, h|hk, blocks, d)."""
    if not has_dsc:
        return dqsc.new_empty(0), dksc.new_empty(0)
    return dqsc.sum((0, 2)), dksc.sum((0, 2))


NO_QK = (None, None, None, None, 0, 0, 0, 1.0, 1.0, None)


def _forward(q, k, v, slopes, table, mask, dense, scale, is_causal, q_offset, k_prefix, topk, dropout_p, seed,
             qk=NO_QK):
    q, k, v = (_narrow_cols(t) for t in (q, k, v))
    b, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(b, h, nq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, 2, nq, dtype=torch.float32, device=q.device)  # row max, row sum
    has_topk = 0 < topk < nk
    thr = torch.empty(b, h, nq if has_topk else 0, dtype=torch.float32, device=q.device)
    qk_ptrs, qk_scal, qk_meta = _qk_slots(q, qk)
    cls = spec_class(*_slots(q, slopes, table, mask, dense, b, h, nq, nk)[2:], has_topk, dropout_p > 0.0,
                     _uses_qk(qk_meta))
    tprec = precision_of(_precision(q.dtype), q.element_size())
    cfg = config("fwd", d, dv, _arch(q.device), topk if has_topk else 0, precision=tprec, cls=cls)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    ptrs, scal, bias_kind, mask_kind = _slots(q, slopes, table, mask, dense, b, h, nq, nk)
    prec = _precision(q.dtype)
    if nq == 0 or b * h == 0:
        return out, lse, thr
    if has_topk:
        cfg_thr = config("thr", d, dv, _arch(q.device), topk, precision=tprec, cls=cls)
        with _device_guard(q.device):
            _attn_topk_threshold[launch_grids(b, h, hk, nq, nk, dict(thr=_blocks(cfg_thr)))["thr"]](
                q, k, thr, *ptrs, *qk_ptrs, *q.stride(), *k.stride(), *scal,
                h, hk, nq, nk, d, q_offset, k_prefix, scale, topk, *qk_scal,
                IS_CAUSAL=is_causal, BIAS_KIND=bias_kind, MASK_KIND=mask_kind, PRECISION=prec, **qk_meta,
                K2=triton.next_power_of_2(topk), BLOCK_D=block_d(d), **cfg_thr)
    with _device_guard(q.device):
        _attn_fwd[launch_grids(b, h, hk, nq, nk, dict(fwd=(bm, bn)))["fwd"]](
            q, k, v, out, lse, thr if has_topk else lse, *ptrs, *qk_ptrs,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *scal,
            h, hk, nq, nk, d, dv, q_offset, k_prefix, scale, dropout_p, seed, *qk_scal,
            IS_CAUSAL=is_causal, BIAS_KIND=bias_kind, MASK_KIND=mask_kind, HAS_TOPK=has_topk,
            HAS_DROPOUT=dropout_p > 0.0, PRECISION=prec, **qk_meta,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(d), BLOCK_DV=block_d(dv),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse, thr


def _backward(do, q, k, v, out, lse, thr, seed, slopes, table, mask, dense, scale, is_causal, q_offset,
              k_prefix, topk, dropout_p, need_dslopes, need_dtable, need_ds, qk=NO_QK, need_dlsc=False):
    do, q, k, v = (_narrow_cols(t) for t in (do, q, k, v))
    b, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dvv = torch.empty_like(v)
    has_topk = 0 < topk < nk
    arch = _arch(q.device)
    tprec = precision_of(_precision(q.dtype), q.element_size())
    qk_ptrs, qk_scal, qk_meta = _qk_slots(q, qk)
    cls = spec_class(*_slots(q, slopes, table, mask, dense, b, h, nq, nk)[2:], has_topk, dropout_p > 0.0,
                     _uses_qk(qk_meta))
    cfg_kv = config("dkdv", d, dv, arch, topk if has_topk else 0, precision=tprec, cls=cls)
    cfg = config("dq", d, dv, arch, topk if has_topk else 0, precision=tprec, cls=cls)
    n_mblocks = triton.cdiv(nq, cfg["BLOCK_M"])
    dslopes = torch.zeros(b, h, n_mblocks if need_dslopes else 0, dtype=torch.float32, device=q.device)
    dtab = torch.zeros_like(table, dtype=torch.float32) if need_dtable else q.new_empty(0, dtype=torch.float32)
    dlsc = torch.zeros(b, h, n_mblocks if need_dlsc else 0, dtype=torch.float32, device=q.device)
    ds = torch.zeros(b, h, nq, nk, dtype=torch.float32, device=q.device) if need_ds else q.new_empty(0, dtype=torch.float32)
    n_kblocks = triton.cdiv(nk, cfg_kv["BLOCK_N"])
    has_dsc = qk_meta["HAS_DSCALE"]
    # per-program partial sums of the dim-scale gradients (summed here: deterministic)
    dqsc = torch.zeros(b, h, n_mblocks, d if has_dsc else 0, dtype=torch.float32, device=q.device)
    dksc = torch.zeros(b, hk, n_kblocks, d if has_dsc else 0, dtype=torch.float32, device=q.device)
    if b * h == 0 or nq == 0 or nk == 0:
        dq.zero_(), dk.zero_(), dvv.zero_()
        return (dq, dk, dvv, dslopes.sum((0, 2)), dtab, ds, *_dsc_sums(dqsc, dksc, has_dsc),
                dlsc.sum() if need_dlsc else dlsc.new_empty(0))
    delta = (do.float() * out.float()).sum(-1)  # (b, h, nq): the preprocess, O(n)
    ptrs, scal, bias_kind, mask_kind = _slots(q, slopes, table, mask, dense, b, h, nq, nk)
    prec = _precision(q.dtype)
    common = dict(IS_CAUSAL=is_causal, BIAS_KIND=bias_kind, MASK_KIND=mask_kind, HAS_TOPK=has_topk,
                  HAS_DROPOUT=dropout_p > 0.0, PRECISION=prec, BLOCK_D=block_d(d), BLOCK_DV=block_d(dv), **qk_meta)
    thr_arg = thr if has_topk else lse
    seed = seed.to(q.device)  # the forward's device seed (a no-op); a host seed tensor is copied over
    grids = launch_grids(b, h, hk, nq, nk, dict(dkdv=_blocks(cfg_kv), dq=_blocks(cfg)))
    with _device_guard(q.device):
        _attn_bwd_dkdv[grids["dkdv"]](
            q, k, v, do, dk, dvv, lse, delta, thr_arg, *ptrs, *qk_ptrs, dksc if has_dsc else lse,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dvv.stride(), *scal,
            h, hk, nq, nk, d, dv, q_offset, k_prefix, scale, dropout_p, seed, *qk_scal, **common, **cfg_kv)
        _attn_bwd_dq[grids["dq"]](
            q, k, v, do, dq, lse, delta, thr_arg, *ptrs, dslopes if need_dslopes else lse,
            dtab if need_dtable else lse, ds if need_ds else lse, *qk_ptrs, dqsc if has_dsc else lse,
            dlsc if need_dlsc else lse,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *scal,
            h, hk, nq, nk, d, dv, q_offset, k_prefix, scale, dropout_p, seed, *qk_scal,
            NEED_DSLOPE=need_dslopes, NEED_DTAB=need_dtable, NEED_DS=need_ds, NEED_DLSC=need_dlsc, **common, **cfg)
    return (dq, dk, dvv, dslopes.sum((0, 2)), dtab, ds, *_dsc_sums(dqsc, dksc, has_dsc),
            dlsc.sum() if need_dlsc else dlsc.new_empty(0))


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("xtk::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, slopes: Optional[Tensor], table: Optional[Tensor],
                  mask: Optional[Tensor], dense: Optional[Tensor], scale: float, is_causal: bool, q_offset: int,
                  k_prefix: int, topk: int, dropout_p: float, seed: int, q_scale: Optional[Tensor] = None, k_scale: Optional[Tensor] = None,
                  inv_freq: Optional[Tensor] = None, xpos: Optional[Tensor] = None, groups: int = 0, rot_dim: int = 0,
                  max_half: int = 0, xpos_base: float = 1.0, interp: float = 1.0,
                  logit_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out (b,h,nq,dv), softmax stats (b,h,2,nq) fp32 (row max, row sum), top-k threshold (b,h,nq|0) fp32,
    the dropout seed used (int64 0-d, on q's device; 0 without dropout)).

    slopes: (h,) fp32 ALiBi slopes (0 for heads without one) | table: (2L-1, h) fp32 per-distance
    bias | dense: float or bool tensor broadcastable to (b,h,nq,nk); at most one of the three.
    mask: attn_mask, float or bool, broadcastable. topk 0: off. seed < 0: draw one on q's device
    with torch's generator (``_seed``: fresh per CUDA-graph replay); seed >= 0: reproducible.
    QK features, applied in-kernel to the q/k tiles: groups > 0: grouped l2 norm; q_scale (h, d) and
    k_scale (hk, d) fp32 per-dim scales (both or neither); rot_dim > 0: rotary with inv_freq
    (rot_dim//2,) fp32, xpos (rot_dim//2,) fp32 when given, positions as in attention_common;
    logit_scale: a 0-d fp32 learned QK-norm scale (then ``scale`` is 1 and q_scale/k_scale are
    given): multiplied into q_scale in the kernels, its gradient formed apart (NEED_DLSC)."""
    seed_t = _seed(seed if dropout_p > 0.0 else 0, q.device)
    out, lse, thr = _forward(q, k, v, slopes, table, mask, dense, scale, is_causal, q_offset, k_prefix, topk,
                             dropout_p, seed_t, (q_scale, k_scale, inv_freq, xpos, groups, rot_dim, max_half,
                                                 xpos_base, interp, logit_scale))
    return out, lse, thr, seed_t


@attention_fwd.register_fake
def _(q, k, v, slopes, table, mask, dense, scale, is_causal, q_offset, k_prefix, topk, dropout_p, seed, q_scale=None,
      k_scale=None, inv_freq=None, xpos=None, groups=0, rot_dim=0, max_half=0, xpos_base=1.0, interp=1.0,
      logit_scale=None):
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    out = q.new_empty(b, h, nq, v.shape[3])
    lse = q.new_empty(b, h, 2, nq, dtype=torch.float32)
    thr = q.new_empty(b, h, nq if 0 < topk < nk else 0, dtype=torch.float32)
    return out, lse, thr, q.new_empty((), dtype=torch.int64)


@torch.library.custom_op("xtk::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, thr: Tensor,
                  seed: Tensor, slopes: Optional[Tensor], table: Optional[Tensor], mask: Optional[Tensor],
                  dense: Optional[Tensor], scale: float, is_causal: bool, q_offset: int, k_prefix: int, topk: int,
                  dropout_p: float, need_dslopes: bool, need_dtable: bool,
                  need_ds: bool, q_scale: Optional[Tensor] = None, k_scale: Optional[Tensor] = None,
                  inv_freq: Optional[Tensor] = None, xpos: Optional[Tensor] = None, groups: int = 0, rot_dim: int = 0,
                  max_half: int = 0, xpos_base: float = 1.0, interp: float = 1.0,
                  logit_scale: Optional[Tensor] = None, need_dlsc: bool = False,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv, dslopes (h,)|(0,), dtable like table|(0,), dS (b,h,nq,nk) fp32 | (0,),
    d q_scale (h, d) fp32 | (0,), d k_scale (hk, d) fp32 | (0,), sum of dS * (q'.k') * scale 0-d
    fp32 | (0,)): the QK features are recomputed in-kernel and the gradients chained back to the
    raw q and k; the dim-scale gradients are those of the effective q scale (q_scale * logit_scale).
    seed: the forward's 0-d int64 seed tensor, read by the kernels on the device (no host sync)."""
    return _backward(do, q, k, v, out, lse, thr, seed, slopes, table, mask, dense, scale, is_causal,
                     q_offset, k_prefix, topk, dropout_p, need_dslopes, need_dtable, need_ds,
                     (q_scale, k_scale, inv_freq, xpos, groups, rot_dim, max_half, xpos_base, interp, logit_scale),
                     need_dlsc)


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, thr, seed, slopes, table, mask, dense, scale, is_causal, q_offset, k_prefix, topk,
      dropout_p, need_dslopes, need_dtable, need_ds, q_scale=None, k_scale=None, inv_freq=None, xpos=None, groups=0,
      rot_dim=0, max_half=0, xpos_base=1.0, interp=1.0, logit_scale=None, need_dlsc=False):
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(h if need_dslopes else 0, **f32),
            table.new_empty(table.shape, **f32) if need_dtable else q.new_empty(0, **f32),
            q.new_empty((b, h, nq, nk) if need_ds else (0,), **f32),
            q.new_empty((h, d) if q_scale is not None else (0,), **f32),
            q.new_empty((hk, d) if q_scale is not None else (0,), **f32),
            q.new_empty(() if need_dlsc else (0,), **f32))


def _setup_context(ctx, inputs, output):
    (q, k, v, slopes, table, mask, dense, scale, is_causal, q_offset, k_prefix, topk, dropout_p, seed,
     q_scale, k_scale, inv_freq, xpos, groups, rot_dim, max_half, xpos_base, interp, logit_scale) = inputs
    out, lse, thr, seed_t = output
    ctx.save_for_backward(q, k, v, out, lse, thr, seed_t, slopes, table, mask, dense, q_scale, k_scale, inv_freq, xpos,
                          logit_scale)
    ctx.args = (scale, is_causal, q_offset, k_prefix, topk, dropout_p)
    ctx.qk_args = (groups, rot_dim, max_half, xpos_base, interp)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a (b, h, nq, nk) gradient over the dims ``like`` broadcasts, back to ``like``'s shape."""
    shape = (1,) * (4 - like.dim()) + tuple(like.shape)
    dims = [i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1]
    if dims:
        grad = grad.sum(dims, keepdim=True)
    return grad.reshape(like.shape).to(like.dtype)


def _table_grad_from_ds(ds: Tensor, table: Tensor, q_offset: int, k_prefix: int) -> Tensor:
    """Deterministic distance-table gradient: the sums of dS (b, h, nq, nk) along each diagonal
    ``p_i - p_j`` of the positional keys, by the skew trick (pad, flatten, re-view), no scatter."""
    b, h, nq, nk = ds.shape
    dtab = torch.zeros(table.shape, dtype=torch.float32, device=ds.device)
    pos = ds[..., k_prefix:].sum(0).flip(-1)  # (h, nq, np); column c holds key j = np - 1 - c
    npos = pos.shape[-1]
    if npos == 0 or nq == 0:
        return dtab
    width = npos + nq
    skew = torch.nn.functional.pad(pos, (0, nq)).reshape(h, nq * width)[:, :nq * (width - 1)]
    diag = skew.reshape(h, nq, width - 1).sum(1)  # t = i + np - 1 - j, i.e. p_i - p_j = q_offset + t - (np - 1)
    start = (table.shape[0] - 1) // 2 + q_offset - (npos - 1)
    dtab[start:start + nq + npos - 1] = diag.t()
    return dtab


def _backward_rule(ctx, dout, dlse, dthr, dseed):
    (q, k, v, out, lse, thr, seed_t, slopes, table, mask, dense, q_scale, k_scale, inv_freq, xpos,
     logit_scale) = ctx.saved_tensors
    scale, is_causal, q_offset, k_prefix, topk, dropout_p = ctx.args
    need = ctx.needs_input_grad
    need_dslopes = bool(need[3]) and slopes is not None
    need_dtable = bool(need[4]) and table is not None
    need_dmask = bool(need[5]) and mask is not None and mask.is_floating_point()
    need_ddense = bool(need[6]) and dense is not None and dense.is_floating_point()
    # the table gradient scatters dS by distance with atomics (unordered); in deterministic mode
    # take dS whole instead (O(b h nq nk) memory, that mode only) and sum its diagonals in torch
    det_table = need_dtable and torch.are_deterministic_algorithms_enabled()
    need_dlsc = len(need) > 23 and bool(need[23]) and logit_scale is not None
    dq, dk, dv, dslopes, dtab, ds, dqsc, dksc, dlsc = attention_bwd(
        dout, q, k, v, out, lse, thr, seed_t, slopes, table, mask, dense, scale, is_causal, q_offset, k_prefix,
        topk, dropout_p, need_dslopes, need_dtable and not det_table, need_dmask or need_ddense or det_table,
        q_scale, k_scale, inv_freq, xpos, *ctx.qk_args, logit_scale, need_dlsc)
    if det_table:
        dtab = _table_grad_from_ds(ds, table, q_offset, k_prefix)
    if need_dlsc:
        # dL/d(lambda) = sum dS * d(logit)/d(lambda) = (sum dS * logit) / lambda; at lambda = 0 (q' = 0,
        # the logits carry no trace of it) from the effective q scale's gradient instead
        nonzero = logit_scale != 0
        dlsc = torch.where(nonzero, dlsc / torch.where(nonzero, logit_scale, 1.0), (dqsc * q_scale).sum())
    if logit_scale is not None:
        dqsc = dqsc * logit_scale  # the kernels' q scale is q_scale * logit_scale
    return (dq, dk, dv,
            dslopes.to(slopes.dtype) if need_dslopes else None,
            dtab.to(table.dtype) if need_dtable else None,
            _reduce_to(ds, mask) if need_dmask else None,
            _reduce_to(ds, dense) if need_ddense else None,
            None, None, None, None, None, None, None,
            dqsc if q_scale is not None and need[14] else None,
            dksc if k_scale is not None and need[15] else None,
            None, None, None, None, None, None, None,
            dlsc.to(logit_scale.dtype) if need_dlsc else None)


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


# ----------------------------------------------------------------------------- the backend

def _qk_args(inputs):
    """QK-norm and rotary/xpos as arguments of the attention kernels (applied in-kernel to the q/k
    tiles, positions computed there: no q'/k' tensor, no (n, d) cos/sin table); -> (qk, scale).

    Dim scales go in as (h, d) / (hk, d) fp32 views built with differentiable torch ops, so their
    gradients (computed in-kernel) reach the (h|hk, 1, d) parameters through autograd. A tensor
    (learned) QK-norm scale goes in as ``logit_scale``: the op multiplies it into q's dim scale
    (rotary is linear, so scaling q' scales the logits; the kernel scale becomes 1) and forms its
    gradient from fp32 dS in the dq kernel."""
    q, k = inputs.q, inputs.k
    scale = inputs.scale
    qn, rot = inputs.qk_norm, inputs.rotary
    h, nq, d = q.shape[1], q.shape[2], q.shape[3]
    hk, nk = k.shape[1], k.shape[2]
    qs = ks = inv_freq = xpos = logit_scale = None
    groups, rd, max_half, base, interp = 0, 0, 0, 1.0, 1.0
    if qn is not None:
        groups = qn.groups

        def dim_scale(t, heads):
            return None if t is None else t.expand(heads, 1, d).reshape(heads, d).float()

        qs, ks = dim_scale(qn.q_dim_scale, h), dim_scale(qn.k_dim_scale, hk)
        if isinstance(qn.scale, torch.Tensor):
            logit_scale = qn.scale.float().reshape(())
            scale = 1.0
        else:
            scale = float(qn.scale)
        if qs is not None or ks is not None or logit_scale is not None:  # one switch for both: the missing one is all ones
            qs = (qs if qs is not None else torch.ones(h, d, device=q.device)).contiguous()
            ks = (ks if ks is not None else torch.ones(hk, d, device=q.device)).contiguous()
    if rot is not None:
        inv_freq = rot.inv_freq.float().contiguous()
        xpos = rot.xpos_scale.float().contiguous() if rot.xpos_scale is not None else None
        rd, base, interp = rot.dim, float(rot.xpos_scale_base), float(rot.interpolation_factor)
        max_half = max(inputs.q_offset + nq, nk - inputs.k_prefix) // 2
    if scale is None:
        scale = d ** -0.5
    return (qs, ks, inv_freq, xpos, groups, rd, max_half, base, interp, logit_scale), float(scale)


def t5_distance_table(bias: T5, nq: int, nk: int, q_offset: int, k_prefix: int) -> Tensor:
    """The T5 bias per signed distance ``p_i - p_j``, (2L-1, h) fp32, gathered from ``bias.table``
    with the reference bucket function (so the table's gradient flows through the gather)."""
    npos = nk - k_prefix
    far = max(abs(q_offset + nq - 1), abs(q_offset - (npos - 1))) if npos > 0 and nq > 0 else 0
    L = far + 1
    dist = torch.arange(-(L - 1), L, device=bias.table.device)
    bucket = t5_bucket(-dist, bias.num_buckets, bias.max_distance, bias.causal)
    return (bias.table[bucket] * bias.scale).float()


def _bias_args(inputs, h, nq, nk):
    bias = inputs.bias
    slopes = table = dense = None
    if isinstance(bias, Alibi):
        s = bias.slopes.float()
        slopes = torch.cat([s, s.new_zeros(h - s.shape[0])]) if s.shape[0] < h else s
    elif isinstance(bias, T5):
        table = t5_distance_table(bias, nq, nk, inputs.q_offset, inputs.k_prefix)
    elif isinstance(bias, DistanceTable):
        table = bias.table.float().contiguous()
    elif isinstance(bias, Dense):
        dense = bias.tensor
    return slopes, table, dense


def run(inputs) -> Tensor:
    q, k = inputs.q, inputs.k
    qk, scale = _qk_args(inputs)
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    slopes, table, dense = _bias_args(inputs, h, nq, nk)
    topk = _effective_topk(inputs, nk)
    out = torch.ops.xtk.attention_fwd(q, k, inputs.v, slopes, table, inputs.attn_mask, dense, scale,
                                      inputs.is_causal, inputs.q_offset, inputs.k_prefix, topk,
                                      inputs.dropout_p, -1, *qk)[0]
    return out


def _effective_topk(inputs, nk: int) -> int:
    """The top-k the kernels run: 0 (off) when unset or when it keeps every one of the nk keys."""
    return inputs.topk if inputs.topk is not None and inputs.topk < nk else 0


def reasons(inputs, forced: bool) -> list:
    why = []
    q = inputs.q
    if inputs.hooks is not None:
        why.append(f"hooks ({inputs.hooks.reason}) need the whole score matrix")
    if q.device.type == "cpu":
        if not (forced and interpreting()):
            why.append("CPU tensors run only when backend='triton' is forced with TRITON_INTERPRET=1")
    elif q.device.type != "cuda":
        why.append(f"device {q.device.type} is not supported (cuda, or cpu under TRITON_INTERPRET=1)")
    if q.dtype not in DTYPES:
        why.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    d, dv = q.shape[-1], inputs.v.shape[-1]
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        why.append(f"head dim {max(d, dv)} > {MAX_HEAD_DIM}")
    nk = inputs.k.shape[2]
    topk = _effective_topk(inputs, nk)
    if topk > MAX_TOPK:
        why.append(f"topk {inputs.topk} > {MAX_TOPK} (the streaming threshold buffer)")
    if q.device.type == "cuda" and q.dtype in DTYPES and max(d, dv) <= MAX_HEAD_DIM:
        refused = tiles.refusal(_arch(q.device), d, dv, min(topk, MAX_TOPK),
                                precision_of(_precision(q.dtype), q.element_size()))
        if refused:
            why.append(refused)
    bias = inputs.bias
    if isinstance(bias, Dense) and inputs.attn_mask is not None:
        pass  # two dense slots: supported
    for name, t in (("attn_mask", inputs.attn_mask), ("bias.tensor", bias.tensor if isinstance(bias, Dense) else None)):
        if t is not None and t.dim() > 4:
            why.append(f"{name}: more than 4 dims")
    return why


BACKEND = backends.Backend("triton", "attention", reasons, run)
