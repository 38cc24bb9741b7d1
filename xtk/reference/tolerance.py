"""The one tolerance rule (SPEC §4, flash-attention's): judge a kernel against an fp64 oracle.

Round the inputs to the test dtype; run the oracle in fp64 on those rounded inputs, the eager
reference in the test dtype, and the kernel. The kernel's max abs error against the oracle must be
at most ``factor`` (2) times the eager test-dtype error plus a small floor per dtype. Used by the
tests (``tests/tolerance.py`` asserts it) and by ``python -m xtk gpucheck`` (which reports it).
"""
from __future__ import annotations

from typing import Optional

import torch

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| in fp64 (0 for empty tensors; NaN where either side is NaN)."""
    if not a.numel():
        return 0.0
    diff = (a.double() - ref.double()).abs()
    return float("nan") if diff.isnan().any() else diff.max().item()


def judge_2x(kernel: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, name: str = "out",
             factor: float = 2.0, floor: Optional[float] = None) -> dict:
    """-> {name, ok, kernel_err, eager_err, limit, why}: kernel vs oracle error <= factor * (eager vs
    oracle error) + floor, with matching shapes and a finite kernel output."""
    floor = FLOOR[eager.dtype] if floor is None else floor
    verdict = dict(name=name, ok=False, kernel_err=None, eager_err=None, limit=None, why="")
    if kernel.shape != oracle.shape:
        verdict["why"] = f"{name}: shape {tuple(kernel.shape)} != oracle {tuple(oracle.shape)}"
        return verdict
    if not torch.isfinite(kernel).all():
        verdict["why"] = f"{name}: kernel output has non-finite values"
        return verdict
    k_err, e_err = max_err(kernel, oracle), max_err(eager, oracle)
    limit = factor * e_err + floor
    verdict.update(kernel_err=k_err, eager_err=e_err, limit=limit, ok=bool(k_err <= limit))
    if not verdict["ok"]:
        verdict["why"] = f"{name}: kernel error {k_err:.3e} > {factor} x eager error {e_err:.3e} + floor {floor:.1e}"
    return verdict
