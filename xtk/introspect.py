"""Which layers of a model can use the kernels, and why not (``python -m xtk info --model``)."""
from __future__ import annotations

import torch


def kernel_report(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(module path, reason)`` for every attention layer that needs the whole score matrix
    and therefore always runs the eager path (``full_matrix_reason`` set on the module)."""
    rows = []
    for name, module in model.named_modules():
        reason = getattr(module, "full_matrix_reason", None)
        if reason:
            rows.append((name or "<root>", reason))
    return rows


def build_model(expression: str) -> torch.nn.Module:
    """Evaluate a model constructor expression, e.g. ``"Decoder(dim=64, depth=2, heads=4)"``, with
    xtk's public names in scope (and nothing else)."""
    import xtk
    names = {n: getattr(xtk, n) for n in xtk.__all__}
    model = eval(expression, {"__builtins__": {"True": True, "False": False, "None": None}}, names)  # noqa: S307
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model: expected an expression building an nn.Module, got {type(model).__name__}")
    return model


def print_model_report(expression: str, out) -> None:
    model = build_model(expression)
    attn = [n for n, m in model.named_modules() if hasattr(m, "full_matrix_reason")]
    rows = kernel_report(model)
    print(f"\nmodel: {expression}", file=out)
    print(f"  attention layers: {len(attn)}, of which need the eager path: {len(rows)}", file=out)
    for name, reason in rows:
        print(f"    {name}: {reason}", file=out)
    if not rows and attn:
        print("    every attention layer goes through the kernels' dispatch (xtk.attention)", file=out)
