"""FeedForward (SPEC §3) with x-transformers' module tree, activations through ``xtk.glu`` /
``xtk.ops.glu.activation``.

Keys: GLU ``ff.0.proj.{weight,bias}``, plain ``ff.0.0.{weight,bias}``; ``ff_post_act_ln`` adds a
LayerNorm at ``ff.1``; the output Linear is the last entry of ``ff``.
"""
from __future__ import annotations

from torch import nn

from ..ops.glu import activation as act_fn, glu as glu_fn
from .norms import LayerNorm


class _GLUIn(nn.Module):
    """Up-projection to ``2 * inner`` (always with bias, as x-transformers' ``GLU.proj``) + gated activation."""

    def __init__(self, dim, inner, activation):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)
        self.activation = activation

    def forward(self, x):
        return glu_fn(self.proj(x), self.activation)


class _PlainIn(nn.Sequential):
    """Up-projection (index 0, as x-transformers' ``Sequential(Linear, act)``) + activation."""

    def __init__(self, dim, inner, activation, bias):
        super().__init__(nn.Linear(dim, inner, bias=bias))
        self.activation = activation

    def forward(self, x):
        return act_fn(self[0](x), self.activation)


class FeedForward(nn.Module):
    """``Linear -> act (GLU or plain) -> [LayerNorm] -> Dropout -> Linear``; inner = ``int(dim * mult)``.

    act: GELU, SiLU with ``swish``, ``relu(x) ** 2`` with ``relu_squared`` (also the GLU gate)."""

    def __init__(self, dim, dim_out=None, mult=4, glu=False, swish=False, relu_squared=False, post_act_ln=False,
                 dropout=0.0, no_bias=False, zero_init_output=False):
        super().__init__()
        if mult <= 0:
            raise ValueError(f"ff_mult: expected a positive number, got {mult}")
        inner = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        self.activation = "relu_squared" if relu_squared else ("silu" if swish else "gelu")
        proj_in = _GLUIn(dim, inner, self.activation) if glu else _PlainIn(dim, inner, self.activation, not no_bias)
        proj_out = nn.Linear(inner, dim_out, bias=not no_bias)
        mods = [proj_in] + ([LayerNorm(inner)] if post_act_ln else []) + [nn.Dropout(dropout), proj_out]
        self.ff = nn.Sequential(*mods)
        if zero_init_output:
            nn.init.zeros_(proj_out.weight)
            if proj_out.bias is not None:
                nn.init.zeros_(proj_out.bias)

    def forward(self, x, **kwargs):
        return self.ff(x)
