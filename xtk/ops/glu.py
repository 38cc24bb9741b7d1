"""``xtk.glu`` and ``xtk.ops.glu.activation``: dispatch points for the feed-forward activations."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends
from ..reference import glu as reference
from ..reference.glu import ACTIVATIONS
from . import _check


@dataclass(frozen=True, eq=False)
class ActivationInputs:
    x: torch.Tensor
    activation: str


def _validate(x, activation, gated) -> ActivationInputs:
    _check.tensor("x", x)
    _check.floating("x", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if gated and (x.dim() == 0 or x.shape[-1] % 2):
        raise ValueError(f"x: expected an even last dim (2 * inner) for a GLU, got shape {tuple(x.shape)}")
    return ActivationInputs(x, activation)


EAGER_GLU = backends.Backend("eager", "glu", lambda inputs, forced: [],
                             lambda i: reference.glu(i.x, i.activation))
EAGER_ACTIVATION = backends.Backend("eager", "activation", lambda inputs, forced: [],
                                    lambda i: reference.activation(i.x, i.activation))


def glu(x, activation="gelu", backend="auto"):
    """Gated activation: ``x (..., 2*inner)`` splits into ``(a, gate)``, returns ``a * act(gate)``.

    activation: gelu (exact) | gelu_tanh | silu (SwiGLU) | relu (ReGLU) | relu_squared."""
    inputs = _validate(x, activation, gated=True)
    return backends.pick("glu", inputs, backend).run(inputs)


def activation(x, activation="gelu", backend="auto"):
    """Plain feed-forward activation by name (same names as ``glu``), elementwise."""
    inputs = _validate(x, activation, gated=False)
    return backends.pick("activation", inputs, backend).run(inputs)
