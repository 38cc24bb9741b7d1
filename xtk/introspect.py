"""Which layers of a model can use the kernels, and why not (``python -m xtk info --model [--patch]``);
``model_report(model)`` for a model in hand, patched or not."""
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


def _names() -> dict:
    """What a ``--model`` expression may use: xtk's public names, and the modules ``transformers``
    and ``x_transformers`` where installed."""
    import importlib
    import xtk
    names = {n: getattr(xtk, n) for n in xtk.__all__}
    for module in ("transformers", "x_transformers"):
        try:
            names[module] = importlib.import_module(module)
        except ImportError:
            pass
    return names


def build_model(expression: str) -> torch.nn.Module:
    """Evaluate a model constructor expression, e.g. ``"Decoder(dim=64, depth=2, heads=4)"`` or
    ``"transformers.BloomForCausalLM(transformers.BloomConfig(n_layer=2, hidden_size=64, n_head=4))"``,
    with xtk's public names and the modules ``transformers`` / ``x_transformers`` in scope (nothing else)."""
    model = eval(expression, {"__builtins__": {"True": True, "False": False, "None": None}}, _names())  # noqa: S307
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model: expected an expression building an nn.Module, got {type(model).__name__}")
    return model


def patch_model(model: torch.nn.Module):
    """Patch ``model`` in place the way its library takes: ``xtk.patch`` for an x-transformers model,
    ``xtk.integrations.hf.patch`` for a Hugging Face one. -> the ``PatchReport``; TypeError naming the
    class for any other model."""
    if type(model).__module__.startswith("x_transformers"):
        from .integrations.xtransformers import patch
        return patch(model)
    if type(model).__module__.startswith("transformers"):
        from .integrations.hf import patch
        return patch(model)
    raise TypeError(f"--patch: {type(model).__name__} is neither an x-transformers nor a Hugging Face model "
                    f"(xtk's own models need no patch)")


def model_report(model: torch.nn.Module) -> list[str]:
    """Lines saying how ``model``'s attention runs: a patched model's ``PatchReport`` (what was
    swapped, what was kept and why); a Hugging Face model's attention implementation; for xtk's
    own models, the layers that need the whole score matrix (eager path)."""
    from .integrations.report import PatchReport
    report = PatchReport.of(model)
    if report is not None:
        return str(report).splitlines()
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if type(model).__module__.startswith("transformers"):
        how = "xtk.attention (registry)" if impl == "xtk" else f"{impl!r}, not xtk"
        return [f"Hugging Face {type(model).__name__}: attn_implementation {how}; not patched "
                f"(--patch, or xtk.integrations.hf.patch(model), for BLOOM / MPT / Falcon / T5)"]
    if type(model).__module__.startswith("x_transformers"):
        return [f"x-transformers {type(model).__name__}: not patched (--patch, or xtk.patch(model))"]
    attn = [n for n, m in model.named_modules() if hasattr(m, "full_matrix_reason")]
    rows = kernel_report(model)
    lines = [f"attention layers: {len(attn)}, of which need the eager path: {len(rows)}"]
    lines += [f"  {name}: {reason}" for name, reason in rows]
    if not rows and attn:
        lines.append("  every attention layer goes through the kernels' dispatch (xtk.attention)")
    return lines


def print_model_report(expression: str, out, patch: bool = False) -> None:
    model = build_model(expression)
    if patch:
        patch_model(model)
    print(f"\nmodel: {expression}" + (" (patched)" if patch else ""), file=out)
    for line in model_report(model):
        print("  " + line, file=out)
