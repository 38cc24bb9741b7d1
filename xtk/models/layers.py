"""AttentionLayers, Encoder, Decoder, CrossAttender: x-transformers 2.31's kwargs, module tree
(``layers.{i}.{0: norms, 1: block, 2: residual}``) and forward conventions, on xtk ops.

Also the features today's x-transformers dropped, from their papers / the 000 seed:
``use_rezero`` (ReZero), ``deepnorm`` (DeepNet), ``position_infused_attn`` (Shortformer),
``attn_talking_heads``, ``attn_use_entmax15``, ``attn_collab_heads``; old names
``alibi_pos_emb`` and ``gate_values``.
"""
from __future__ import annotations

import inspect
from random import random
from typing import Optional

import torch
from torch import nn

from ..modules.attention import Attention
from ..modules.feedforward import FeedForward
from ..modules.norms import LayerNorm, RMSNorm, ScaleNorm
from ..modules.positional import (AlibiPositionalBias, DynamicPositionBias, FixedSinusoidalEmbedding,
                                  RelativePositionBias, RotaryEmbedding)
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


class Scale(nn.Module):
    """Multiplies the branch output by a constant (macaron: 0.5 on each feed-forward)."""

    def __init__(self, value, fn):
        super().__init__()
        self.value, self.fn = value, fn

    def forward(self, x, **kwargs):
        out = self.fn(x, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * self.value, *out[1:])
        return out * self.value


class Rezero(nn.Module):
    """ReZero (Bachlechner et al. 2020): the branch output times a learned scalar ``g``, init 0."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.g = nn.Parameter(torch.zeros(1))

    def forward(self, x, **kwargs):
        out = self.fn(x, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * self.g, *out[1:])
        return out * self.g


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
        ff_kwargs, kwargs = _group("ff_", kwargs)
        cross_attn_kwargs, kwargs = _group("cross_attn_", kwargs)
        attn_kwargs, kwargs = _group("attn_", kwargs)
        bad = [k for k in kwargs] + ["attn_" + k for k in attn_kwargs if k not in _ATTN_KWARGS] \
            + ["cross_attn_" + k for k in cross_attn_kwargs if k not in _ATTN_KWARGS | {"dim_context"}] \
            + ["ff_" + k for k in ff_kwargs if k not in _FF_KWARGS]
        if bad:
            raise TypeError(f"{type(self).__name__}: unknown keyword argument(s) {', '.join(sorted(bad))}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads: expected a positive int, got {heads!r}")
        if gate_values is not None:          # old top-level name
            attn_kwargs.setdefault("gate_values", gate_values)
        if qk_norm_dim_scale is not None:    # README's short name
            attn_kwargs.setdefault("qk_norm_dim_scale", qk_norm_dim_scale)
        if dim % heads and "dim_head" not in attn_kwargs:
            raise ValueError(f"dim: expected a multiple of heads ({heads}), got {dim}; "
                             "to keep it, pass attn_dim_head explicitly (x-transformers sizes heads by dim_head)")
        dim_head = attn_kwargs.get("dim_head", DEFAULT_DIM_HEAD)
        alibi_pos_bias = alibi_pos_bias or alibi_pos_emb
        rotary_pos_emb = rotary_pos_emb or rotary_xpos
        if sum(map(bool, (alibi_pos_bias, rel_pos_bias, dynamic_pos_bias))) > 1:
            raise ValueError("alibi_pos_bias, rel_pos_bias, dynamic_pos_bias: choose at most one")
        if sum(map(bool, (use_scalenorm, use_rmsnorm))) > 1:
            raise ValueError("use_scalenorm, use_rmsnorm: choose at most one")
        if rotary_xpos and not causal:
            raise ValueError("rotary_xpos: only for causal attention (Decoder), got a non-causal stack")
        if rel_pos_bias and rel_pos_num_buckets > rel_pos_max_distance:
            raise ValueError(f"rel_pos_num_buckets: expected <= rel_pos_max_distance ({rel_pos_max_distance}), got {rel_pos_num_buckets}")
        if not 0.0 <= layer_dropout < 1.0:
            raise ValueError(f"layer_dropout: expected a float in [0, 1), got {layer_dropout}")

        self.dim, self.causal, self.cross_attend = dim, causal, cross_attend
        self.attn_heads, self.attn_dim_head = heads, dim_head
        self.norm_add_unit_offset = norm_add_unit_offset
        self.disable_abs_pos_emb = (rel_pos_bias or rotary_pos_emb or position_infused_attn) \
            if disable_abs_pos_emb is None else disable_abs_pos_emb

        rotary_emb_dim = dim_head // 2 if rotary_emb_dim is None else rotary_emb_dim
        if rotary_pos_emb and rotary_emb_dim > dim_head:
            raise ValueError(f"rotary_emb_dim: expected <= attn_dim_head ({dim_head}), got {rotary_emb_dim}")
        self.rotary_pos_emb = RotaryEmbedding(rotary_emb_dim, use_xpos=rotary_xpos, scale_base=rotary_xpos_scale_base,
                                              interpolation_factor=rotary_interpolation_factor,
                                              base_rescale_factor=rotary_base_rescale_factor) if rotary_pos_emb else None
        self.pia_pos_emb = FixedSinusoidalEmbedding(dim) if position_infused_attn else None

        self.rel_pos = None
        if rel_pos_bias:
            self.rel_pos = RelativePositionBias(scale=dim_head ** 0.5, causal=causal, heads=heads,
                                                num_buckets=rel_pos_num_buckets, max_distance=rel_pos_max_distance)
        elif dynamic_pos_bias:
            self.rel_pos = DynamicPositionBias(dim=dim // 4, heads=heads, log_distance=dynamic_pos_bias_log_distance,
                                               depth=dynamic_pos_bias_mlp_depth, norm=dynamic_pos_bias_norm)
        elif alibi_pos_bias:
            alibi_num_heads = heads if alibi_num_heads is None else alibi_num_heads
            if not 1 <= alibi_num_heads <= heads:
                raise ValueError(f"alibi_num_heads: expected 1 <= alibi_num_heads <= heads ({heads}), got {alibi_num_heads}")
            self.rel_pos = AlibiPositionalBias(heads=alibi_num_heads, total_heads=heads)

        if deepnorm:
            if scale_residual_constant != 1:
                raise ValueError("scale_residual_constant: deepnorm sets it; leave it at 1")
            pre_norm = sandwich_norm = False
            scale_residual = True
            scale_residual_constant = (2 * (depth or 1)) ** 0.25
        if sandwich_norm and not pre_norm:
            raise ValueError("sandwich_norm: needs pre_norm=True")
        self.pre_norm, self.sandwich_norm = pre_norm, sandwich_norm
        self.residual_attn, self.cross_residual_attn = residual_attn, cross_residual_attn

        norm_class = ScaleNorm if use_scalenorm else (RMSNorm if use_rmsnorm else LayerNorm)
        self.use_rezero = use_rezero

        def norm_fn():
            return None if use_rezero else norm_class(dim, checkpoint_unit_offset=norm_add_unit_offset)

        if cross_attend and not only_cross:
            default_block = ("a", "c", "f")
        elif cross_attend and only_cross:
            default_block = ("c", "f")
        else:
            default_block = ("a", "f")
        if macaron:
            default_block = ("f",) + default_block

        if custom_layers is not None:
            layer_types = tuple(custom_layers)
            bad_types = [t for t in layer_types if t not in ("a", "c", "f")]
            if bad_types:
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
            par_block = default_block + ("f",) * (par_width - len(default_block))
            par_head = par_block * par_attn
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
        self.layer_types = layer_types
        self.num_attn_layers = layer_types.count("a")
        self.depth = depth if depth is not None else len(layer_types)
        self.layer_dropouts = layer_dropout if isinstance(layer_dropout, tuple) else (layer_dropout,) * len(layer_types)
        self.cross_attn_tokens_dropout = cross_attn_tokens_dropout
        shift_tokens = shift_tokens if isinstance(shift_tokens, tuple) else (shift_tokens,) * len(layer_types)

        if zero_init_branch_output:
            attn_kwargs = {**attn_kwargs, "zero_init_output": True}
            ff_kwargs = {**ff_kwargs, "zero_init_output": True}
        cross_kwargs = {**attn_kwargs, **cross_attn_kwargs}

        # validated here so the error names the model kwargs
        if attn_kwargs.get("kv_heads") is not None and heads % attn_kwargs["kv_heads"]:
            raise ValueError(f"attn_kv_heads: expected a divisor of heads ({heads}), got {attn_kwargs['kv_heads']}")

        self.layers = nn.ModuleList([])
        for layer_type, layer_shift in zip(layer_types, shift_tokens):
            if layer_type == "a":
                layer = Attention(dim, heads=heads, causal=causal, **attn_kwargs)
                layer.record_pre_softmax = residual_attn
            elif layer_type == "c":
                layer = Attention(dim, heads=heads, **cross_kwargs)
                layer.record_pre_softmax = cross_residual_attn
            else:
                layer = FeedForward(dim, **ff_kwargs)
                layer = Scale(0.5, layer) if macaron else layer
            if layer_shift > 0:
                layer = ShiftTokens(range(-layer_shift if not causal else 0, layer_shift + 1), layer)
            if use_rezero:
                layer = Rezero(layer)
            residual_cls = GRUGating if gate_residual else Residual
            residual = residual_cls(dim, scale_residual=scale_residual, scale_residual_constant=scale_residual_constant)
            norms = nn.ModuleList([norm_fn() if pre_norm else None, norm_fn() if sandwich_norm else None,
                                   norm_fn() if not pre_norm else None])
            self.layers.append(nn.ModuleList([norms, layer, residual]))

        self.final_norm = (norm_fn() or nn.Identity()) if pre_norm else nn.Identity()
        self.can_cache_kv = all(s == 0 for s in shift_tokens)

        if deepnorm:
            beta = (8 * self.depth) ** -0.25
            for name, module in self.named_modules():
                if type(module) is not nn.Linear:
                    continue
                gain = beta if any(s in name for s in (".ff.", ".to_v", ".to_out")) else 1.0
                nn.init.xavier_normal_(module.weight, gain=gain)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

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
        ``LayerIntermediates`` of the previous call (see ``xtk.models.intermediates``): x is then
        the whole sequence (only its last ``n - cached`` tokens are computed) or, with
        ``input_not_include_cache=True``, only the new tokens. Returns x, or
        ``(x, LayerIntermediates)`` with ``return_hiddens``."""
        if kwargs:
            known_ignored = {"pos", "rotary_pos_emb", "condition", "in_attn_cond", "deep_embeds_and_ids",
                             "transform_block_inputs", "layers_execute_order"}
            unknown = [k for k in kwargs if k not in known_ignored or kwargs[k] is not None]
            if unknown:
                raise TypeError(f"{type(self).__name__}.forward: unsupported keyword argument(s) {', '.join(sorted(unknown))}")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected a (batch, seq, {self.dim}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if self.cross_attend and context is None:
            raise ValueError("context: expected a (batch, seq, dim) tensor, this stack has cross attention (cross_attend=True); got None")
        if not self.cross_attend and context is not None:
            raise ValueError("context: this stack has no cross attention (cross_attend=False); pass context=None")
        check_nonempty("x", x)
        b = x.shape[0]
        if context is not None:
            if context.dim() != 3 or context.shape[0] != b:
                raise ValueError(f"context: expected shape ({b}, seq, dim), got {tuple(context.shape)}")
            check_nonempty("context", context)
            if context_mask is not None:
                if context_mask.dtype != torch.bool:
                    raise TypeError(f"context_mask: expected a bool tensor, got dtype {context_mask.dtype}")
                if tuple(context_mask.shape) != tuple(context.shape[:2]):
                    raise ValueError(f"context_mask: expected shape {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}")

        prev_cache_length, cached = 0, 0
        attn_cache = []
        if cache is not None:
            if attn_mask is not None:
                raise ValueError("attn_mask: not supported together with cache")
            prev_cache_length = cache.cache_length
            cached = cache.cached_length
            attn_cache = cache.attn_intermediates or []
            if not input_not_include_cache:
                n_new = x.shape[1] - cached if cache_age is None else cache_age
                if n_new < 1:
                    raise ValueError(f"x: with a cache of {cached} positions expected more than {cached} tokens, got {x.shape[1]}")
                x = x[:, -n_new:]
        n = x.shape[1]
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask: expected a bool tensor (True = keep), got "
                                f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
            if mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] != n + cached:
                raise ValueError(f"mask: expected shape ({b}, {n + cached}) (with a cache: cached + new positions), "
                                 f"got {tuple(mask.shape)}" if cache is not None else
                                 f"mask: expected shape ({b}, {n}), got {tuple(mask.shape)}")
        if seq_start_pos is not None:
            left_pad = torch.arange(n + cached, device=x.device) >= seq_start_pos[..., None]
            self_attn_kv_mask = left_pad if self_attn_kv_mask is None else self_attn_kv_mask & left_pad

        mems = list(mems) if mems is not None else [None] * self.num_attn_layers
        mem_masks = list(mem_masks) if mem_masks is not None else [None] * self.num_attn_layers
        if mems and mems[0] is not None:
            for i, m in enumerate(mems):
                if m is not None and (m.dim() != 3 or m.shape[0] != b or m.shape[-1] != self.dim):
                    raise ValueError(f"mems[{i}]: expected shape ({b}, mem_len, {self.dim}), got {tuple(m.shape)}")

        rotary = self.rotary_pos_emb.descriptor() if self.rotary_pos_emb is not None else None
        rel_pos = _OncePerCall(self.rel_pos) if self.rel_pos is not None else None
        iter_cache = iter(attn_cache)
        hiddens, intermediates = [], []
        prev_attn = prev_cross_attn = None
        pending = None   # (branch out, skip): a residual add not done yet, fused into the next RMSNorm

        for ind, (layer_type, (norms, block, residual_fn), layer_dropout) in enumerate(
                zip(self.layer_types, self.layers, self.layer_dropouts)):
            if self.training and layer_dropout > 0.0 and random() < layer_dropout:
                if pending is not None:
                    x, pending = pending[0] + pending[1], None
                if layer_type in ("a", "c"):
                    next(iter_cache, None)
                if layer_type == "a" and mems:
                    mems.pop(0)
                    mem_masks.pop(0) if mem_masks else None
                continue
            pre_norm, post_branch_norm, post_main_norm = norms
            layer_mem = layer_mem_mask = None
            if layer_type == "a":
                layer_mem = mems.pop(0) if mems else None
                layer_mem_mask = mem_masks.pop(0) if mem_masks else None
            if pending is not None and pre_norm is not None and getattr(pre_norm, "fusable", False):
                normed, x = pre_norm(pending[0], residual=pending[1])
                pending = None
            else:
                if pending is not None:
                    x, pending = pending[0] + pending[1], None
                normed = pre_norm(x) if pre_norm is not None else x
            if layer_type == "a" and return_hiddens:
                hiddens.append(x)
            residual = x
            if layer_type == "a" and layer_mem is not None and pre_norm is not None:
                layer_mem = pre_norm(layer_mem)
            ctx, ctx_mask = context, context_mask
            if layer_type == "c" and self.training and self.cross_attn_tokens_dropout > 0:
                ctx, ctx_mask = _dropout_seq(ctx, ctx_mask, self.cross_attn_tokens_dropout)

            inter = None
            if layer_type == "a":
                out, inter = block(normed, mask=mask, context_mask=self_attn_kv_mask, attn_mask=attn_mask,
                                   rel_pos=rel_pos, rotary=rotary, prev_attn=prev_attn, mem=layer_mem,
                                   mem_mask=layer_mem_mask, cache=next(iter_cache, None), return_intermediates=True,
                                   pia_pos_emb=self.pia_pos_emb,
                                   pos_offset=cached + (layer_mem.shape[1] if layer_mem is not None else 0),
                                   return_attn=return_attn)
            elif layer_type == "c":
                out, inter = block(normed, context=ctx, mask=mask, context_mask=ctx_mask, prev_attn=prev_cross_attn,
                                   cache=next(iter_cache, None), return_intermediates=True, return_attn=return_attn)
            else:
                out = block(normed)

            if post_branch_norm is not None:
                out = post_branch_norm(out)
            plain = getattr(residual_fn, "plain", False)
            if plain and post_main_norm is None:
                pending = (out, residual)          # added inside the next pre-norm (fused RMSNorm)
            elif plain and getattr(post_main_norm, "fusable", False):
                x = post_main_norm(out, residual=residual)[0]   # post-norm: add + RMSNorm in one call
                post_main_norm = None
            else:
                x = residual_fn(out, residual)
            if inter is not None:
                inter.layer_type = layer_type
                intermediates.append(inter)
                if layer_type == "a" and self.residual_attn:
                    prev_attn = inter.pre_softmax_attn
                elif layer_type == "c" and self.cross_residual_attn:
                    prev_cross_attn = inter.pre_softmax_attn
            if post_main_norm is not None:
                x = post_main_norm(x)

        if pending is not None:
            if getattr(self.final_norm, "fusable", False):
                x = self.final_norm(pending[0], residual=pending[1])[0]
            else:
                x = self.final_norm(pending[0] + pending[1])
        else:
            x = self.final_norm(x)

        if not return_hiddens:
            return x
        return x, LayerIntermediates(hiddens=hiddens, last_hidden=x, attn_intermediates=intermediates,
                                     cache_length=prev_cache_length + n)


class _OncePerCall:
    """The position-bias descriptor built once per forward and shared by every layer (the dynamic
    position bias MLP then runs once, not once per layer)."""

    def __init__(self, module):
        self.module, self.memo = module, {}

    def descriptor(self, L):
        if L not in self.memo:
            self.memo[L] = self.module.descriptor(L)
        return self.memo[L]


def _dropout_seq(seq, mask, dropout):
    b, n = seq.shape[:2]
    keep = max(1, int(n * (1 - dropout)))
    logits = torch.randn(b, n, device=seq.device)
    if mask is not None:
        logits = logits.masked_fill(~mask, -torch.finfo(logits.dtype).max)
    idx = logits.topk(keep, dim=-1).indices
    seq = seq.gather(1, idx[..., None].expand(-1, -1, seq.shape[-1]))
    if mask is not None:
        mask = mask.gather(1, idx)
    return seq, mask


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
