"""``load_x_transformers_weights``: an x-transformers 2.31.x ``state_dict()`` into the xtk model
built with the same kwargs.

The xtk model stack keeps x-transformers' module tree and parameter names, so keys map 1:1.
What differs: x-transformers 2.31 builds the layer norms and the final norm with
``unit_offset=True`` (``norm_add_unit_offset``, default True) and stores ``g - 1`` / ``gamma - 1``;
xtk stores the gain itself, so the loader adds 1 to those (SPEC §3). GQA checkpoints need no
weight permutation: the xtk Attention module reproduces x-transformers' query-to-kv-head order
at run time.
"""
from __future__ import annotations

from torch import nn


def _unit_offset_keys(model: nn.Module) -> set:
    keys = set()
    for name, module in model.named_modules():
        if getattr(module, "checkpoint_unit_offset", False):
            for pname, _ in module.named_parameters(recurse=False):
                keys.add(f"{name}.{pname}" if name else pname)
    return keys


def load_x_transformers_weights(model: nn.Module, state_dict: dict) -> nn.Module:
    """Copy an x-transformers 2.31.x ``state_dict`` into ``model`` (same kwargs); returns ``model``.

    Raises ``KeyError`` listing the checkpoint keys xtk cannot map and the model keys the
    checkpoint lacks, ``ValueError`` listing shape mismatches."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    own = model.state_dict()
    sd = dict(state_dict)
    if not any(k in own for k in sd):
        for prefix in ("net.", "module.", "_orig_mod."):
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                break
    unmappable = sorted(k for k in sd if k not in own)
    missing = sorted(k for k in own if k not in sd)
    if unmappable or missing:
        lines = []
        if unmappable:
            lines.append(f"checkpoint keys with no place in the xtk model ({len(unmappable)}): {', '.join(unmappable)}")
        if missing:
            lines.append(f"xtk model keys missing from the checkpoint ({len(missing)}): {', '.join(missing)}")
        raise KeyError("load_x_transformers_weights: state_dict does not match the model (built with the same "
                       "kwargs?)\n" + "\n".join(lines))
    bad = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in sd.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError("load_x_transformers_weights: shape mismatches:\n" + "\n".join(bad))
    offsets = _unit_offset_keys(model)
    new = {}
    for k, v in sd.items():
        v = v.detach()
        new[k] = v + 1 if k in offsets else v
    model.load_state_dict(new, strict=True)
    return model
