"""What the model stack returns besides its output: per-attention-layer intermediates and the
KV cache, named as in x-transformers 2.31 (``Intermediates``, ``LayerIntermediates``).

``LayerIntermediates`` is a ``KVCache`` (``xtk.models.cache`` says how to use the cache and what
it holds): the intermediates of one call are the cache of the next.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .cache import KVCache


@dataclass
class Intermediates:
    """One attention layer's extras: ``cached_kv`` (k, v) for the KV cache; ``pre_softmax_attn``
    (masked logits, recorded only when a feature needs it, e.g. residual attention);
    ``post_softmax_attn`` (recorded with ``return_attn``); ``layer_type`` 'a' or 'c'."""

    pre_softmax_attn: Optional[Tensor] = None
    post_softmax_attn: Optional[Tensor] = None
    cached_kv: Optional[tuple] = None
    layer_type: Optional[str] = None


@dataclass(kw_only=True)
class LayerIntermediates(KVCache):
    """What ``AttentionLayers(..., return_hiddens=True)`` and
    ``TransformerWrapper(..., return_intermediates=True)`` return next to the output: the KV cache
    (``attn_intermediates``: one ``Intermediates`` per attention layer; ``cache_length``: positions
    seen so far) and

    hiddens: the input of every self-attention layer (Transformer-XL memories are built from them);
    last_hidden: the output after the final norm; mems: the new memories (``return_mems``);
    last_layer_hiddens: the wrapper's embeddings of its own positions, before pooling and logits;
    initial_embeds: the token (and position) embeddings that entered the stack; memory_tokens:
    the memory-token outputs."""

    hiddens: Optional[list] = None
    last_hidden: Optional[Tensor] = None
    mems: Optional[list] = None
    last_layer_hiddens: Optional[Tensor] = None
    initial_embeds: Optional[Tensor] = None
    memory_tokens: Optional[Tensor] = None


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


def slice_for_cache(cache: KVCache, x: Tensor, prepend_len: int, mask: Optional[Tensor] = None,
                    prepend_mask: Optional[Tensor] = None, sum_embeds: Optional[Tensor] = None,
                    what: str = "tokens"):
    """The part of the input a cached step still has to run.

    ``x`` ``(b, n, ...)`` is the whole sequence so far, after ``prepend_len`` prepended embeddings
    that the cache already holds; ``offset = cache.first_new_position(n, prepend_len, what)`` is
    the position in ``x`` of the first new one. Returns ``(offset, x[:, offset:],
    sum_embeds[:, offset:], mask)`` with ``mask`` still over all the keys: with prepended
    embeddings ``prepend_key_mask(...)`` ``(b, prepend_len + n)``, else unchanged ``(b, n)``."""
    b, n = x.shape[:2]
    offset = cache.first_new_position(n, prepend_len, what)
    if sum_embeds is not None:
        sum_embeds = sum_embeds[:, offset:]
    if prepend_len:  # the keys still start with them
        mask = prepend_key_mask(mask, prepend_mask, b, n, prepend_len, x.device)
    return offset, x[:, offset:], sum_embeds, mask
