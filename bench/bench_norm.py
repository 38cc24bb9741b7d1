"""rms_norm (with and without residual): xtk (auto backend: the C++/CUDA extension when built)
vs the eager reference vs ``torch.nn.functional.rms_norm``; forward and forward+backward; GB/s.

Bytes per call (the minimum a fused kernel must move): forward reads x (and residual) and the
weight, writes y (and the new residual); forward+backward adds reading dy (and the residual's
gradient), x again, and writing dx (and the weight gradient), counted as 2x the forward traffic
plus the forward's. ``F.rms_norm`` with residual is ``F.rms_norm(x + residual)`` (two kernels).
Note ``F.rms_norm`` uses ``1/sqrt(mean(x^2) + eps)`` where xtk (x-transformers) uses
``sqrt(dim) / max(||x||, eps)``: the same work, not bit-identical results. ``copy``: a plain
tensor copy of the row's bytes (``common.copy_call``): its ms / xtk's is the share of copy bandwidth
xtk reaches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import xtk

from .common import copy_call, sweep_ops, timed_step

IMPLS = ["xtk", "eager", "F.rms_norm", "copy"]
MODES = ["fwd", "fwd+bwd"]
CASES = ["rms_norm", "rms_norm+residual"]


def sweep(device: str, full: bool):
    """(tokens, dim) shapes."""
    if full:
        return [(16384, 512), (16384, 1024), (16384, 4096), (65536, 1024)]
    if device == "cuda":
        return [(16384, 1024), (16384, 4096)]
    return [(4096, 1024)]


def _bytes(tokens, dim, residual: bool, mode: str, elem: int) -> float:
    fwd = tokens * dim * elem * (4 if residual else 2) + dim * elem
    return fwd * (3 if mode == "fwd+bwd" else 1)


def make_call(impl, case, shape, mode, dtype, device):
    tokens, dim = shape
    if impl == "copy":
        return copy_call(_bytes(tokens, dim, case.endswith("residual"), mode, torch.finfo(dtype).bits // 8), dtype,
                         device)
    grad = mode == "fwd+bwd"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=g).to(device, dtype).requires_grad_(grad)
    w = (1 + 0.1 * torch.randn(dim, generator=g)).to(device, dtype).requires_grad_(grad)
    res = torch.randn(tokens, dim, generator=g).to(device, dtype).requires_grad_(grad) if case.endswith("residual") else None
    go = torch.randn(tokens, dim, device=device, dtype=dtype) if grad else None

    if impl in ("xtk", "eager"):
        backend = "auto" if impl == "xtk" else "eager"

        def fwd():
            out = xtk.rms_norm(x, w, residual=res, backend=backend)
            return out[0] if res is not None else out
    elif impl == "F.rms_norm":
        def fwd():
            return F.rms_norm(x if res is None else x + res, (dim,), w, eps=None)
    else:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return timed_step(fwd, grad, [t for t in (x, w, res) if t is not None], go)


def run(device: str, full: bool, dtype, impls=None, modes=None, progress=None):
    elem = torch.finfo(dtype).bits // 8

    def row(shape, case, mode):
        tokens, dim = shape
        return dict(tokens=tokens, dim=dim), _bytes(tokens, dim, case.endswith("residual"), mode, elem)
    return sweep_ops("rms_norm", sweep(device, full), CASES, modes or MODES, impls or IMPLS, make_call, row, device,
                     full, dtype, progress)


def count(device: str, full: bool, impls=None, modes=None) -> int:
    return len(sweep(device, full)) * len(CASES) * len(modes or MODES) * len(impls or IMPLS)
