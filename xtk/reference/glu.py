"""Eager reference feed-forward activations (SPEC §3): gated (GLU family) and plain."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "relu_squared")


def activation(x, activation="gelu"):
    """Elementwise activation by name: gelu (exact), gelu_tanh, silu, relu, relu_squared."""
    work = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(work)
    if activation == "gelu":
        y = F.gelu(xf)
    elif activation == "gelu_tanh":
        y = F.gelu(xf, approximate="tanh")
    elif activation == "silu":
        y = F.silu(xf)
    elif activation == "relu":
        y = F.relu(xf)
    elif activation == "relu_squared":
        y = F.relu(xf) ** 2
    else:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return y.to(x.dtype)


def glu(x, activation_name="gelu"):
    """``x (..., 2*inner)`` splits into ``(a, gate)``; returns ``a * act(gate)`` of shape ``(..., inner)``."""
    a, gate = x.chunk(2, dim=-1)
    work = torch.promote_types(x.dtype, torch.float32)
    return (a.to(work) * activation(gate.to(work), activation_name)).to(x.dtype)
