"""glu (GEGLU / SwiGLU, x-transformers' feed-forward gate): xtk (auto backend: the C++/CUDA
extension when built) vs the eager reference vs plain torch (``a, g = x.chunk(2, -1);
a * act(g)``); forward and forward+backward; GB/s.

Bytes per call: forward reads x ``(tokens, 2 inner)`` and writes ``(tokens, inner)``; backward
reads x and dy and writes dx, counted as forward + 2x forward. ``copy``: a plain tensor copy of the
row's bytes (``common.copy_call``): its ms / xtk's is the share of copy bandwidth xtk reaches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import xtk

from .common import copy_call, sweep_ops, timed_step

IMPLS = ["xtk", "eager", "torch", "copy"]
MODES = ["fwd", "fwd+bwd"]
CASES = ["gelu", "silu"]
_TORCH_ACT = {"gelu": F.gelu, "silu": F.silu}


def sweep(device: str, full: bool):
    """(tokens, inner) shapes: x is (tokens, 2 * inner). The quick CPU shape keeps every tensor under
    glibc's 32 MiB mmap ceiling (x: 31.25 MiB in fp32), so that the row times the op: at 4096 x 1024
    x and dx are exactly 32 MiB, glibc maps each dx afresh, and its page faults (about 8 ms per
    32 MiB on the 2-core machine, the same for every implementation, absent from the copy row) made
    the fwd+bwd rows swing 3x between runs. The --full shapes are all past the ceiling: there every
    implementation pays them."""
    if full:
        return [(16384, 2048), (16384, 4096), (65536, 2048)]
    if device == "cuda":
        return [(16384, 2048), (16384, 4096)]
    return [(4000, 1024)]


def _bytes(tokens, inner, mode, elem) -> int:
    return tokens * inner * 3 * elem * (3 if mode == "fwd+bwd" else 1)


def make_call(impl, case, shape, mode, dtype, device):
    tokens, inner = shape
    if impl == "copy":
        return copy_call(_bytes(tokens, inner, mode, torch.finfo(dtype).bits // 8), dtype, device)
    grad = mode == "fwd+bwd"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 2 * inner, generator=g).to(device, dtype).requires_grad_(grad)
    go = torch.randn(tokens, inner, device=device, dtype=dtype) if grad else None
    if impl in ("xtk", "eager"):
        backend = "auto" if impl == "xtk" else "eager"

        def fwd():
            return xtk.glu(x, case, backend=backend)
    elif impl == "torch":
        act = _TORCH_ACT[case]

        def fwd():
            a, gate = x.chunk(2, dim=-1)
            return a * act(gate)
    else:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return timed_step(fwd, grad, [x], go)


def run(device: str, full: bool, dtype, impls=None, modes=None, progress=None):
    elem = torch.finfo(dtype).bits // 8

    def row(shape, case, mode):
        tokens, inner = shape
        return dict(tokens=tokens, inner=inner), _bytes(tokens, inner, mode, elem)
    return sweep_ops("glu", sweep(device, full), CASES, modes or MODES, impls or IMPLS, make_call, row, device, full,
                     dtype, progress)


def count(device: str, full: bool, impls=None, modes=None) -> int:
    return len(sweep(device, full)) * len(CASES) * len(modes or MODES) * len(impls or IMPLS)
