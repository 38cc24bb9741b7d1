"""The one tolerance rule (SPEC §4, flash-attention's): judge a kernel against an fp64 oracle.

Round the inputs to the test dtype; run the oracle in fp64 on those rounded inputs, the
eager reference in the test dtype, and the kernel. The kernel's max error against the
oracle must be at most ``2x`` the eager test-dtype error plus a small floor.
"""
from __future__ import annotations

import torch

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_close_2x(kernel: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, name: str = "out",
                    factor: float = 2.0, floor: float | None = None) -> None:
    """kernel vs oracle error <= factor * (eager vs oracle error) + floor."""
    assert kernel.shape == oracle.shape, f"{name}: shape {tuple(kernel.shape)} != oracle {tuple(oracle.shape)}"
    assert torch.isfinite(kernel).all(), f"{name}: kernel output has non-finite values"
    floor = FLOOR[eager.dtype] if floor is None else floor
    k_err, e_err = max_err(kernel, oracle), max_err(eager, oracle)
    assert k_err <= factor * e_err + floor, (
        f"{name}: kernel error {k_err:.3e} > {factor} x eager error {e_err:.3e} + floor {floor:.1e}")


def check_against_oracle(fn_kernel, fn_eager, inputs: dict, dtype, grad_names=(), name="out", factor=2.0):
    """Run ``fn_kernel`` and ``fn_eager`` on ``inputs`` rounded to ``dtype`` and the eager one in fp64;
    compare outputs and the gradients of ``grad_names`` (keys of ``inputs``) by the 2x rule.

    ``inputs`` maps names to tensors (float ones are rounded/cast) or other values passed as is.
    Each fn is called as ``fn(**inputs)`` and returns one tensor."""
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
    assert_close_2x(k_out, e_out, o_out, name, factor)
    for n in grad_names:
        assert k_g[n] is not None, f"d{n}: kernel gave no gradient"
        assert_close_2x(k_g[n], e_g[n], o_g[n], f"d{n}", factor)
