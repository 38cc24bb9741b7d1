"""TransformerWrapper: token embedding, positions, memory tokens, Transformer-XL memories,
KV cache, logits — x-transformers 2.31's kwargs, parameter names and return conventions."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.norms import LayerNorm
from ..modules.positional import AbsolutePositionalEmbedding, ScaledSinusoidalEmbedding
from .intermediates import LayerIntermediates, prepend_key_mask, slice_for_cache
from .layers import AttentionLayers, check_nonempty


def _check_token_ids(x, num_tokens):
    """Token ids in [0, num_tokens). On CPU the error names the values found; on accelerators the
    check is an async device assert, so a decoding loop does not pay a host sync per step."""
    if not x.numel():
        return
    compiling = getattr(torch, "compiler", None) is not None and torch.compiler.is_compiling()
    if x.device.type == "cpu" and not compiling:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"x: token ids must be in [0, {num_tokens}) (num_tokens), got values in [{lo}, {hi}]")
        return
    ok = ((x >= 0) & (x < num_tokens)).all()
    try:
        torch._assert_async(ok, f"x: token ids must be in [0, {num_tokens}) (num_tokens)")
    except TypeError:
        torch._assert_async(ok)


def position_embedding(dim: int, max_seq_len, attn_layers: nn.Module, use_abs_pos_emb: bool,
                       scaled_sinu_pos_emb: bool, l2norm_embed: bool = False) -> Optional[nn.Module]:
    """A wrapper's absolute positional embedding: scaled sinusoidal or learned (``l2norm_embed``:
    l2-normalized, init std 1e-5); None without ``max_seq_len``, with ``use_abs_pos_emb=False``, or
    when ``attn_layers`` has relative positions (``disable_abs_pos_emb``)."""
    if not max_seq_len or not use_abs_pos_emb or getattr(attn_layers, "disable_abs_pos_emb", False):
        return None
    if scaled_sinu_pos_emb:
        return ScaledSinusoidalEmbedding(dim)
    pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len, l2norm_embed=l2norm_embed)
    if l2norm_embed:
        nn.init.normal_(pos_emb.emb.weight, std=1e-5)
    return pos_emb


class TokenEmbedding(nn.Module):
    """``nn.Embedding`` (key ``emb.weight``), l2-normalized with ``l2norm_embed``."""

    def __init__(self, dim, num_tokens, l2norm_embed=False):
        super().__init__()
        self.l2norm_embed = l2norm_embed
        self.emb = nn.Embedding(num_tokens, dim)
        if l2norm_embed:
            nn.init.normal_(self.emb.weight, std=1e-5)
        else:
            nn.init.kaiming_normal_(self.emb.weight)

    def forward(self, x):
        t = self.emb(x.long())
        return F.normalize(t, dim=-1) if self.l2norm_embed else t


class TransformerWrapper(nn.Module):
    """Token model around an ``AttentionLayers`` (``Encoder``, ``Decoder``, ...)."""

    def __init__(self, *, num_tokens, max_seq_len, attn_layers: AttentionLayers, emb_dim=None, max_mem_len=0,
                 shift_mem_down=0, emb_dropout=0.0, post_emb_norm=False, num_memory_tokens=None, tie_embedding=False,
                 tie_embedding_scale=None, logits_dim=None, return_only_embed=False, use_abs_pos_emb=True,
                 scaled_sinu_pos_emb=False, l2norm_embed=False, emb_frac_gradient=1.0, average_pool_embed=False):
        super().__init__()
        if not isinstance(attn_layers, AttentionLayers):
            raise TypeError(f"attn_layers: expected an xtk AttentionLayers (Encoder, Decoder, ...), got {type(attn_layers).__name__}")
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens: expected a positive int, got {num_tokens!r}")
        if not isinstance(max_seq_len, int) or max_seq_len < 0:
            raise ValueError(f"max_seq_len: expected an int >= 0, got {max_seq_len!r}")
        if not 0 < emb_frac_gradient <= 1:
            raise ValueError(f"emb_frac_gradient: expected a float in (0, 1], got {emb_frac_gradient}")
        dim = attn_layers.dim
        emb_dim = dim if emb_dim is None else emb_dim
        self.emb_dim, self.num_tokens = emb_dim, num_tokens
        self.max_seq_len, self.max_mem_len, self.shift_mem_down = max_seq_len, max_mem_len, shift_mem_down
        self.l2norm_embed = l2norm_embed
        self.token_emb = TokenEmbedding(emb_dim, num_tokens, l2norm_embed=l2norm_embed)
        self.pos_emb = position_embedding(emb_dim, max_seq_len, attn_layers, use_abs_pos_emb, scaled_sinu_pos_emb,
                                          l2norm_embed)
        self.emb_frac_gradient = emb_frac_gradient
        self.post_emb_norm = LayerNorm(emb_dim) if post_emb_norm else nn.Identity()
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers
        self.average_pool_embed = average_pool_embed
        logits_dim = num_tokens if logits_dim is None else logits_dim
        self.tie_embedding = tie_embedding
        if return_only_embed:
            self.to_logits = None
        elif tie_embedding:
            self.tie_embedding_scale = dim ** -0.5 if tie_embedding_scale is None else tie_embedding_scale
            self.to_logits = None
        else:
            self.to_logits = nn.Linear(dim, logits_dim, bias=False)
        self.return_only_embed = return_only_embed
        num_memory_tokens = num_memory_tokens or 0
        self.num_memory_tokens = num_memory_tokens
        if num_memory_tokens > 0:
            self.memory_tokens = nn.Parameter(torch.randn(num_memory_tokens, dim))
        self.can_cache_kv = num_memory_tokens == 0 and attn_layers.can_cache_kv
        self.can_cache_kv_outside_max_seq_len = self.pos_emb is None

    def _logits(self, x):
        if self.tie_embedding:
            return (x @ self.token_emb.emb.weight.t()) * self.tie_embedding_scale
        return self.to_logits(x)

    def forward(self, x, return_embeddings=False, return_logits_and_embeddings=False, return_intermediates=False,
                mask=None, return_mems=False, return_attn=False, mems=None, mem_masks=None, pos=None,
                prepend_embeds=None, prepend_mask=None, sum_embeds=None, return_attn_z_loss=False,
                seq_start_pos=None, cache: Optional[LayerIntermediates] = None, detach_mems=True,
                return_embeddings_and_intermediates=False, **kwargs):
        """x ``(b, n)`` token ids. With ``cache`` (a ``KVCache``, from a previous
        ``return_intermediates=True`` call) only the tokens after the cached positions are computed;
        the outputs cover those. Returns logits ``(b, n, logits_dim)``, or per the ``return_*`` flags:
        ``return_embeddings`` -> embeddings; ``return_logits_and_embeddings`` -> (logits, embeddings);
        ``return_mems`` -> (out, mems); ``return_intermediates`` -> (out, LayerIntermediates);
        ``return_attn`` -> (out, [post-softmax attention per layer])."""
        self._check_inputs(x, mask, prepend_embeds, return_attn_z_loss, pos)
        b, n = x.shape
        return_embeddings = return_embeddings or self.to_logits is None and not self.tie_embedding \
            or return_embeddings_and_intermediates
        offset, prepend_len = 0, prepend_embeds.shape[1] if prepend_embeds is not None else 0
        if cache is not None:  # only the tokens after the cached positions are embedded and computed
            if not self.can_cache_kv:
                raise ValueError("cache: this model cannot use a KV cache (memory tokens or token shift)")
            offset, x, sum_embeds, mask = slice_for_cache(cache, x, prepend_len, mask, prepend_mask, sum_embeds,
                                                          what="tokens")
            prepend_embeds = None
        if self.pos_emb is not None and isinstance(self.pos_emb, AbsolutePositionalEmbedding) and n > self.max_seq_len:
            raise ValueError(f"x: sequence length {n} exceeds max_seq_len {self.max_seq_len} "
                             f"(absolute positional embedding); expected at most {self.max_seq_len} tokens")
        h = self._embed(x, offset, seq_start_pos, sum_embeds)
        if prepend_embeds is not None:
            if prepend_embeds.dim() != 3 or prepend_embeds.shape[0] != b or prepend_embeds.shape[-1] != h.shape[-1]:
                raise ValueError(f"prepend_embeds: expected shape ({b}, m, {h.shape[-1]}), got {tuple(prepend_embeds.shape)}")
            h = torch.cat((prepend_embeds.to(h.dtype), h), dim=-2)
            mask = prepend_key_mask(mask, prepend_mask, b, n, prepend_len, x.device)
        h, init_embed = self._into_stack(h)
        num_mems, seq = self.num_memory_tokens, h.shape[-2]
        if num_mems > 0:
            h, mask = prepend_memory_tokens(self.memory_tokens.to(h.dtype), h, mask)
        if self.shift_mem_down and mems is not None:
            mems = [*mems[self.shift_mem_down:], *mems[:self.shift_mem_down]]
        x, inter = self.attn_layers(h, mask=mask, mems=mems, mem_masks=mem_masks, cache=cache,
                                    input_not_include_cache=True, seq_start_pos=seq_start_pos,
                                    return_hiddens=True, return_attn=return_attn, **kwargs)
        if num_mems > 0:
            inter.memory_tokens = x[:, :num_mems]
            x = x[:, num_mems:num_mems + seq]
        inter.last_layer_hiddens, inter.initial_embeds = x, init_embed
        if self.average_pool_embed:
            x = x.mean(dim=1) if mask is None else masked_mean(x, mask[:, -x.shape[1]:])
        return self._outputs(x, inter, mems, return_embeddings, return_logits_and_embeddings, return_intermediates,
                             return_mems, return_attn, detach_mems, return_embeddings_and_intermediates)

    def _check_inputs(self, x, mask, prepend_embeds, return_attn_z_loss, pos) -> None:
        """Token ids ``x`` ``(b, n)`` in range, ``mask`` None or bool ``(b, n)``; the options xtk lacks."""
        if return_attn_z_loss:
            raise NotImplementedError("return_attn_z_loss: not supported by xtk (needs every attention matrix)")
        if pos is not None:
            raise NotImplementedError("pos: custom positions are not supported by xtk's TransformerWrapper")
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"x: expected a (batch, seq) tensor of token ids, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"x: expected integer token ids, got dtype {x.dtype}")
        _check_token_ids(x, self.num_tokens)
        if prepend_embeds is None:  # (prepended embeddings alone are a sequence)
            check_nonempty("x", x, "token")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask: expected a bool tensor (True = keep), got "
                                f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
            if tuple(mask.shape) != tuple(x.shape):
                raise ValueError(f"mask: expected shape {tuple(x.shape)} (x's), got {tuple(mask.shape)}")

    def _embed(self, x, offset: int, seq_start_pos, sum_embeds, pos=None):
        """Token ids ``x`` ``(b, n)`` -> ``(b, n, emb_dim)``: token embedding, the positions from
        ``offset`` (or the device positions ``pos`` ``(b, n)``), ``sum_embeds``, post-embedding norm."""
        h = self.token_emb(x)
        if self.pos_emb is not None:
            h = h + self.pos_emb(x.shape[1], offset, x.device, seq_start_pos, pos=pos).to(h.dtype)
        if sum_embeds is not None:
            h = h + sum_embeds
        return self.post_emb_norm(h)

    def _into_stack(self, h):
        """Embeddings ``(b, n, emb_dim)`` -> ``(the stack's input (b, n, dim), initial embeddings)``:
        the gradient fraction (``emb_frac_gradient``), dropout, the projection to ``dim``."""
        if self.emb_frac_gradient < 1:
            h = h * self.emb_frac_gradient + h.detach() * (1 - self.emb_frac_gradient)
        return self.project_emb(self.emb_dropout(h)), h

    def static_step(self, token, pos, layer_caches: list):
        """One decode step with fixed shapes and no host reads (``xtk.models.static_decode``): the
        last token ``(b, 1)`` at device positions ``pos`` ``(b, 1)`` through the embedding, the stack
        (``AttentionLayers.static_step``, a ``StaticKV`` per attention layer) and the logits ->
        ``(b, logits_dim)``."""
        h, _ = self._into_stack(self._embed(token, 0, None, None, pos=pos))
        x = self.attn_layers.static_step(h, layer_caches)
        return self._logits(x)[:, -1]

    def _outputs(self, x, inter, mems, return_embeddings, return_logits_and_embeddings, return_intermediates,
                 return_mems, return_attn, detach_mems, return_embeddings_and_intermediates):
        """What ``forward`` returns from the embeddings ``x`` ``(b, n, dim)`` (pooled: ``(b, dim)``)."""
        logits = None if return_embeddings else self._logits(x)
        if return_logits_and_embeddings:
            out = (logits, x)
        else:
            out = x if return_embeddings else logits
        if return_embeddings_and_intermediates:
            return x, inter
        if return_mems:
            new_mems = next_mems(mems, inter.hiddens, self.max_mem_len)
            if detach_mems:
                new_mems = [t.detach() for t in new_mems]
            if not return_intermediates:
                return out, new_mems
            inter.mems = new_mems
        if return_intermediates:
            return out, inter
        if return_attn:
            return out, [t.post_softmax_attn for t in inter.attn_intermediates]
        return out


def prepend_memory_tokens(tokens: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor]):
    """Memory tokens ``(m, dim)`` before every row of ``x`` ``(b, n, dim)``; the key mask ``(b, n)``
    (if any) extended with True for them. Returns ``(x (b, m + n, dim), mask)``."""
    x = torch.cat((tokens[None].expand(x.shape[0], -1, -1), x), dim=1)
    if mask is not None:
        mask = F.pad(mask, (tokens.shape[0], 0), value=True)
    return x, mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``(b, n, dim)`` over the positions ``mask`` ``(b, n)`` keeps -> ``(b, dim)``."""
    w = mask[..., None].to(x.dtype)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.)


def next_mems(mems, hiddens: list, max_mem_len: int) -> list:
    """Transformer-XL memories for the next segment, one per self-attention layer: the previous
    memories (if any) followed by this segment's layer inputs ``hiddens``, the last ``max_mem_len``
    positions kept (none when 0)."""
    new_mems = [torch.cat(pair, dim=-2) for pair in zip(mems, hiddens)] if mems is not None else hiddens
    return [t[..., -max_mem_len:, :] if max_mem_len > 0 else t[..., :0, :] for t in new_mems]
