"""Packed variable-length batches: causal self-attention of ragged sequences packed along one token
axis (``xtk.attention_varlen``), with no bias, ALiBi or T5, forward and forward+backward.

* ``xtk``: ``xtk.attention_varlen`` on the packed tensors ``(total, h, d)``.
* ``sdpa-padded``: what a user without a varlen kernel runs: the batch padded to the longest
  sequence, ``F.scaled_dot_product_attention`` with a float mask (bias, causal and key padding) built
  every call, the padding sliced away again.

FLOPs: the useful work only, ``sum over sequences of 4 h L^2 d / 2`` (causal), 3.5x for
forward+backward: the padded baseline's wasted work is not counted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import xtk
from xtk.bias import Alibi, T5, alibi_slopes

from .common import Result, measure, timed_step

IMPLS = ["xtk", "sdpa-padded"]
CASES = ["none", "alibi", "t5"]
MODES = ["fwd", "fwd+bwd"]


def shapes(device: str, full: bool) -> list:
    """(sequence lengths, h, d) per row."""
    if device == "cuda":
        rows = [((4096, 512, 2048, 128, 3000, 1024, 700, 4096), 16, 128)]
        return rows + ([((8192, 100, 6000, 2048, 16384), 16, 128)] if full else [])
    rows = [((300, 64, 513, 120), 8, 64)]
    return rows + ([((1024, 37, 2048, 700), 8, 64)] if full else [])


def flops(lens, h, d, mode) -> float:
    f = sum(4.0 * h * L * L * d * 0.5 for L in lens)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def _bias(case: str, h: int, device, grad: bool):
    if case == "alibi":
        return Alibi(torch.tensor(alibi_slopes(h), device=device))
    if case == "t5":
        table = (torch.randn(32, h, generator=torch.Generator().manual_seed(1)) * 0.1).to(device)
        return T5(table.requires_grad_(grad), num_buckets=32, max_distance=128, causal=True)
    return None


def _padded_mask(lens, h, bias, dtype, device):
    """``(b, h|1, n, n)`` float: the bias, -inf above the diagonal and on padded keys."""
    n = max(lens)
    keep = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None] & \
        (torch.arange(n, device=device)[None, :] < torch.tensor(lens, device=device)[:, None])[:, None, :]
    m = torch.zeros(len(lens), 1, n, n, dtype=dtype, device=device).masked_fill(~keep[:, None], float("-inf"))
    return m if bias is None else m + bias.materialize(h, n, n, 0, 0).to(dtype)[None]


def make_call(impl: str, case: str, shape, mode: str, dtype, device):
    """-> (a zero-argument callable running one step, or None with the reason it cannot)."""
    lens, h, d = shape
    grad = mode == "fwd+bwd"
    g = torch.Generator().manual_seed(0)
    total = sum(lens)
    q, k, v = (torch.randn(total, h, d, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3))
    go = torch.randn(total, h, d, generator=g).to(device, dtype) if grad else None
    bias = _bias(case, h, device, grad)
    cu = torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32)
    if impl == "xtk":
        def fwd():
            return xtk.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), is_causal=True, bias=bias)
    elif impl == "sdpa-padded":
        n = max(lens)
        starts = cu[:-1].tolist()

        def fwd():
            pad = [torch.stack([F.pad(t[s:s + L], (0, 0, 0, 0, 0, n - L)) for s, L in zip(starts, lens)]).transpose(1, 2)
                   for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*pad, attn_mask=_padded_mask(lens, h, bias, dtype, device))
            return torch.cat([out[i, :, :L].transpose(0, 1) for i, L in enumerate(lens)])
    else:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    leaves = [q, k, v] + ([bias.table] if grad and isinstance(bias, T5) else [])
    return timed_step(fwd, grad, leaves, go), ""


def run(device: str, full: bool, dtype, impls=None, cases=None, modes=None, progress=None) -> list:
    results = []
    for shape in shapes(device, full):
        lens, h, d = shape
        for case in cases or CASES:
            for mode in modes or MODES:
                for impl in impls or IMPLS:
                    params = dict(lens=list(lens), h=h, d=d, dtype=str(dtype).replace("torch.", ""))
                    r = Result("varlen", case, impl, mode, params, flops=flops(lens, h, d, mode))
                    call, _ = make_call(impl, case, shape, mode, dtype, device)
                    measure(r, lambda: call, device, quick=not full)
                    results.append(r)
                    if progress:
                        progress()
    return results


def count(device: str, full: bool, impls=None, cases=None, modes=None) -> int:
    return len(shapes(device, full)) * len(cases or CASES) * len(modes or MODES) * len(impls or IMPLS)
