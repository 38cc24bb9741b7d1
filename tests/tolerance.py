"""The tests' side of the one tolerance rule (``xtk.reference.tolerance``, SPEC §4): assert it, and
run a kernel, the eager reference and the fp64 oracle on the same rounded inputs."""
from __future__ import annotations

import torch

from xtk.reference.tolerance import (FLOOR, attention_term_sums, judge_2x, max_err,  # noqa: F401
                                     rounding_floor, sum_floor)  # (the rule lives in the package)


def assert_close_2x(kernel: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, name: str = "out",
                    factor: float = 2.0, floor: float | None = None) -> None:
    """kernel vs oracle error <= factor * (eager vs oracle error) + floor (``judge_2x``), asserted."""
    verdict = judge_2x(kernel, eager, oracle, name, factor, floor)
    assert verdict["ok"], verdict["why"]


def attention_sums(reference_kwargs, bias: str | None = None, scale: str | None = None):
    """A ``term_sums`` for ``check_against_oracle`` on attention: ``reference_kwargs(**inputs)``
    (the inputs but q, k, v) gives the reference's keyword arguments; ``bias`` / ``scale`` name the
    inputs holding the ALiBi slopes or T5 / distance table, and a learned QK-norm scale."""
    def term_sums(grad_out, q, k, v, **rest):
        sums = attention_term_sums(q, k, v, grad_out, **reference_kwargs(**rest))
        return {name: sums[key] for name, key in ((bias, "bias"), (scale, "scale")) if name and key in sums}
    return term_sums


def check_against_oracle(fn_kernel, fn_eager, inputs: dict, dtype, grad_names=(), name="out", factor=2.0,
                         term_sums=None):
    """Run ``fn_kernel`` and ``fn_eager`` on ``inputs`` rounded to ``dtype`` and the eager one in fp64;
    compare outputs and the gradients of ``grad_names`` (keys of ``inputs``) by the 2x rule.

    ``inputs`` maps names to tensors (float ones are rounded/cast) or other values passed as is.
    Each fn is called as ``fn(**inputs)`` and returns one tensor. ``term_sums(grad_out, **fp64 inputs)
    -> {input name: sum |terms| of its gradient}`` names the gradients that are one sum over a whole
    score matrix (``attention_sums``): they get ``sum_floor`` and ``rounding_floor`` on top of the
    dtype floor."""
    def prepared(cast):
        out = {}
        for key, t in inputs.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t.detach().to(dtype).to(cast).requires_grad_(key in grad_names)
            out[key] = t
        return out

    results = []
    g = None
    for fn, cast in ((fn_kernel, dtype), (fn_eager, dtype), (fn_eager, torch.float64)):
        args = prepared(cast)
        out = fn(**args)
        if g is None:
            g = torch.randn_like(out, dtype=torch.float64)
        grads = {}
        if grad_names:
            out.backward(g.to(out.dtype))
            grads = {n: args[n].grad for n in grad_names}
        results.append((out, grads))
    (k_out, k_g), (e_out, e_g), (o_out, o_g) = results
    sums = term_sums(g, **prepared(torch.float64)) if term_sums is not None and grad_names else {}
    assert_close_2x(k_out, e_out, o_out, name, factor)
    for n in grad_names:
        assert k_g[n] is not None, f"d{n}: kernel gave no gradient"
        floor = FLOOR[dtype] + sum_floor(sums[n], dtype) + rounding_floor(o_g[n], dtype) if n in sums else None
        assert_close_2x(k_g[n], e_g[n], o_g[n], f"d{n}", factor, floor)
