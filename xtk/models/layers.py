"""AttentionLayers, Encoder, Decoder, CrossAttender: x-transformers 2.31's kwargs, module tree
(``layers.{i}.{0: norms, 1: block, 2: residual}``) and forward conventions, on xtk ops.

Also the features today's x-transformers dropped, from their papers / the 000 seed:
``use_rezero`` (ReZero), ``deepnorm`` (DeepNet), ``position_infused_attn`` (Shortformer),
``attn_talking_heads``, ``attn_use_entmax15``, ``attn_collab_heads``; old names
``alibi_pos_emb`` and ``gate_values``.

Layout: the residual / branch wrappers; construction (kwargs routing and checks, the position
modules, ``layer_type_plan``, ``_LayerBuilder`` for one layer, DeepNet init); the forward's
residual stream (``_norm_stream`` / ``_add_residual``: a plain residual add is deferred into the
next RMSNorm, fused); ``AttentionLayers``; ``dropout_seq``; ``Encoder``, ``Decoder``,
``CrossAttender``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from random import random
from typing import Optional

import torch
from torch import nn

from ..modules.attention import Attention
from ..modules.feedforward import FeedForward
from ..modules.norms import LayerNorm, RMSNorm, ScaleNorm
from ..modules.positional import (AlibiPositionalBias, DynamicPositionBias, FixedSinusoidalEmbedding,
                                  RelativePositionBias, RotaryEmbedding)
from .cache import KVCache
from .intermediates import LayerIntermediates

DEFAULT_DIM_HEAD = 64
_ATTN_KWARGS = set(inspect.signature(Attention.__init__).parameters) - {"self", "dim", "heads", "causal"}
_FF_KWARGS = set(inspect.signature(FeedForward.__init__).parameters) - {"self", "dim"}


def check_nonempty(name: str, x: torch.Tensor, what: str = "position") -> None:
    """Raise a ValueError naming ``name`` unless ``x`` has at least one position along dim 1
    (a sequence of length 0 has no query or no key to attend to)."""
    if x.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one {what} per sequence (dim 1), got shape {tuple(x.shape)}")


# ---- residual / branch wrappers (x-transformers' names, so checkpoints map 1:1) -------------------

class Residual(nn.Module):
    """``branch + skip * residual_scale * constant``."""

    def __init__(self, dim, scale_residual=False, scale_residual_constant=1.0):
        super().__init__()
        self.residual_scale = nn.Parameter(torch.ones(dim)) if scale_residual else None
        self.scale_residual_constant = scale_residual_constant

    @property
    def plain(self):
        return self.residual_scale is None and self.scale_residual_constant == 1

    def forward(self, x, residual):
        if self.residual_scale is not None:
            residual = residual * self.residual_scale
        if self.scale_residual_constant != 1:
            residual = residual * self.scale_residual_constant
        return x + residual


class GRUGating(nn.Module):
    """``gate_residual``: the branch output and the skip combine through a GRU cell."""

    plain = False

    def __init__(self, dim, scale_residual=False, scale_residual_constant=1.0):
        super().__init__()
        self.gru = nn.GRUCell(dim, dim)
        self.residual_scale = nn.Parameter(torch.ones(dim)) if scale_residual else None

    def forward(self, x, residual):
        if self.residual_scale is not None:
            residual = residual * self.residual_scale
        return self.gru(x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])).reshape_as(x)


def _scaled(out, factor):
    """A block's output times ``factor``; of an attention block's ``(out, intermediates)`` only ``out``."""
    if isinstance(out, tuple):
        return (out[0] * factor, *out[1:])
    return out * factor


class Scale(nn.Module):
    """Multiplies the branch output by a constant (macaron: 0.5 on each feed-forward)."""

    def __init__(self, value, fn):
        super().__init__()
        self.value, self.fn = value, fn

    def forward(self, x, **kwargs):
        return _scaled(self.fn(x, **kwargs), self.value)


class Rezero(nn.Module):
    """ReZero (Bachlechner et al. 2020): the branch output times a learned scalar ``g``, init 0."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.g = nn.Parameter(torch.zeros(1))

    def forward(self, x, **kwargs):
        return _scaled(self.fn(x, **kwargs), self.g)


def _shift(t, amount, mask=None):
    if amount == 0:
        return t
    amount = min(amount, t.shape[1]) if amount > 0 else max(amount, -t.shape[1])
    if mask is not None:
        t = t.masked_fill(~mask[..., None], 0.0)
    if amount > 0:
        return torch.cat((t.new_zeros(t.shape[0], amount, t.shape[2]), t[:, :-amount]), dim=1)
    return torch.cat((t[:, -amount:], t.new_zeros(t.shape[0], -amount, t.shape[2])), dim=1)


class ShiftTokens(nn.Module):
    """Token shift (RWKV / "shift_tokens"): feature chunk ``c`` of the input is shifted by ``shifts[c]`` positions."""

    def __init__(self, shifts, fn):
        super().__init__()
        self.fn, self.shifts = fn, tuple(shifts)

    def forward(self, x, **kwargs):
        mask = kwargs.get("mask")
        segments = len(self.shifts)
        chunks = x.split(x.shape[-1] // segments, dim=-1)
        shifted = [_shift(c, s, mask=mask) for c, s in zip(chunks[:segments], self.shifts)]
        return self.fn(torch.cat((*shifted, *chunks[segments:]), dim=-1), **kwargs)


def _unwrap(block):
    while not isinstance(block, (Attention, FeedForward)):
        block = block.fn
    return block


def _group(prefix, kwargs):
    picked = {k[len(prefix):]: v for k, v in kwargs.items() if k.startswith(prefix)}
    rest = {k: v for k, v in kwargs.items() if not k.startswith(prefix)}
    return picked, rest


# ---- construction: kwargs, options, the layer-type plan, one builder per layer ---------------------

def _block_kwargs(owner: str, kwargs: dict, gate_values, qk_norm_dim_scale):
    """``(attn_kwargs, cross_attn_kwargs, ff_kwargs)``: the ``attn_*``, ``cross_attn_*`` and ``ff_*``
    kwargs without their prefix; a TypeError naming any other or unknown one. The old top-level
    names ``gate_values`` and ``qk_norm_dim_scale`` become attention kwargs."""
    ff_kwargs, kwargs = _group("ff_", kwargs)
    cross_attn_kwargs, kwargs = _group("cross_attn_", kwargs)
    attn_kwargs, kwargs = _group("attn_", kwargs)
    bad = [k for k in kwargs] + ["attn_" + k for k in attn_kwargs if k not in _ATTN_KWARGS] \
        + ["cross_attn_" + k for k in cross_attn_kwargs if k not in _ATTN_KWARGS | {"dim_context"}] \
        + ["ff_" + k for k in ff_kwargs if k not in _FF_KWARGS]
    if bad:
        raise TypeError(f"{owner}: unknown keyword argument(s) {', '.join(sorted(bad))}")
    if gate_values is not None:          # old top-level name
        attn_kwargs.setdefault("gate_values", gate_values)
    if qk_norm_dim_scale is not None:    # README's short name
        attn_kwargs.setdefault("qk_norm_dim_scale", qk_norm_dim_scale)
    return attn_kwargs, cross_attn_kwargs, ff_kwargs


def _head_dim(dim, heads, attn_kwargs) -> int:
    """The attention head width (``attn_dim_head``, default 64) after checking ``dim`` and ``heads``."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: expected a positive int, got {dim!r}")
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads: expected a positive int, got {heads!r}")
    if dim % heads and "dim_head" not in attn_kwargs:
        raise ValueError(f"dim: expected a multiple of heads ({heads}), got {dim}; "
                         "to keep it, pass attn_dim_head explicitly (x-transformers sizes heads by dim_head)")
    if attn_kwargs.get("kv_heads") is not None and heads % attn_kwargs["kv_heads"]:
        raise ValueError(f"attn_kv_heads: expected a divisor of heads ({heads}), got {attn_kwargs['kv_heads']}")
    return attn_kwargs.get("dim_head", DEFAULT_DIM_HEAD)


def _check_choices(causal, alibi_pos_bias, rel_pos_bias, dynamic_pos_bias, use_scalenorm, use_rmsnorm, rotary_xpos,
                   rel_pos_num_buckets, rel_pos_max_distance, layer_dropout) -> None:
    """ValueError for options that exclude each other or are out of range."""
    if sum(map(bool, (alibi_pos_bias, rel_pos_bias, dynamic_pos_bias))) > 1:
        raise ValueError("alibi_pos_bias, rel_pos_bias, dynamic_pos_bias: choose at most one")
    if sum(map(bool, (use_scalenorm, use_rmsnorm))) > 1:
        raise ValueError("use_scalenorm, use_rmsnorm: choose at most one")
    if rotary_xpos and not causal:
        raise ValueError("rotary_xpos: only for causal attention (Decoder), got a non-causal stack")
    if rel_pos_bias and rel_pos_num_buckets > rel_pos_max_distance:
        raise ValueError(f"rel_pos_num_buckets: expected <= rel_pos_max_distance ({rel_pos_max_distance}), "
                         f"got {rel_pos_num_buckets}")
    if not 0.0 <= layer_dropout < 1.0:
        raise ValueError(f"layer_dropout: expected a float in [0, 1), got {layer_dropout}")


def _rotary(dim_head, rotary_emb_dim, xpos, scale_base, interpolation_factor, base_rescale_factor) -> RotaryEmbedding:
    """The stack's rotary embedding on the first ``rotary_emb_dim`` (default ``dim_head // 2``) head features."""
    rotary_emb_dim = dim_head // 2 if rotary_emb_dim is None else rotary_emb_dim
    if rotary_emb_dim > dim_head:
        raise ValueError(f"rotary_emb_dim: expected <= attn_dim_head ({dim_head}), got {rotary_emb_dim}")
    return RotaryEmbedding(rotary_emb_dim, use_xpos=xpos, scale_base=scale_base,
                           interpolation_factor=interpolation_factor, base_rescale_factor=base_rescale_factor)


def _position_bias(dim, heads, causal, dim_head, rel_pos_bias, rel_pos_num_buckets, rel_pos_max_distance,
                   dynamic_pos_bias, dynamic_pos_bias_log_distance, dynamic_pos_bias_mlp_depth, dynamic_pos_bias_norm,
                   alibi_pos_bias, alibi_num_heads) -> Optional[nn.Module]:
    """The one position-bias module the stack shares across its layers (T5, dynamic, ALiBi), or None."""
    if rel_pos_bias:
        return RelativePositionBias(scale=dim_head ** 0.5, causal=causal, heads=heads,
                                    num_buckets=rel_pos_num_buckets, max_distance=rel_pos_max_distance)
    if dynamic_pos_bias:
        return DynamicPositionBias(dim=dim // 4, heads=heads, log_distance=dynamic_pos_bias_log_distance,
                                   depth=dynamic_pos_bias_mlp_depth, norm=dynamic_pos_bias_norm)
    if alibi_pos_bias:
        alibi_num_heads = heads if alibi_num_heads is None else alibi_num_heads
        if not 1 <= alibi_num_heads <= heads:
            raise ValueError(f"alibi_num_heads: expected 1 <= alibi_num_heads <= heads ({heads}), got {alibi_num_heads}")
        return AlibiPositionalBias(heads=alibi_num_heads, total_heads=heads)
    return None


def layer_type_plan(depth, cross_attend, only_cross, macaron, custom_layers=None, par_ratio=None,
                    sandwich_coef=None) -> tuple:
    """The stack's layers in order, one letter each: 'a' self attention, 'c' cross attention,
    'f' feed-forward. ``custom_layers`` as given; else ``depth`` blocks of ('a', 'f') (with
    cross attention ('a', 'c', 'f'), only cross ('c', 'f'), macaron an 'f' in front), rearranged
    by ``par_ratio`` (PAR transformer) or ``sandwich_coef`` (sandwich transformer)."""
    default_block = ("c", "f") if cross_attend and only_cross else (("a", "c", "f") if cross_attend else ("a", "f"))
    if macaron:
        default_block = ("f",) + default_block
    if custom_layers is not None:
        layer_types = tuple(custom_layers)
        if any(t not in ("a", "c", "f") for t in layer_types):
            raise ValueError(f"custom_layers: expected a sequence of 'a', 'c', 'f', got {custom_layers!r}")
    elif par_ratio is not None:
        par_depth = depth * len(default_block)
        if not 1 < par_ratio <= par_depth:
            raise ValueError(f"par_ratio: expected 1 < par_ratio <= {par_depth}, got {par_ratio}")
        default_block = tuple(t for t in default_block if t != "f")
        par_attn = par_depth // par_ratio
        depth_cut = par_depth * 2 // 3
        par_width = (depth_cut + depth_cut // par_attn) // par_attn
        if len(default_block) > par_width:
            raise ValueError(f"par_ratio: default block too large for par_ratio {par_ratio}")
        par_head = (default_block + ("f",) * (par_width - len(default_block))) * par_attn
        layer_types = par_head + ("f",) * (par_depth - len(par_head))
    elif sandwich_coef is not None:
        if depth is None or not 0 < sandwich_coef <= depth:
            raise ValueError(f"sandwich_coef: expected 0 < sandwich_coef <= depth ({depth}), got {sandwich_coef}")
        layer_types = ("a",) * sandwich_coef + default_block * (depth - sandwich_coef) + ("f",) * sandwich_coef
    else:
        if depth is None or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth: expected a positive int, got {depth!r}")
        layer_types = default_block * depth
    if cross_attend is False and "c" in layer_types:
        raise ValueError("custom_layers: 'c' (cross attention) needs cross_attend=True")
    return layer_types


@dataclass
class _LayerBuilder:
    """How every layer of one stack is built, from the options ``AttentionLayers.__init__`` resolved.
    ``layer(layer_type, shift)`` gives x-transformers' ``ModuleList([norms, branch, residual])``."""

    dim: int
    heads: int
    causal: bool
    attn_kwargs: dict
    cross_kwargs: dict
    ff_kwargs: dict
    residual_attn: bool
    cross_residual_attn: bool
    macaron: bool
    use_rezero: bool
    gate_residual: bool
    scale_residual: bool
    scale_residual_constant: float
    pre_norm: bool
    sandwich_norm: bool
    norm_class: type
    norm_add_unit_offset: bool

    def norm(self) -> Optional[nn.Module]:
        """A new norm of the stack's class; None under ReZero, which has no norms."""
        return None if self.use_rezero else self.norm_class(self.dim, checkpoint_unit_offset=self.norm_add_unit_offset)

    def branch(self, layer_type: str, shift: int) -> nn.Module:
        """The attention / cross-attention / feed-forward block, in its token-shift and ReZero wrappers."""
        if layer_type == "a":
            block = Attention(self.dim, heads=self.heads, causal=self.causal, **self.attn_kwargs)
            block.record_pre_softmax = self.residual_attn
        elif layer_type == "c":
            block = Attention(self.dim, heads=self.heads, **self.cross_kwargs)
            block.record_pre_softmax = self.cross_residual_attn
        else:
            block = FeedForward(self.dim, **self.ff_kwargs)
            block = Scale(0.5, block) if self.macaron else block
        if shift > 0:
            block = ShiftTokens(range(-shift if not self.causal else 0, shift + 1), block)
        return Rezero(block) if self.use_rezero else block

    def layer(self, layer_type: str, shift: int) -> nn.ModuleList:
        branch = self.branch(layer_type, shift)
        residual_cls = GRUGating if self.gate_residual else Residual
        residual = residual_cls(self.dim, scale_residual=self.scale_residual,
                                scale_residual_constant=self.scale_residual_constant)
        norms = nn.ModuleList([self.norm() if self.pre_norm else None, self.norm() if self.sandwich_norm else None,
                               self.norm() if not self.pre_norm else None])
        return nn.ModuleList([norms, branch, residual])


def _deepnorm_residual_constant(depth, scale_residual_constant) -> float:
    """DeepNet's residual scale ``(2 * depth) ** 0.25`` (it replaces ``scale_residual_constant``)."""
    if scale_residual_constant != 1:
        raise ValueError("scale_residual_constant: deepnorm sets it; leave it at 1")
    return (2 * (depth or 1)) ** 0.25


def _deepnorm_init(stack: nn.Module, depth: int) -> None:
    """DeepNet init: xavier-normal on every Linear, gain ``(8 * depth) ** -0.25`` on the feed-forward,
    value and output projections, zero biases."""
    beta = (8 * depth) ** -0.25
    for name, module in stack.named_modules():
        if type(module) is not nn.Linear:
            continue
        gain = beta if any(s in name for s in (".ff.", ".to_v", ".to_out")) else 1.0
        nn.init.xavier_normal_(module.weight, gain=gain)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---- forward: the residual stream, one call's inputs --------------------------------------------------
# The residual stream between layers is a tensor, or a pair (branch output, skip) whose add is
# deferred so that the next RMSNorm does add + norm in one fused call.

def _settle(stream) -> torch.Tensor:
    """The residual stream as a tensor (the deferred add done)."""
    return stream if isinstance(stream, torch.Tensor) else stream[0] + stream[1]


def _norm_stream(norm, stream):
    """``(norm(x), x)`` for the stream ``x`` ``(b, n, dim)``; with a deferred add and a fusable norm
    (RMSNorm), add and norm in one call; ``norm`` None: ``(x, x)``."""
    if not isinstance(stream, torch.Tensor) and getattr(norm, "fusable", False):
        return norm(stream[0], residual=stream[1])
    x = _settle(stream)
    return (norm(x) if norm is not None else x), x


def _add_residual(residual_fn, post_norm, out, skip):
    """The stream after a layer: ``post_norm(residual_fn(out, skip))`` for branch output ``out`` and
    skip ``skip`` ``(b, n, dim)``. A plain residual without post-norm is deferred (``(out, skip)``,
    added inside the next norm); with a fusable post-norm, add and norm run in one call."""
    plain = getattr(residual_fn, "plain", False)
    if plain and post_norm is None:
        return out, skip
    if plain and getattr(post_norm, "fusable", False):
        return post_norm(out, residual=skip)[0]
    x = residual_fn(out, skip)
    return post_norm(x) if post_norm is not None else x


@dataclass
class _CallInputs:
    """What every layer of one ``AttentionLayers.forward`` call gets: the masks, the context, the
    positional descriptors, and ``kv_length``, the cached positions before the new ones."""

    mask: Optional[torch.Tensor]
    context: Optional[torch.Tensor]
    context_mask: Optional[torch.Tensor]
    self_attn_kv_mask: Optional[torch.Tensor]
    attn_mask: Optional[torch.Tensor]
    rotary: object
    rel_pos: object
    kv_length: int
    return_attn: bool


_IGNORED_FORWARD_KWARGS = {"pos", "rotary_pos_emb", "condition", "in_attn_cond", "deep_embeds_and_ids",
                           "transform_block_inputs", "layers_execute_order"}


def _check_key_mask(mask, b: int, n: int, kv_length: int, cached: bool) -> None:
    """``mask`` None or bool ``(b, kv_length + n)``: the cached and the new positions."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor (True = keep), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] != n + kv_length:
        raise ValueError(f"mask: expected shape ({b}, {n + kv_length}) (with a cache: cached + new positions), "
                         f"got {tuple(mask.shape)}" if cached else
                         f"mask: expected shape ({b}, {n}), got {tuple(mask.shape)}")


def _uncached_part(x, cache: KVCache, attn_mask, input_not_include_cache, cache_age):
    """``x`` ``(b, n, dim)`` without the positions ``cache`` holds (x-transformers' convention: x is
    the whole sequence; ``input_not_include_cache``: x is only the new positions; ``cache_age``:
    the last that many are new)."""
    if attn_mask is not None:
        raise ValueError("attn_mask: not supported together with cache")
    if input_not_include_cache:
        return x
    if cache_age is None:
        return x[:, cache.first_new_position(x.shape[1]):]
    if cache_age < 1:
        raise ValueError(f"cache_age: expected at least 1 new position, got {cache_age}")
    return x[:, -cache_age:]


class AttentionLayers(nn.Module):
    """A stack of attention / cross-attention / feed-forward layers (x-transformers' AttentionLayers).

    ``attn_*`` kwargs go to every Attention (``cross_attn_*`` override them for cross attention),
    ``ff_*`` to every FeedForward. Unknown kwargs raise ``TypeError`` naming them."""

    def __init__(self, dim, depth=None, heads=8, causal=False, cross_attend=False, only_cross=False,
                 use_scalenorm=False, use_rmsnorm=False, use_rezero=False, norm_add_unit_offset=True,
                 alibi_pos_bias=False, alibi_pos_emb=False, alibi_num_heads=None,
                 rel_pos_bias=False, rel_pos_num_buckets=32, rel_pos_max_distance=128,
                 dynamic_pos_bias=False, dynamic_pos_bias_log_distance=False, dynamic_pos_bias_mlp_depth=2,
                 dynamic_pos_bias_norm=False,
                 rotary_pos_emb=False, rotary_emb_dim=None, rotary_xpos=False, rotary_interpolation_factor=1.0,
                 rotary_xpos_scale_base=512, rotary_base_rescale_factor=1.0,
                 position_infused_attn=False, custom_layers=None, sandwich_coef=None, par_ratio=None,
                 residual_attn=False, cross_residual_attn=False, macaron=False, pre_norm=True,
                 gate_residual=False, scale_residual=False, scale_residual_constant=1.0, shift_tokens=0,
                 sandwich_norm=False, zero_init_branch_output=False, layer_dropout=0.0,
                 cross_attn_tokens_dropout=0.0, disable_abs_pos_emb=None, deepnorm=False, gate_values=None,
                 qk_norm_dim_scale=None, **kwargs):
        super().__init__()
        attn_kwargs, cross_attn_kwargs, ff_kwargs = _block_kwargs(type(self).__name__, kwargs, gate_values,
                                                                  qk_norm_dim_scale)
        dim_head = _head_dim(dim, heads, attn_kwargs)
        alibi_pos_bias, rotary_pos_emb = alibi_pos_bias or alibi_pos_emb, rotary_pos_emb or rotary_xpos
        _check_choices(causal, alibi_pos_bias, rel_pos_bias, dynamic_pos_bias, use_scalenorm, use_rmsnorm, rotary_xpos,
                       rel_pos_num_buckets, rel_pos_max_distance, layer_dropout)
        self.dim, self.causal, self.cross_attend = dim, causal, cross_attend
        self.attn_heads, self.attn_dim_head = heads, dim_head
        self.norm_add_unit_offset = norm_add_unit_offset
        self.disable_abs_pos_emb = (rel_pos_bias or rotary_pos_emb or position_infused_attn) \
            if disable_abs_pos_emb is None else disable_abs_pos_emb
        # positions: rotary, position-infused, one shared bias module (built before the layers: init order)
        self.rotary_pos_emb = _rotary(dim_head, rotary_emb_dim, rotary_xpos, rotary_xpos_scale_base,
                                      rotary_interpolation_factor, rotary_base_rescale_factor) if rotary_pos_emb else None
        self.pia_pos_emb = FixedSinusoidalEmbedding(dim) if position_infused_attn else None
        self.rel_pos = _position_bias(dim, heads, causal, dim_head, rel_pos_bias, rel_pos_num_buckets,
                                      rel_pos_max_distance, dynamic_pos_bias, dynamic_pos_bias_log_distance,
                                      dynamic_pos_bias_mlp_depth, dynamic_pos_bias_norm, alibi_pos_bias, alibi_num_heads)
        # residuals and norms
        if deepnorm:
            scale_residual_constant = _deepnorm_residual_constant(depth, scale_residual_constant)
            pre_norm, sandwich_norm, scale_residual = False, False, True
        if sandwich_norm and not pre_norm:
            raise ValueError("sandwich_norm: needs pre_norm=True")
        self.pre_norm, self.sandwich_norm, self.use_rezero = pre_norm, sandwich_norm, use_rezero
        self.residual_attn, self.cross_residual_attn = residual_attn, cross_residual_attn
        # the layers
        shift_tokens = self._plan_layers(depth, cross_attend, only_cross, macaron, custom_layers, par_ratio,
                                         sandwich_coef, layer_dropout, cross_attn_tokens_dropout, shift_tokens)
        if zero_init_branch_output:
            attn_kwargs, ff_kwargs = {**attn_kwargs, "zero_init_output": True}, {**ff_kwargs, "zero_init_output": True}
        build = _LayerBuilder(
            dim=dim, heads=heads, causal=causal, attn_kwargs=attn_kwargs, cross_kwargs={**attn_kwargs, **cross_attn_kwargs},
            ff_kwargs=ff_kwargs, residual_attn=residual_attn, cross_residual_attn=cross_residual_attn, macaron=macaron,
            use_rezero=use_rezero, gate_residual=gate_residual, scale_residual=scale_residual,
            scale_residual_constant=scale_residual_constant, pre_norm=pre_norm, sandwich_norm=sandwich_norm,
            norm_class=ScaleNorm if use_scalenorm else (RMSNorm if use_rmsnorm else LayerNorm),
            norm_add_unit_offset=norm_add_unit_offset)
        self.layers = nn.ModuleList([build.layer(t, s) for t, s in zip(self.layer_types, shift_tokens)])
        self.final_norm = (build.norm() or nn.Identity()) if pre_norm else nn.Identity()
        self.can_cache_kv = all(s == 0 for s in shift_tokens)
        if deepnorm:
            _deepnorm_init(self, self.depth)

    def _plan_layers(self, depth, cross_attend, only_cross, macaron, custom_layers, par_ratio, sandwich_coef,
                     layer_dropout, cross_attn_tokens_dropout, shift_tokens) -> tuple:
        """Sets the layer plan (``layer_types``, ``depth``, the per-layer dropouts); returns the
        token shift of every layer."""
        self.layer_types = layer_type_plan(depth, cross_attend, only_cross, macaron, custom_layers, par_ratio,
                                           sandwich_coef)
        self.num_attn_layers = self.layer_types.count("a")
        self.depth = depth if depth is not None else len(self.layer_types)
        per_layer = len(self.layer_types)
        self.layer_dropouts = layer_dropout if isinstance(layer_dropout, tuple) else (layer_dropout,) * per_layer
        self.cross_attn_tokens_dropout = cross_attn_tokens_dropout
        return shift_tokens if isinstance(shift_tokens, tuple) else (shift_tokens,) * per_layer

    # -------------------------------------------------------------------------------------------
    def full_matrix_layers(self):
        """``[(layer index, reason)]`` for the attention layers that cannot use a kernel."""
        out = []
        for i, (_, block, _) in enumerate(self.layers):
            blk = _unwrap(block)
            if isinstance(blk, Attention) and blk.full_matrix_reason:
                out.append((i, blk.full_matrix_reason))
        return out

    def forward(self, x, context=None, mask=None, context_mask=None, attn_mask=None, self_attn_kv_mask=None,
                mems=None, mem_masks=None, seq_start_pos=None, seq_pos_offset=None,
                cache: Optional[LayerIntermediates] = None, input_not_include_cache=False, cache_age=None,
                return_hiddens=False, return_attn=False, **kwargs):
        """x ``(b, n, dim)``; mask ``(b, n)`` bool (True = keep); context ``(b, m, dim)`` and
        context_mask ``(b, m)`` for cross attention; attn_mask bool ``(b|1, heads|1, n, keys)``;
        mems: one ``(b, m, dim)`` memory per self-attention layer (Transformer-XL); cache: the
        ``LayerIntermediates`` of the previous call (a ``KVCache``, see ``xtk.models.cache``): x is
        then the whole sequence (only its positions after the cached ones are computed) or, with
        ``input_not_include_cache=True``, only the new positions; mask then covers cached + new
        positions. Returns x, or ``(x, LayerIntermediates)`` with ``return_hiddens``."""
        unknown = [k for k in kwargs if k not in _IGNORED_FORWARD_KWARGS or kwargs[k] is not None]
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward: unsupported keyword argument(s) {', '.join(sorted(unknown))}")
        self._check_inputs(x, context, context_mask)
        kv_length = 0
        if cache is not None:
            x = _uncached_part(x, cache, attn_mask, input_not_include_cache, cache_age)
            kv_length = cache.kv_length
        b, n = x.shape[:2]
        _check_key_mask(mask, b, n, kv_length, cache is not None)
        if seq_start_pos is not None:
            left_pad = torch.arange(n + kv_length, device=x.device) >= seq_start_pos[..., None]
            self_attn_kv_mask = left_pad if self_attn_kv_mask is None else self_attn_kv_mask & left_pad
        mems, mem_masks = self._layer_mems(mems, mem_masks, b)
        call = _CallInputs(mask, context, context_mask, self_attn_kv_mask, attn_mask, *self._positions(),
                           kv_length=kv_length, return_attn=return_attn)
        layer_caches = cache.layer_caches() if cache is not None else []
        stream, hiddens, new_layer_caches = self._run_layers(x, call, layer_caches, mems, mem_masks, return_hiddens)
        x, _ = _norm_stream(self.final_norm, stream)
        if not return_hiddens:
            return x
        out = (cache if cache is not None else LayerIntermediates()).append(new_layer_caches, n)
        out.hiddens, out.last_hidden = hiddens, x
        return x, out

    def attention_blocks(self) -> list:
        """The ``Attention`` module of every attention layer ('a' and 'c'), in layer order: what each
        entry of a ``KVCache``'s ``layer_caches()`` belongs to."""
        return [_unwrap(block) for t, (_, block, _) in zip(self.layer_types, self.layers) if t != "f"]

    def _positions(self) -> tuple:
        """``(rotary, rel_pos)`` of one call: the ``xtk.Rotary`` descriptor, and the shared position-bias
        module behind ``_OncePerCall`` (its descriptor built once per call), or None each."""
        return (self.rotary_pos_emb.descriptor() if self.rotary_pos_emb is not None else None,
                _OncePerCall(self.rel_pos) if self.rel_pos is not None else None)

    def static_step(self, x, layer_caches: list):
        """One decode step through every layer with fixed shapes and no host reads
        (``xtk.models.static_decode``): x ``(b, 1, dim)``; ``layer_caches``, one ``StaticKV`` per
        attention layer in layer order (self attention: the new key/value written into its store;
        cross attention: the context's keys/values), attended through ``xtk.attention_with_kvcache``.
        -> ``(b, 1, dim)`` after the final norm."""
        call = _CallInputs(None, None, None, None, None, *self._positions(), kv_length=0, return_attn=False)
        stream, _, _ = self._run_layers(x, call, layer_caches, [], [], return_hiddens=False)
        return _norm_stream(self.final_norm, stream)[0]

    def _check_inputs(self, x, context, context_mask) -> None:
        """x ``(b, n, dim)`` with ``n >= 1``; context ``(b, m, dim)`` exactly when the stack cross-attends,
        its mask bool ``(b, m)``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected a (batch, seq, {self.dim}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if self.cross_attend and context is None:
            raise ValueError("context: expected a (batch, seq, dim) tensor, this stack has cross attention "
                             "(cross_attend=True); got None")
        if not self.cross_attend and context is not None:
            raise ValueError("context: this stack has no cross attention (cross_attend=False); pass context=None")
        check_nonempty("x", x)
        if context is None:
            return
        if context.dim() != 3 or context.shape[0] != x.shape[0]:
            raise ValueError(f"context: expected shape ({x.shape[0]}, seq, dim), got {tuple(context.shape)}")
        check_nonempty("context", context)
        if context_mask is not None:
            if context_mask.dtype != torch.bool:
                raise TypeError(f"context_mask: expected a bool tensor, got dtype {context_mask.dtype}")
            if tuple(context_mask.shape) != tuple(context.shape[:2]):
                raise ValueError(f"context_mask: expected shape {tuple(context.shape[:2])}, "
                                 f"got {tuple(context_mask.shape)}")

    def _layer_mems(self, mems, mem_masks, b: int):
        """One memory ``(b, m, dim)`` (or None) and one memory mask ``(b, m)`` per self-attention layer."""
        mems = list(mems) if mems is not None else [None] * self.num_attn_layers
        mem_masks = list(mem_masks) if mem_masks is not None else [None] * self.num_attn_layers
        if mems and mems[0] is not None:
            for i, m in enumerate(mems):
                if m is not None and (m.dim() != 3 or m.shape[0] != b or m.shape[-1] != self.dim):
                    raise ValueError(f"mems[{i}]: expected shape ({b}, mem_len, {self.dim}), got {tuple(m.shape)}")
        return mems, mem_masks

    def _run_layers(self, x, call: _CallInputs, layer_caches: list, mems: list, mem_masks: list, return_hiddens):
        """Every layer in order on ``x`` ``(b, n, dim)``. Returns the residual stream (see
        ``_settle``), the input of every self-attention layer (with ``return_hiddens``) and the
        new per-attention-layer cache entries."""
        layer_caches = iter(layer_caches)
        stream, hiddens, new_layer_caches = x, [], []
        prev_attn = {"a": None, "c": None}   # pre-softmax attention handed on (residual attention)
        for layer_type, (norms, block, residual_fn), layer_dropout in zip(self.layer_types, self.layers,
                                                                          self.layer_dropouts):
            layer_cache = next(layer_caches, None) if layer_type != "f" else None
            mem = mems.pop(0) if layer_type == "a" and mems else None
            mem_mask = mem_masks.pop(0) if layer_type == "a" and mem_masks else None
            if self.training and layer_dropout > 0.0 and random() < layer_dropout:
                stream = _settle(stream)
                continue
            pre_norm, post_branch_norm, post_main_norm = norms
            normed, x = _norm_stream(pre_norm, stream)
            if layer_type == "a" and return_hiddens:
                hiddens.append(x)
            if mem is not None and pre_norm is not None:
                mem = pre_norm(mem)
            out, inter = self._branch(layer_type, block, normed, call, layer_cache, mem, mem_mask,
                                      prev_attn.get(layer_type))
            if post_branch_norm is not None:
                out = post_branch_norm(out)
            stream = _add_residual(residual_fn, post_main_norm, out, x)
            if inter is not None:
                inter.layer_type = layer_type
                new_layer_caches.append(inter)
                if self.cross_residual_attn if layer_type == "c" else self.residual_attn:
                    prev_attn[layer_type] = inter.pre_softmax_attn
        return stream, hiddens, new_layer_caches

    def _branch(self, layer_type, block, normed, call: _CallInputs, layer_cache, mem, mem_mask, prev_attn):
        """One layer's block on its normed input ``(b, n, dim)``: ``(out, Intermediates)`` for
        attention, ``(out, None)`` for feed-forward."""
        if layer_type == "f":
            return block(normed), None
        if layer_type == "c":
            context, context_mask = call.context, call.context_mask
            if self.training and self.cross_attn_tokens_dropout > 0:
                context, context_mask = dropout_seq(context, context_mask, self.cross_attn_tokens_dropout)
            return block(normed, context=context, mask=call.mask, context_mask=context_mask, prev_attn=prev_attn,
                         cache=layer_cache, return_intermediates=True, return_attn=call.return_attn)
        return block(normed, mask=call.mask, context_mask=call.self_attn_kv_mask, attn_mask=call.attn_mask,
                     rel_pos=call.rel_pos, rotary=call.rotary, prev_attn=prev_attn, mem=mem, mem_mask=mem_mask,
                     cache=layer_cache, return_intermediates=True, pia_pos_emb=self.pia_pos_emb,
                     pos_offset=call.kv_length + (mem.shape[1] if mem is not None else 0),
                     return_attn=call.return_attn)


class _OncePerCall:
    """The position-bias descriptor built once per forward and shared by every layer (the dynamic
    position bias MLP then runs once, not once per layer)."""

    def __init__(self, module):
        self.module, self.memo = module, {}

    def descriptor(self, L):
        if L not in self.memo:
            self.memo[L] = self.module.descriptor(L)
        return self.memo[L]


def dropout_seq(seq, mask, dropout: float, cap_valid_per_row: bool = False):
    """Keep a random ``1 - dropout`` fraction (at least one) of the positions of ``seq`` ``(b, n, d)``
    and of its ``mask`` ``(b, n)`` (masked positions dropped first), in their random order.

    ``cap_valid_per_row`` (x-transformers' ``dropout_seq``, which ``XTransformer`` uses): the kept
    mask also marks at most ``ceil(valid * (1 - dropout))`` positions valid per row. Without it
    (the cross-attention token dropout inside ``AttentionLayers``) every kept valid position stays
    valid. Returns ``(seq (b, k, d), mask (b, k) or None)``."""
    b, n = seq.shape[:2]
    keep_prob = 1. - dropout
    num_keep = max(1, int(n * keep_prob))
    scores = torch.randn(b, n, device=seq.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.finfo(scores.dtype).max)
    keep = scores.topk(num_keep, dim=-1).indices
    seq = seq.gather(1, keep[..., None].expand(-1, -1, seq.shape[-1]))
    if mask is None:
        return seq, None
    kept_mask = mask.gather(1, keep)
    if cap_valid_per_row:
        keep_counts = torch.ceil(mask.sum(dim=-1) * keep_prob).int()
        kept_mask = kept_mask & (torch.arange(num_keep, device=seq.device)[None] < keep_counts[:, None])
    return seq, kept_mask


class Encoder(AttentionLayers):
    """Bidirectional AttentionLayers."""

    def __init__(self, **kwargs):
        if "causal" in kwargs:
            raise TypeError("Encoder: causal is fixed to False; do not pass it")
        super().__init__(causal=False, **kwargs)


class Decoder(AttentionLayers):
    """Causal AttentionLayers."""

    def __init__(self, **kwargs):
        if "causal" in kwargs:
            raise TypeError("Decoder: causal is fixed to True; do not pass it")
        super().__init__(causal=True, **kwargs)


class CrossAttender(AttentionLayers):
    """Only cross-attention and feed-forward layers (needs ``context``)."""

    def __init__(self, **kwargs):
        super().__init__(cross_attend=True, only_cross=True, **kwargs)
