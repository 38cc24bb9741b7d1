"""The one tolerance rule (SPEC §4, flash-attention's): judge a kernel against an fp64 oracle.

Round the inputs to the test dtype; run the oracle in fp64 on those rounded inputs, the eager
reference in the test dtype, and the kernel. The kernel's max abs error against the oracle must be
at most ``factor`` (2) times the eager test-dtype error plus a small floor per dtype. Used by the
tests (``tests/tolerance.py`` asserts it) and by ``python -m xtk gpucheck`` (which reports it).

Gradients that are one sum over a whole score matrix (ALiBi slopes, T5 / distance tables, a learned
QK-norm scale) add ``sum_floor``: a few float32 ulps of the sum of their |terms|
(``attention_term_sums``), which rounding order alone may cost, plus half an ulp of the result in its
own dtype (``rounding_floor``: the one rounding of such a sum to a 16-bit dtype, which lands on either
side of the oracle by luck). Every other floor is unchanged.
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


# ----------------------------------------------------------------------------- sums over the score matrix
SUM_FACTOR = 4.0  # times eps(dtype) times the sum of |terms|: see ``sum_floor``


def sum_floor(term_sums: torch.Tensor, dtype: torch.dtype, factor: float = SUM_FACTOR) -> float:
    """The extra floor of a gradient that is one sum over a whole score matrix.

    An ALiBi slope's gradient is ``-sum_ij dS_ij |p_i - p_j|`` over every logit of its head (and the
    batch); a T5 / distance-table entry's, the sum of ``dS`` over its distances; a learned QK-norm
    scale's, ``sum_ij dS_ij q'_i.k'_j``. Its terms are 10^2..10^4 times the result and cancel, so the
    errors of kernel and eager alike are a few ulps of ``sum |terms|``, their ratio decided by rounding
    luck (and the CPU's math kernels), not by the kernel's accuracy. The floor, ``factor * eps *
    max(term_sums)`` (``term_sums``: the gradient's ``sum |terms|`` per element, from the fp64 oracle:
    ``attention_term_sums``), is what any correct evaluation order may lose there; it is added to the
    dtype floor of those gradients only. ``eps`` is that of the work dtype, ``promote(dtype, float32)``:
    kernel and eager form these sums in float32 at least, so the 16-bit dtypes get the float32 floor
    (their own roundings stay judged by the eager error alone)."""
    if not term_sums.numel():
        return 0.0
    eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    return factor * eps * term_sums.double().abs().max().item()


def rounding_floor(oracle: torch.Tensor, dtype: torch.dtype) -> float:
    """Half an ulp of ``dtype`` at the largest ``|oracle|``: what rounding a correct float32 sum to
    ``dtype`` may cost (for a 16-bit scalar gradient that is much more than the float32 sum's own
    error; eager may round to the near side and a kernel to the far one). 0 for float32 and float64
    results: there ``sum_floor`` covers it."""
    if not oracle.numel() or dtype in (torch.float32, torch.float64):
        return 0.0
    return 0.5 * torch.finfo(dtype).eps * oracle.double().abs().max().item()


def attention_term_sums(q, k, v, grad_out, **kwargs) -> dict:
    """``sum |terms|`` of the attention gradients that sum over the whole score matrix, from the
    eager reference in float64: ``{"bias": like the ALiBi slopes / T5 / distance table (``bias=``),
    "scale": like a learned QK-norm scale (``qk_norm.scale`` a tensor)}``, each present only when
    that input is given. ``kwargs``: the reference's keyword arguments (``xtk.reference.attention``).

    ``dS`` (the loss's gradient per logit) comes from a zero added to the logits; a bias element's
    terms are ``dS`` times its coefficient in the bias, one sign per element (``-|p_i - p_j|`` for
    slopes, ``T5.scale`` or 1 for tables), so ``|d/dtable sum(|dS| * bias(table))|`` is the sum of
    |terms|; a learned scale's terms are ``dS * s / scale`` (``s`` the scaled logits)."""
    from .attention import ScoreHooks, attention

    f64 = [t.detach().double() for t in (q, k, v)]
    seen = {}

    def add_zero(s):
        seen["s"], seen["zero"] = s.detach(), torch.zeros_like(s, requires_grad=True)
        return s + seen["zero"]

    with torch.enable_grad():
        out = attention(*f64, hooks=ScoreHooks("term sums", pre_bias=add_zero), **kwargs)
        ds = torch.autograd.grad(out, seen["zero"], grad_out.double())[0].abs()
    sums = {}
    bias = kwargs.get("bias")
    if bias is not None and bias.positional:
        table = bias.learned.detach().double().requires_grad_()
        h, nq, nk = q.shape[1], q.shape[2], k.shape[2]
        with torch.enable_grad():
            dense = bias.with_learned(table).materialize(h, nq, nk, kwargs.get("q_offset") or 0,
                                                         kwargs.get("k_prefix", 0))
            sums["bias"] = torch.autograd.grad((dense * ds.sum(0)).sum(), table)[0].abs()
    norm = kwargs.get("qk_norm")
    if norm is not None and isinstance(norm.scale, torch.Tensor):
        sums["scale"] = (ds * seen["s"]).abs().sum() / norm.scale.detach().double().abs()
    return sums
