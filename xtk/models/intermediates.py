"""What the model stack returns besides its output: per-attention-layer intermediates and the
KV cache, named as in x-transformers 2.31 (``Intermediates``, ``LayerIntermediates``).

KV cache, how to use it (this is what ``AutoregressiveWrapper.generate`` does)::

    logits, cache = net(x, return_intermediates=True)             # prompt: full forward
    x = torch.cat((x, next_token), dim=-1)
    logits, cache = net(x, return_intermediates=True, cache=cache)
    # `x` is the WHOLE sequence so far; only the tokens after `cache.cache_length`
    # (here the one new token) are embedded and run through the layers, each attending to
    # the cached keys/values: a new token costs O(n), not a full re-run. `logits` then
    # cover only those new tokens (shape (b, n_new, num_tokens)).

``cache`` is a ``LayerIntermediates``; ``cache.attn_intermediates[l].cached_kv`` is the
``(k, v)`` pair ``(b, kv_heads, n, dim_head)`` of attention layer ``l`` (self and cross
attention, in layer order; keys before QK-norm and rotary, which are applied per call;
no memory key/values, no Transformer-XL memories). To keep the cache bounded (e.g. to
``max_seq_len - 1`` positions), slice every ``cached_kv`` on dim -2 and pass only the last
``max_seq_len`` tokens: the number of new tokens is ``x.shape[1] - cached length``. To grow
the batch (beam search), index every cached tensor on dim 0. ``cache_length`` counts every
position seen so far (it keeps growing after slicing, for positions).
"""
from __future__ import annotations

from copy import copy
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Intermediates:
    """One attention layer's extras: ``cached_kv`` (k, v) for the KV cache; ``pre_softmax_attn``
    (masked logits, recorded only when a feature needs it, e.g. residual attention);
    ``post_softmax_attn`` (recorded with ``return_attn``); ``layer_type`` 'a' or 'c'."""

    qk_similarities: Optional[Tensor] = None
    pre_softmax_attn: Optional[Tensor] = None
    post_softmax_attn: Optional[Tensor] = None
    cached_kv: Optional[tuple] = None
    layer_type: Optional[str] = None

    def to_tuple(self):
        return (self.qk_similarities, self.pre_softmax_attn, self.post_softmax_attn)


@dataclass
class LayerIntermediates:
    """What ``AttentionLayers(..., return_hiddens=True)`` and
    ``TransformerWrapper(..., return_intermediates=True)`` return next to the output.

    hiddens: the input of every self-attention layer (Transformer-XL memories are built from them);
    last_hidden: the output after the final norm; attn_intermediates: one ``Intermediates`` per
    attention layer (the KV cache); mems: the new memories (``return_mems``); memory_tokens:
    the memory-token outputs; cache_length: positions seen so far (see the module docstring)."""

    hiddens: Optional[list] = None
    last_hidden: Optional[Tensor] = None
    attn_intermediates: Optional[list] = None
    layer_hiddens: Optional[list] = None
    attn_z_loss: Optional[Tensor] = None
    mems: Optional[list] = None
    last_layer_hiddens: Optional[Tensor] = None
    initial_embeds: Optional[Tensor] = None
    memory_tokens: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    cache_length: int = 0

    def __copy__(self):
        out = replace(self)
        if self.attn_intermediates is not None:
            out.attn_intermediates = [copy(i) for i in self.attn_intermediates]
        return out

    @property
    def cached_length(self) -> int:
        """Keys held by the cache (the length of the first layer's cached k), 0 if none."""
        for inter in self.attn_intermediates or []:
            if inter is not None and inter.cached_kv is not None and inter.layer_type != "c":
                return inter.cached_kv[0].shape[-2]
        return self.cache_length


def prepend_key_mask(mask: Optional[Tensor], prepend_mask: Optional[Tensor], b: int, n: int,
                     prepend_len: int, device) -> Optional[Tensor]:
    """The bool key mask ``(b, prepend_len + n)`` of a sequence of ``n`` positions with
    ``prepend_len`` embeddings prepended: ``prepend_mask`` ``(b, prepend_len)`` then ``mask``
    ``(b, n)`` (True = keep), a missing one all True; None when both are None."""
    if mask is None and prepend_mask is None:
        return None
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=device)
    if prepend_mask is None:
        prepend_mask = torch.ones(b, prepend_len, dtype=torch.bool, device=device)
    return torch.cat((prepend_mask, mask), dim=-1)


def slice_for_cache(cache: LayerIntermediates, x: Tensor, prepend_len: int, mask: Optional[Tensor] = None,
                    prepend_mask: Optional[Tensor] = None, sum_embeds: Optional[Tensor] = None,
                    what: str = "tokens"):
    """The part of the input a cached step still has to run (see the module docstring).

    ``x`` ``(b, n, ...)`` is the whole sequence so far, after ``prepend_len`` prepended embeddings
    that the cache already holds (``cache.cached_length`` counts them). Only the last
    ``n_new = n + prepend_len - cache.cached_length`` positions are new; ``1 <= n_new <= n`` or a
    ValueError (``what`` names x's items in it). Returns ``(offset, x[:, offset:],
    sum_embeds[:, offset:], mask)`` with ``offset = n - n_new`` (the position of the first new
    one, for positional embeddings) and ``mask`` still over all the keys: with prepended
    embeddings ``prepend_key_mask(...)`` ``(b, prepend_len + n)``, else unchanged ``(b, n)``."""
    b, n = x.shape[:2]
    cached = cache.cached_length
    n_new = n + prepend_len - cached
    if not 1 <= n_new <= n:
        raise ValueError(f"x: with a cache of {cached} positions expected more than {cached - prepend_len} "
                         f"{what}, got {n}")
    offset = n - n_new
    if sum_embeds is not None:
        sum_embeds = sum_embeds[:, offset:]
    if prepend_len:  # the keys still start with them
        mask = prepend_key_mask(mask, prepend_mask, b, n, prepend_len, x.device)
    return offset, x[:, offset:], sum_embeds, mask
