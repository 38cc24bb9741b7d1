"""The ``triton`` attention backend: ``xtk.attention``'s inputs as the arguments of the Triton kernels.

Data flow: ``xtk.attention`` validates -> ``backends.pick`` -> ``BACKEND.run(inputs)`` here: QK-norm
and rotary/xpos become ``QKArgs`` (``_qk_args``; applied once per q/k row before the attention
kernels, forward and backward), the bias descriptor gives its kernel arguments itself (``Bias.kernel_args``: ALiBi slopes
padded to all heads, T5 as a per-distance table gathered with the reference bucket function, so
autograd carries its gradient), then the custom op ``torch.ops.xtk.attention_fwd``
(``xtk/kernels/attention_op.py``, launchers and autograd rule).

``run_varlen`` / ``varlen_reasons``: the same for ``xtk.attention_varlen``'s one launch over a packed
batch (the kernels' VARLEN switch): the inputs are ``AttentionInputs`` over the packed tensors seen
as ``(1, heads, total, d)``, the sequences' offsets and longest lengths beside them.
"""
from __future__ import annotations

import torch

from .. import backends
from ..bias import Alibi, DistanceTable, T5, farthest_distance
from ..kernels import tiles
from ..kernels.attention_op import (DTYPES, MAX_HEAD_DIM, MAX_TOPK, QKArgs, _arch, _precision, interpreting,
                                    precision_of)

Tensor = torch.Tensor


def _dim_scale(t, heads: int, d: int):
    """A QK-norm dim scale ``(heads|1, 1, d)`` as the kernels' ``(heads, d)`` fp32 (differentiable)."""
    return None if t is None else t.expand(heads, 1, d).reshape(heads, d).float()


def _qk_args(inputs) -> tuple[QKArgs, float]:
    """QK-norm and rotary/xpos as arguments of the attention op (applied once per q/k row by the row
    kernel before the attention kernels, positions computed there: no (n, d) cos/sin table); -> (qk, scale).

    Dim scales go in as (h, d) / (hk, d) fp32 views built with differentiable torch ops, so their
    gradients (formed by the row kernel) reach the (h|hk, 1, d) parameters through autograd. A tensor
    (learned) QK-norm scale goes in as ``logit_scale``: the op multiplies it into q's dim scale
    (rotary is linear, so scaling q' scales the logits; the kernel scale becomes 1) and forms its
    gradient from fp32 dS in the dq kernel."""
    q, k = inputs.q, inputs.k
    scale = inputs.scale
    qn, rot = inputs.qk_norm, inputs.rotary
    h, nq, d = q.shape[1], q.shape[2], q.shape[3]
    hk, nk = k.shape[1], k.shape[2]
    qk = QKArgs()
    if qn is not None:
        qs, ks, logit_scale = _dim_scale(qn.q_dim_scale, h, d), _dim_scale(qn.k_dim_scale, hk, d), None
        if isinstance(qn.scale, torch.Tensor):
            logit_scale = qn.scale.float().reshape(())
            scale = 1.0
        else:
            scale = float(qn.scale)
        if qs is not None or ks is not None or logit_scale is not None:  # one switch for both: the missing one is all ones
            qs = (qs if qs is not None else torch.ones(h, d, device=q.device)).contiguous()
            ks = (ks if ks is not None else torch.ones(hk, d, device=q.device)).contiguous()
        qk = qk._replace(q_scale=qs, k_scale=ks, groups=qn.groups, logit_scale=logit_scale)
    if rot is not None:
        qk = qk._replace(inv_freq=rot.inv_freq.float().contiguous(),
                         xpos=rot.xpos_scale.float().contiguous() if rot.xpos_scale is not None else None,
                         rot_dim=rot.dim, xpos_base=float(rot.xpos_scale_base), interp=float(rot.interpolation_factor),
                         max_half=max(inputs.q_offset + nq, nk - inputs.k_prefix) // 2)
    if scale is None:
        scale = d ** -0.5
    return qk, float(scale)


def run(inputs) -> Tensor:
    return _run(inputs, inputs.q.shape[2], inputs.k.shape[2])


def run_varlen(inputs, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int) -> Tensor:
    """One launch per kernel over a packed batch: ``inputs`` over the (1, h, total, d) views ->
    (1, h, total_q, dv), a view of a packed (total_q, h, dv) tensor. The bias arguments cover the
    longest lengths (T5's per-distance table; ``varlen_reasons`` checks a DistanceTable does);
    xpos's max position is the kernels' own per sequence."""
    return _run(inputs, max_seqlen_q, max_seqlen_k, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


def _run(inputs, nq: int, nk: int, varlen: tuple = ()) -> Tensor:
    """The forward op on ``inputs``; nq / nk: the lengths the bias arguments and top-k are sized by."""
    qk, scale = _qk_args(inputs)
    h = inputs.q.shape[1]
    slopes = table = dense = None
    if inputs.bias is not None:
        slopes, table, dense = inputs.bias.kernel_args(h, nq, nk, inputs.q_offset, inputs.k_prefix)
    return torch.ops.xtk.attention_fwd(inputs.q, inputs.k, inputs.v, slopes, table, inputs.attn_mask, dense, scale,
                                       inputs.is_causal, inputs.q_offset, inputs.k_prefix,
                                       _effective_topk(inputs, nk), inputs.dropout_p, -1, *qk, inputs.gqa_repeat,
                                       *varlen)[0]


def _effective_topk(inputs, nk: int) -> int:
    """The top-k the kernels run: 0 (off) when unset or when it keeps every one of the nk keys."""
    return inputs.topk if inputs.topk is not None and inputs.topk < nk else 0


def reasons(inputs, forced: bool) -> list:
    return _reasons(inputs, forced, inputs.k.shape[2])


# the bias kinds of the one-launch varlen path: one value per signed distance, the same for every
# sequence (subclasses are refused too: their kernel arguments may depend on the lengths)
VARLEN_BIASES = (Alibi, T5, DistanceTable)


def varlen_reasons(inputs, forced: bool, max_seqlen_q: int, max_seqlen_k: int) -> list:
    """Why the one-launch path cannot run ``inputs`` (``run_varlen``'s), beyond ``reasons``'s."""
    why = _reasons(inputs, forced, max_seqlen_k)
    bias = inputs.bias
    if bias is not None and type(bias) not in VARLEN_BIASES:
        why.append(f"bias {type(bias).__name__}: the one-launch varlen path runs "
                   f"{', '.join(c.__name__ for c in VARLEN_BIASES)} (one value per distance for every sequence)")
    if type(bias) is DistanceTable:
        far = farthest_distance(max_seqlen_q, max_seqlen_k, inputs.q_offset, inputs.k_prefix)
        if far > bias.max_distance:
            why.append(f"bias.table covers distances up to {bias.max_distance}, and max_seqlen_q / max_seqlen_k "
                       f"allow {far} (the one launch does not read the sequences' lengths on the host)")
    return why


def _reasons(inputs, forced: bool, nk: int) -> list:
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
    topk = _effective_topk(inputs, nk)
    if topk > MAX_TOPK:
        why.append(f"topk {inputs.topk} > {MAX_TOPK} (the streaming threshold buffer)")
    if q.device.type == "cuda" and q.dtype in DTYPES and max(d, dv) <= MAX_HEAD_DIM:
        refused = tiles.refusal(_arch(q.device), d, dv, min(topk, MAX_TOPK),
                                precision_of(_precision(q.dtype), q.element_size()))
        if refused:
            why.append(refused)
    bias = inputs.bias
    if bias is not None and bias.kernel_kind is None:
        why.append(f"bias {type(bias).__name__}: no attention kernel expands this kind (it has no kernel kind)")
    dense = bias.learned if bias is not None and bias.dense else None
    for name, t in (("attn_mask", inputs.attn_mask), ("bias.tensor", dense)):
        if t is not None and t.dim() > 4:
            why.append(f"{name}: more than 4 dims")
    return why


BACKEND = backends.Backend("triton", "attention", reasons, run)
