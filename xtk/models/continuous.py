"""Transformers on continuous vectors: ``ContinuousTransformerWrapper`` and its autoregressive wrapper.

Mirrors x-transformers 2.31.10 (``x_transformers/continuous.py``): the same constructor and forward
arguments, the same parameter names (so its checkpoints load), the same return conventions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.norms import LayerNorm
from ..ops import _check
from .autoregressive import check_temperature, decode, eval_mode
from .intermediates import prepend_key_mask, slice_for_cache
from .layers import check_nonempty
from .wrapper import masked_mean, next_mems, position_embedding, prepend_memory_tokens

__all__ = ["ContinuousTransformerWrapper", "ContinuousAutoregressiveWrapper", "GaussianNLL"]


def _float_tensor(name, x, ndim):
    _check.tensor(name, x, ndim=ndim)
    _check.floating(name, x)


def _bool_mask(name, mask, shape):
    _check.tensor(name, mask, ndim=len(shape))
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor (True = keep), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")


def _lens_to_mask(lens, n):
    return torch.arange(n, device=lens.device)[None, :] < lens[:, None]


class ContinuousTransformerWrapper(nn.Module):
    """``attn_layers`` over a sequence of vectors ``(b, n, dim_in)`` -> ``(b, n, dim_out)``.

    ``dim_in``/``dim_out`` add bias-less input/output projections (or give your own modules as
    ``project_in``/``project_out``); without them the vectors must already have the model width.
    ``probabilistic=True`` makes the output ``stack((mean, variance))`` of shape ``(2, b, n, dim_out)``.
    """

    def __init__(
        self,
        *,
        max_seq_len: Optional[int] = None,
        attn_layers: nn.Module,
        dim_in: Optional[int] = None,
        dim_out: Optional[int] = None,
        project_in: Optional[nn.Module] = None,
        project_out: Optional[nn.Module] = None,
        max_mem_len: int = 0,
        num_memory_tokens: Optional[int] = None,
        post_emb_norm: bool = False,
        emb_dropout: float = 0.,
        use_abs_pos_emb: bool = True,
        scaled_sinu_pos_emb: bool = False,
        average_pool_embed: bool = False,
        probabilistic: bool = False,
        use_identity_if_same_dim: bool = False,
    ):
        super().__init__()
        _check_sizes(attn_layers, dim_in, dim_out, project_in, project_out, max_seq_len, max_mem_len)
        dim = attn_layers.dim
        self.max_seq_len, self.max_mem_len, self.dim = max_seq_len, max_mem_len, dim

        self.pos_emb = position_embedding(dim, max_seq_len, attn_layers, use_abs_pos_emb, scaled_sinu_pos_emb)
        self.has_abs_pos_emb = self.pos_emb is not None
        self.post_emb_norm = LayerNorm(dim) if post_emb_norm else nn.Identity()
        self.emb_dropout = nn.Dropout(emb_dropout)

        self.num_memory_tokens = num_memory_tokens or 0
        self.has_memory_tokens = self.num_memory_tokens > 0
        if self.has_memory_tokens:
            self.memory_tokens = nn.Parameter(torch.randn(self.num_memory_tokens, dim))
        self.attn_layers = attn_layers
        self.average_pool_embed = average_pool_embed

        # projections in and out (identity where the widths already match, with use_identity_if_same_dim)
        self.dim_in, self.probabilistic = dim_in, probabilistic
        self.project_in = project_in if project_in is not None else _projection(dim_in, dim, use_identity_if_same_dim)
        dim_out_total = dim_out * (2 if probabilistic else 1) if dim_out is not None else None
        self.project_out = project_out if project_out is not None else \
            _projection(dim, dim_out_total, use_identity_if_same_dim)

        self.can_cache_kv = bool(getattr(attn_layers, "can_cache_kv", False)) and not self.has_memory_tokens
        self.can_cache_kv_outside_max_seq_len = self.pos_emb is None

    def forward(
        self,
        x: torch.Tensor,
        return_embeddings: bool = False,
        return_intermediates: bool = False,
        return_mems: bool = False,
        mask: Optional[torch.Tensor] = None,
        lens: Optional[torch.Tensor] = None,
        return_attn: bool = False,
        mems=None,
        mem_masks=None,
        pos: Optional[torch.Tensor] = None,
        sum_embeds: Optional[torch.Tensor] = None,
        prepend_embeds: Optional[torch.Tensor] = None,
        prepend_mask: Optional[torch.Tensor] = None,
        cache=None,
        seq_start_pos: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        """x ``(b, n, dim_in)``; mask ``(b, n)`` bool or ``lens`` ``(b,)``; with ``cache`` (a
        ``KVCache`` from ``return_intermediates=True``) only the vectors after the cached positions
        are computed. Returns ``(b, n, dim_out)`` (``(2, b, n, dim_out)`` when probabilistic), or
        per the ``return_*`` flags as x-transformers."""
        mask = self._check_inputs(x, mask, lens, prepend_embeds)
        orig_mask = mask
        offset = 0
        if cache is not None:  # only the vectors after the cached positions are embedded and computed
            if not self.can_cache_kv:
                raise ValueError("cache: this model cannot use a KV cache (memory tokens or its attn_layers)")
            prepend_len = prepend_embeds.shape[1] if prepend_embeds is not None else 0
            offset, x, sum_embeds, mask = slice_for_cache(cache, x, prepend_len, mask, prepend_mask, sum_embeds,
                                                          what="vectors")
            prepend_embeds = None  # already in the cache
            kwargs["input_not_include_cache"] = True
        x = self._embed(x, offset, pos, sum_embeds, seq_start_pos)
        if self.has_memory_tokens:
            x, mask = prepend_memory_tokens(self.memory_tokens, x, mask)
        if prepend_embeds is not None:
            x, mask = self._prepend(x, mask, prepend_embeds, prepend_mask)
        x = self.emb_dropout(x)

        layer_kwargs = dict(kwargs)
        for name, val in (("seq_start_pos", seq_start_pos), ("pos", pos), ("return_attn", True if return_attn else None)):
            if val is not None:
                layer_kwargs[name] = val
        x, intermediates = self.attn_layers(x, mask=mask, mems=mems, mem_masks=mem_masks, cache=cache,
                                            return_hiddens=True, **layer_kwargs)
        return self._outputs(x, intermediates, orig_mask, mems, return_embeddings, return_intermediates,
                             return_mems, return_attn)

    def _check_inputs(self, x, mask, lens, prepend_embeds):
        """Checks ``x`` ``(b, n, dim_in)`` and its ``mask`` ``(b, n)`` / ``lens`` ``(b,)``; returns the mask."""
        _float_tensor("x", x, 3)
        if prepend_embeds is None:  # (prepended embeddings alone are a sequence)
            check_nonempty("x", x, "vector")
        b, n = x.shape[:2]
        if self.dim_in is not None and x.shape[-1] != self.dim_in:
            raise ValueError(f"x: expected last dimension {self.dim_in} (dim_in), got shape {tuple(x.shape)}")
        if self.has_abs_pos_emb and n > self.max_seq_len:
            raise ValueError(f"x: sequence length {n} exceeds max_seq_len {self.max_seq_len} "
                             f"(absolute positional embedding)")
        if lens is not None:
            if mask is not None:
                raise ValueError("mask, lens: expected at most one of them, got both")
            _check.tensor("lens", lens, ndim=1)
            mask = _lens_to_mask(lens, n)
        if mask is not None:
            _bool_mask("mask", mask, (b, n))
        return mask

    def _embed(self, x, offset: int, pos, sum_embeds, seq_start_pos):
        """``x`` ``(b, n, dim_in)`` -> ``(b, n, dim)``: projected, plus the positions from ``offset`` and
        ``sum_embeds``, post-embedding norm."""
        x = self.project_in(x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected vectors of the model width {self.dim} (or set dim_in), got shape "
                             f"{tuple(x.shape)} after project_in")
        if self.pos_emb is not None:
            if pos is not None:
                raise ValueError("pos: custom positions are not supported with the absolute positional embedding")
            x = x + self.pos_emb(x.shape[1], offset, device=x.device, seq_start_pos=seq_start_pos).to(x.dtype)
        if sum_embeds is not None:
            x = x + sum_embeds
        return self.post_emb_norm(x)

    @staticmethod
    def _prepend(x, mask, prepend_embeds, prepend_mask):
        """``prepend_embeds`` ``(b, m, dim)`` before ``x`` ``(b, n, dim)``; the key mask extended alike."""
        _float_tensor("prepend_embeds", prepend_embeds, 3)
        b = x.shape[0]
        if prepend_embeds.shape[0] != b or prepend_embeds.shape[-1] != x.shape[-1]:
            raise ValueError(f"prepend_embeds: expected shape ({b}, m, {x.shape[-1]}), got {tuple(prepend_embeds.shape)}")
        mask = prepend_key_mask(mask, prepend_mask, b, x.shape[1], prepend_embeds.shape[1], x.device)
        return torch.cat((prepend_embeds, x), dim=1), mask

    def _outputs(self, x, intermediates, orig_mask, mems, return_embeddings, return_intermediates, return_mems,
                 return_attn):
        """What ``forward`` returns from the stack's output ``x`` ``(b, [memory tokens +] n, dim)``."""
        if self.has_memory_tokens:
            intermediates.memory_tokens = x[:, :self.num_memory_tokens]
            x = x[:, self.num_memory_tokens:]
        if self.average_pool_embed:
            x = x.mean(dim=1) if orig_mask is None else masked_mean(x, orig_mask)
        out = x if return_embeddings else self.project_out(x)
        if not return_embeddings and self.probabilistic:
            mean, log_var = out.unflatten(-1, (-1, 2)).unbind(-1)
            out = torch.stack((mean, log_var.exp()))
        if return_intermediates:
            return out, intermediates
        if return_mems:
            # as TransformerWrapper: the previous memories followed by this segment's layer inputs, the
            # last max_mem_len kept (x-transformers' continuous wrapper drops the previous memories,
            # which only differs when max_mem_len exceeds the segment length)
            return out, tuple(t.detach() for t in next_mems(mems, intermediates.hiddens, self.max_mem_len))
        if return_attn:
            return out, tuple(t.post_softmax_attn for t in intermediates.attn_intermediates)
        return out


def _projection(d_from: Optional[int], d_to: Optional[int], use_identity_if_same_dim: bool) -> nn.Module:
    """A bias-less ``Linear(d_from, d_to)``; Identity when either width is None (no projection asked
    for) or, with ``use_identity_if_same_dim``, when they are equal."""
    if d_from is None or d_to is None or (use_identity_if_same_dim and d_from == d_to):
        return nn.Identity()
    return nn.Linear(d_from, d_to, bias=False)


def _check_sizes(attn_layers, dim_in, dim_out, project_in, project_out, max_seq_len, max_mem_len) -> None:
    if not isinstance(attn_layers, nn.Module) or not hasattr(attn_layers, "dim"):
        raise TypeError(f"attn_layers: expected an Encoder/Decoder (AttentionLayers) module, got {type(attn_layers).__name__}")
    if dim_in is not None and project_in is not None:
        raise ValueError("dim_in, project_in: expected at most one of them, got both")
    if dim_out is not None and project_out is not None:
        raise ValueError("dim_out, project_out: expected at most one of them, got both")
    for name, val in (("dim_in", dim_in), ("dim_out", dim_out)):
        if val is not None:
            _check.integer(name, val, minimum=1)
    if max_seq_len is not None:
        _check.integer("max_seq_len", max_seq_len, minimum=0)
    _check.integer("max_mem_len", max_mem_len, minimum=0)


class GaussianNLL(nn.Module):
    """Per-element Gaussian negative log likelihood of ``target`` under ``(mean, variance)``."""

    def forward(self, pred, target):
        mean, var = pred
        return F.gaussian_nll_loss(mean, target, var, reduction="none")


class ContinuousAutoregressiveWrapper(nn.Module):
    """Next-vector training (MSE by default, L1 with ``use_l1_loss``, Gaussian NLL when the
    network is probabilistic) and generation for a ``ContinuousTransformerWrapper``."""

    def __init__(self, net: ContinuousTransformerWrapper, loss_fn: Optional[nn.Module] = None,
                 use_l1_loss: bool = False, equal_loss_weight_batch: bool = False):
        super().__init__()
        if not isinstance(net, nn.Module) or not hasattr(net, "max_seq_len"):
            raise TypeError(f"net: expected a ContinuousTransformerWrapper, got {type(net).__name__}")
        self.net = net
        self.max_seq_len = net.max_seq_len
        self.probabilistic = bool(getattr(net, "probabilistic", False))
        if loss_fn is None:
            if self.probabilistic:
                loss_fn = GaussianNLL()
            elif use_l1_loss:
                loss_fn = nn.L1Loss(reduction="none")
            else:
                loss_fn = nn.MSELoss(reduction="none")
        self.loss_fn = loss_fn
        self.equal_loss_weight_batch = equal_loss_weight_batch

    @torch.no_grad()
    def generate(self, start_tokens: torch.Tensor, seq_len: int, temperature: float = 1., cache_kv: bool = True,
                 **kwargs):
        """Continue ``start_tokens`` (``(b, n, d)`` or ``(n, d)``) by ``seq_len`` vectors; returns the new
        ones, ``(b, seq_len, d)`` or ``(seq_len, d)``. A probabilistic network samples with
        ``temperature`` scaling the standard deviation; otherwise the prediction is used as is.
        ``mask`` (in kwargs): a ``(b, n)`` key mask of ``start_tokens``, extended with True for new vectors."""
        seq_len = _check.integer("seq_len", seq_len, minimum=1)
        _float_tensor("start_tokens", start_tokens, (2, 3))
        check_temperature(temperature)
        no_batch = start_tokens.dim() == 2
        if no_batch:
            start_tokens = start_tokens[None]
        b, t, _ = start_tokens.shape
        if t < 1:
            raise ValueError(f"start_tokens: expected at least one vector, got shape {tuple(start_tokens.shape)}")
        mask = kwargs.pop("mask", None)
        if mask is not None:
            _bool_mask("mask", mask, (b, t))
        with eval_mode(self.net):
            out, _ = decode(self.net, start_tokens, seq_len, mask=mask, kwargs=kwargs, max_seq_len=self.max_seq_len,
                            cache_kv=cache_kv, next_from=lambda x, net_out: self._next_vector(net_out, temperature))
        out = out[:, t:]
        return out[0] if no_batch else out

    def _next_vector(self, net_out, temperature: float) -> torch.Tensor:
        """The next vector ``(b, 1, d)`` from the network's output for the window: the last prediction,
        or with a probabilistic network a draw from ``N(mean, var)`` with the std scaled by ``temperature``."""
        last = net_out[..., -1:, :]
        if not self.probabilistic:
            return last
        mean, var = last
        return torch.normal(mean, var.clamp(min=1e-5).sqrt() * temperature)

    def forward(self, x: torch.Tensor, rollout_steps: int = 1, **kwargs):
        """Mean loss of predicting ``x[:, 1:]`` from ``x[:, :-1]``; ``mask``/``lens`` select the
        positions that count (``mask`` may cover ``x`` or the input ``x[:, :-1]``)."""
        if rollout_steps != 1:
            raise ValueError(f"rollout_steps: xtk supports 1 (plain next-vector loss), got {rollout_steps!r}")
        _float_tensor("x", x, 3)
        if x.shape[1] < 2:
            raise ValueError(f"x: expected at least 2 vectors per row (an input and a target), got shape {tuple(x.shape)}")
        if "prepend_embeds" in kwargs:
            raise ValueError("prepend_embeds: not supported by ContinuousAutoregressiveWrapper (as in x-transformers)")
        inp, target = x[:, :-1], x[:, 1:]

        lens = kwargs.pop("lens", None)
        if lens is not None:
            if "mask" in kwargs:
                raise ValueError("mask, lens: expected at most one of them, got both")
            kwargs["mask"] = _lens_to_mask(lens, inp.shape[1])
        mask = kwargs.get("mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] == x.shape[1]:
            mask = mask[:, :-1]
            kwargs["mask"] = mask

        out = self.net(inp, **kwargs)
        pred_shape = tuple(out[0].shape if self.probabilistic else out.shape)
        if pred_shape != tuple(target.shape):
            raise ValueError(f"net: expected predictions shaped like the targets {tuple(target.shape)} "
                             f"(dim_out == dim_in), got {pred_shape}")
        loss = self.loss_fn(out, target)

        if mask is not None:
            if loss.dim() < 2:
                raise ValueError("loss_fn: expected an unreduced (per element) loss when a mask is given, got a scalar")
            if self.equal_loss_weight_batch:
                per = loss.masked_fill(~mask[..., None], 0.).sum(dim=(1, 2))
                loss = per / mask.sum(dim=-1).clamp(min=1.)
            else:
                loss = loss[mask]
        return loss.mean()
