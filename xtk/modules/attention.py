"""The Attention module: x-transformers' parameters and semantics, computed by ``xtk.attention``.

Position bias goes in as descriptors (``xtk.bias.*``), QK-norm as ``xtk.QKNorm``, rotary as
``xtk.Rotary``, top-k as ``topk=``; memory key/values are the ``k_prefix`` keys. Features that
need the whole score matrix (talking heads, residual attention, entmax15) pass ``ScoreHooks`` and
say so in ``full_matrix_reason``.

GQA head order (SPEC §2.1): x-transformers' query head ``h`` reads kv head ``h % hk``; the module
calls ``xtk.attention`` with ``gqa_order='repeat'``, so every head and every per-head input (bias
tables, QK-norm scales, talking-heads weights, attention maps) stays in x-transformers' order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import attention as xattention
from ..qk import QKNorm
from ..reference.attention import ScoreHooks
from ..models.cache import StaticKV, extend_kv
from ..ops.attention_kvcache import attention_with_kvcache
from ..models.intermediates import Intermediates


class _Entmax15(torch.autograd.Function):
    """1.5-entmax over the last dim (Peters et al. 2019, sort-based exact threshold)."""

    @staticmethod
    def forward(ctx, x):
        z = (x - x.amax(dim=-1, keepdim=True)) / 2
        z = z.clamp(min=-2.0)  # entries below max-2 are outside the support (tau >= max-1): same output, no overflow
        zs, _ = z.sort(dim=-1, descending=True)
        rho = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
        mean = zs.cumsum(-1) / rho
        mean_sq = (zs ** 2).cumsum(-1) / rho
        ss = rho * (mean_sq - mean ** 2)
        delta = ((1 - ss) / rho).clamp(min=0)
        tau = mean - delta.sqrt()
        support = (tau <= zs).sum(dim=-1, keepdim=True)
        tau_star = tau.gather(-1, support - 1)
        y = (z - tau_star).clamp(min=0) ** 2
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        g = y.sqrt()
        dx = dy * g
        q = dx.sum(-1, keepdim=True) / g.sum(-1, keepdim=True)
        return dx - q * g


def entmax15(x: torch.Tensor) -> torch.Tensor:
    return _Entmax15.apply(x)


class Attention(nn.Module):
    """Multi-head (self or cross) attention with x-transformers 2.31's kwargs and parameter names."""

    def __init__(self, dim, dim_head=64, heads=8, causal=False, dim_context=None, dim_out=None, value_dim_head=None,
                 dropout=0.0, kv_heads=None, one_kv_head=False, num_mem_kv=0, sparse_topk=None,
                 qk_norm=False, qk_norm_groups=1, qk_norm_scale=10, qk_norm_dim_scale=False,
                 on_attn=False, gate_values=False, head_scale=False, talking_heads=False,
                 pre_talking_heads=False, post_talking_heads=False, use_entmax15=False,
                 collab_heads=False, collab_compression=0.3, zero_init_output=False, flash=False):
        super().__init__()
        kv_heads = _checked_kv_heads(dim_head, heads, kv_heads, one_kv_head, sparse_topk, qk_norm, qk_norm_groups,
                                     dropout, collab_heads)
        dim_kv = dim if dim_context is None else dim_context
        value_dim_head = dim_head if value_dim_head is None else value_dim_head
        dim_out = dim if dim_out is None else dim_out
        self.dim, self.dim_kv = dim, dim_kv
        self.heads, self.kv_heads, self.dim_head, self.value_dim_head = heads, kv_heads, dim_head, value_dim_head
        self.causal = causal
        self.scale = dim_head ** -0.5
        self.dropout = dropout
        self.sparse_topk = sparse_topk
        self.collab_heads = collab_heads
        # parameters are created in a fixed order: seeded initialization and state_dict order depend on it
        out_dim = self._init_projections(collab_compression, gate_values)
        self._init_head_features(qk_norm, qk_norm_groups, qk_norm_scale, qk_norm_dim_scale, head_scale, num_mem_kv)
        self._init_talking_heads(talking_heads, pre_talking_heads, post_talking_heads, use_entmax15)
        self._init_output(out_dim, dim_out, on_attn, zero_init_output)
        # set by AttentionLayers: residual attention needs this layer's masked logits
        self.record_pre_softmax = False
        self.can_cache_kv = True

    def _init_projections(self, collab_compression: float, gate_values: bool) -> int:
        """``to_q`` (dim -> qk_dim), ``to_k`` (dim_kv -> qk_dim with collaborative heads, else
        dim_head * kv_heads), ``to_v`` (dim_kv -> value_dim_head * kv_heads), ``collab_mixing``
        ``(heads, qk_dim)`` with collaborative heads, ``to_v_gate`` (dim -> out_dim, zero-init) or
        None. All linear maps without bias. -> out_dim = value_dim_head * heads."""
        dim, dim_kv, heads, dim_head = self.dim, self.dim_kv, self.heads, self.dim_head
        qk_dim = dim_head * heads
        if self.collab_heads:
            # collaborative heads (Cordonnier et al. 2020): one shared query/key projection of
            # `collab_compression * heads * dim_head` dims, each head re-weights its features
            qk_dim = max(1, int(collab_compression * qk_dim))
            self.collab_mixing = nn.Parameter(torch.randn(heads, qk_dim))
            self.to_q = nn.Linear(dim, qk_dim, bias=False)
            self.to_k = nn.Linear(dim_kv, qk_dim, bias=False)
        else:
            self.to_q = nn.Linear(dim, qk_dim, bias=False)
            self.to_k = nn.Linear(dim_kv, dim_head * self.kv_heads, bias=False)
        self.qk_dim = qk_dim
        self.to_v = nn.Linear(dim_kv, self.value_dim_head * self.kv_heads, bias=False)
        out_dim = self.value_dim_head * heads
        self.to_v_gate = None
        if gate_values:
            self.to_v_gate = nn.Linear(dim, out_dim, bias=False)
            nn.init.zeros_(self.to_v_gate.weight)
        return out_dim

    def _init_head_features(self, qk_norm, qk_norm_groups, qk_norm_scale, qk_norm_dim_scale, head_scale, num_mem_kv):
        """QK-norm settings (and its learned dim scales ``qk_norm_q_scale (heads, 1, dim_head)``,
        ``qk_norm_k_scale (kv_heads, 1, dim_head)``, which make the logit scale ``dim_head ** -0.5``),
        ``head_scale_params (1, heads, 1, 1)``, and the memory key/values ``mem_k
        (kv_heads, num_mem_kv, dim_head)``, ``mem_v (kv_heads, num_mem_kv, value_dim_head)``."""
        heads, kv_heads, dim_head = self.heads, self.kv_heads, self.dim_head
        self.qk_norm, self.qk_norm_groups, self.qk_norm_dim_scale = qk_norm, qk_norm_groups, qk_norm_dim_scale
        self.qk_norm_scale = qk_norm_scale
        if qk_norm and qk_norm_dim_scale:
            init = dim_head ** 0.25
            self.qk_norm_q_scale = nn.Parameter(torch.ones(heads, 1, dim_head) * init)
            self.qk_norm_k_scale = nn.Parameter(torch.ones(kv_heads, 1, dim_head) * init)
            self.qk_norm_scale = self.scale

        self.head_scale = head_scale
        if head_scale:
            self.head_scale_params = nn.Parameter(torch.ones(1, heads, 1, 1))

        self.num_mem_kv = num_mem_kv
        if num_mem_kv > 0:
            self.mem_k = nn.Parameter(torch.randn(kv_heads, num_mem_kv, dim_head))
            self.mem_v = nn.Parameter(torch.randn(kv_heads, num_mem_kv, self.value_dim_head))

    def _init_talking_heads(self, talking_heads, pre_talking_heads, post_talking_heads, use_entmax15):
        """``attend.pre_softmax_talking_heads`` / ``attend.post_softmax_talking_heads``: 1x1 convs
        ``heads -> heads`` without bias, identity-initialized (dirac), or None; and the entmax15 flag."""
        # talking heads: 2.31's pre (residual: s + W s) / post (p <- W p), and the original paper's
        # form (`attn_talking_heads`: s <- W s before softmax, p <- W p after), as 1x1 convs
        heads = self.heads
        self.attend = nn.Module()
        self.talking_heads = talking_heads
        self.pre_talking_residual = pre_talking_heads and not talking_heads
        self.attend.pre_softmax_talking_heads = nn.Conv2d(heads, heads, 1, bias=False) if (pre_talking_heads or talking_heads) else None
        self.attend.post_softmax_talking_heads = nn.Conv2d(heads, heads, 1, bias=False) if (post_talking_heads or talking_heads) else None
        for m in (self.attend.pre_softmax_talking_heads, self.attend.post_softmax_talking_heads):
            if m is not None:
                nn.init.dirac_(m.weight)
        self.use_entmax15 = use_entmax15

    def _init_output(self, out_dim: int, dim_out: int, on_attn: bool, zero_init_output: bool):
        """``to_out``: ``out_dim -> dim_out`` linear without bias (``on_attn``: to ``2 dim_out`` then
        GLU), or Identity for one head with matching dims; zero-initialized with ``zero_init_output``."""
        self.on_attn = on_attn
        if self.heads > 1 or self.dim != dim_out or on_attn or out_dim != dim_out:   # (x-transformers crashes on the last case)
            self.to_out = nn.Sequential(nn.Linear(out_dim, dim_out * 2, bias=False), nn.GLU()) if on_attn \
                else nn.Linear(out_dim, dim_out, bias=False)
        else:
            self.to_out = nn.Identity()
        if zero_init_output:
            for m in self.to_out.modules():
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.weight)

    # -- introspection ------------------------------------------------------------------------
    @property
    def full_matrix_reason(self) -> Optional[str]:
        """None when ``xtk.attention`` can run this layer in a kernel, else why it cannot."""
        why = []
        if self.attend.pre_softmax_talking_heads is not None or self.attend.post_softmax_talking_heads is not None:
            why.append("talking heads")
        if self.use_entmax15:
            why.append("entmax15")
        if self.record_pre_softmax:
            why.append("residual attention")
        return ", ".join(why) or None

    # -- helpers --------------------------------------------------------------------------------
    def _split(self, t, heads):
        b, n, _ = t.shape
        return t.view(b, n, heads, -1).transpose(1, 2)

    @staticmethod
    def _mix_heads(conv):
        return None if conv is None else conv.weight[:, :, 0, 0]

    def _hooks(self, prev_attn, record, want_post):
        pre_w = self._mix_heads(self.attend.pre_softmax_talking_heads)
        post_w = self._mix_heads(self.attend.post_softmax_talking_heads)
        if pre_w is None and post_w is None and prev_attn is None and not record and not want_post and not self.use_entmax15:
            return None
        residual_pre = self.pre_talking_residual

        def pre_bias(s):
            if prev_attn is not None:
                s = s + prev_attn
            if pre_w is not None:
                mixed = torch.einsum("bhij,gh->bgij", s, pre_w.to(s.dtype))
                s = s + mixed if residual_pre else mixed
            return s

        post_store = {}

        def post_softmax(p):
            if want_post:
                post_store["p"] = p
            if post_w is not None:
                p = torch.einsum("bhij,gh->bgij", p, post_w.to(p.dtype))
            return p

        hooks = ScoreHooks(reason=self.full_matrix_reason or "attention maps requested",
                           pre_bias=pre_bias if (prev_attn is not None or pre_w is not None) else None,
                           softmax=entmax15 if self.use_entmax15 else None,
                           post_softmax=post_softmax if (post_w is not None or want_post) else None,
                           record={} if record else None)
        hooks._post_store = post_store
        return hooks

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x, context=None, mask=None, context_mask=None, attn_mask=None, rel_pos=None, rotary=None,
                prev_attn=None, mem=None, mem_mask=None, cache: Optional[Intermediates] = None, return_intermediates=False,
                pia_pos_emb=None, pos_offset=0, return_attn=False):
        """x ``(b, n, dim)``; context ``(b, m, dim_context)`` for cross attention; mask ``(b, n)`` bool
        (query/key padding mask of self attention); context_mask ``(b, m)``; attn_mask bool
        broadcastable to ``(b, heads, n, keys)``; rel_pos: a positional-bias module (``descriptor(L)``);
        rotary: an ``xtk.Rotary``; mem ``(b, m, dim)``: Transformer-XL memories; cache: this layer's
        ``Intermediates`` of the previous call; pia_pos_emb: ``FixedSinusoidalEmbedding``
        (position-infused attention, ``pos_offset`` = position of ``x[:, 0]``)."""
        if isinstance(cache, StaticKV):
            out = self._static_step(x, cache, rel_pos, rotary)
            return (out, Intermediates()) if return_intermediates else out
        b, n, _ = x.shape
        h = self.heads
        has_context = context is not None
        q_input, k_input, v_input, mem_len = self._projection_inputs(x, context, mem, pia_pos_emb, pos_offset)
        q, k, v, cached_kv = self._project_qkv(q_input, k_input, v_input, cache, has_context, mem_len)
        nk_pos = k.shape[-2]   # keys that carry a position
        key_mask = _key_padding_mask(mask, context_mask, mem_mask, has_context, b, nk_pos, mem_len, x.device)
        k, v = self._prepend_mem_kv(k, v)
        k_prefix = self.num_mem_kv
        nk = k.shape[-2]
        keep = self._keep_mask(key_mask, attn_mask, nk)

        bias = rel_pos.descriptor(nk - k_prefix).for_heads(h) if rel_pos is not None else None
        qk_norm, scale = self._qk_norm_and_scale()
        hooks = self._hooks(prev_attn, self.record_pre_softmax, return_attn)
        out = xattention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0,
                         is_causal=self.causal and not has_context, scale=scale, enable_gqa=k.shape[1] != h, bias=bias,
                         topk=self.sparse_topk, qk_norm=qk_norm, rotary=rotary if not has_context else None,
                         q_offset=(nk - k_prefix) - n, k_prefix=k_prefix, hooks=hooks, gqa_order="repeat")
        out = self._merge_heads(out, x)
        if mask is not None and cache is None and mask.shape[-1] == n:
            out = out.masked_fill(~mask[..., None], 0.0)

        if not return_intermediates:
            return out
        return out, self._intermediates(cached_kv, hooks)

    def _static_step(self, x, store: StaticKV, rel_pos, rotary):
        """One decode step with fixed shapes and no host reads, x ``(b, 1, dim)`` -> ``(b, 1, dim_out)``:
        self attention writes this step's key/value into ``store`` at ``store.seqlens[b]`` and its
        query, at that position, attends the stored keys; cross attention (``store.cross``) attends
        the context's keys/values the prompt call projected. Through ``xtk.attention_with_kvcache``
        with what ``forward`` gives ``xtk.attention``: the bias descriptor (built for the store's
        capacity), QK-norm, rotary, top-k, GQA order; the store's first ``num_mem_kv`` slots hold the
        memory key/values (``static_state`` put them there), the ``k_prefix`` of the call."""
        if self.full_matrix_reason or self.collab_heads:
            raise ValueError("cache: a StaticKV serves attention without score hooks or collaborative heads; this "
                             f"layer has {self.full_matrix_reason or 'collaborative heads'}")
        if store.cross:
            q, k, v = self._split(self.to_q(x), self.heads), None, None
            bias = rotary = None
        else:
            q, k, v, _ = self._project_qkv(x, x, x, None, False, 0)
            L = store.k.shape[-2] - self.num_mem_kv
            bias = rel_pos.descriptor(L).for_heads(self.heads) if rel_pos is not None else None
        qk_norm, scale = self._qk_norm_and_scale()
        out = attention_with_kvcache(q, store.k, store.v, k, v, cache_seqlens=store.seqlens,
                                     is_causal=self.causal and not store.cross, scale=scale, bias=bias,
                                     topk=self.sparse_topk, qk_norm=qk_norm, rotary=rotary, k_prefix=self.num_mem_kv,
                                     gqa_order="repeat", backend=store.backend)
        return self._merge_heads(out, x)

    def _projection_inputs(self, x, context, mem, pia_pos_emb, pos_offset):
        """The inputs of the q, k, v projections: x ``(b, n, dim)``, keys/values from ``context``
        ``(b, m, dim_context)`` or x, after the memories ``mem (b, mem_len, dim)`` when given; with
        position-infused attention (self attention only) the sinusoidal embedding, in x's dtype, is
        added to q's input at ``pos_offset + i`` and to k's at ``pos_offset - mem_len + j``.
        -> q_input, k_input, v_input, mem_len."""
        n = x.shape[1]
        has_context = context is not None
        if has_context and context.shape[-1] != self.dim_kv:
            raise ValueError(f"context: expected last dim {self.dim_kv}, got shape {tuple(context.shape)}")
        kv_input = context if has_context else x
        q_input, k_input, v_input = x, kv_input, kv_input
        mem_len = mem.shape[-2] if mem is not None else 0
        if mem is not None:
            k_input = torch.cat((mem, k_input), dim=-2)
            v_input = torch.cat((mem, v_input), dim=-2)
        if pia_pos_emb is not None and not has_context:
            q_input = q_input + pia_pos_emb(n, pos_offset, x.device).to(x.dtype)
            k_input = k_input + pia_pos_emb(k_input.shape[-2], pos_offset - mem_len, x.device).to(x.dtype)
        return q_input, k_input, v_input, mem_len

    def _project_qkv(self, q_input, k_input, v_input, cache: Optional[Intermediates], has_context: bool, mem_len: int):
        """q ``(b, heads, n, dim_head)`` (collaborative heads: ``(b, heads, n, qk_dim)``, the shared
        projection times each head's mixing), k ``(b, kv_heads, nk, dim_head)``, v ``(b, kv_heads,
        nk, value_dim_head)``, and ``cached_kv``, this call's (k, v) without the memories.

        Cache: cross attention reuses ``cache.cached_kv`` as k, v (the context is projected once);
        self attention puts the cached keys/values between the memories and the new ones
        (``xtk.models.cache.extend_kv``: in place into a preallocated store when there is one)."""
        q = self.to_q(q_input)
        if self.collab_heads:
            q = q[:, None] * self.collab_mixing[None, :, None, :]   # (b, h, n, qk_dim)
        else:
            q = self._split(q, self.heads)
        if has_context and cache is not None and cache.cached_kv is not None:
            k, v = cache.cached_kv
        else:
            k = self.to_k(k_input)
            k = k[:, None] if self.collab_heads else self._split(k, self.kv_heads)
            v = self._split(self.to_v(v_input), self.kv_heads)
            if cache is not None and cache.cached_kv is not None:
                mk, mv = k[..., :mem_len, :], v[..., :mem_len, :]
                k, v, cached_kv = extend_kv(cache.cached_kv, k[..., mem_len:, :], v[..., mem_len:, :])
                if mem_len:
                    k, v = torch.cat((mk, k), dim=-2), torch.cat((mv, v), dim=-2)
                return q, self._collab_expand(k), v, cached_kv
        cached_kv = (k[..., mem_len:, :], v[..., mem_len:, :])
        return q, self._collab_expand(k), v, cached_kv

    def _collab_expand(self, k):
        """k ``(b, 1, nk, qk_dim)`` of collaborative heads as a view for every head; else k."""
        return k.expand(-1, self.heads, -1, -1) if self.collab_heads else k

    def _prepend_mem_kv(self, k, v):
        """k ``(b, hk, nk, d)``, v ``(b, hk, nk, dv)`` with the learned memory key/values (``mem_k``,
        ``mem_v`` in k's and v's dtypes) before them: the ``num_mem_kv`` position-less keys."""
        if self.num_mem_kv:
            b = k.shape[0]
            mk = self.mem_k[None].expand(b, -1, -1, -1).to(k.dtype)
            mv = self.mem_v[None].expand(b, -1, -1, -1).to(v.dtype)
            k = torch.cat((mk, k), dim=-2)
            v = torch.cat((mv, v), dim=-2)
        return k, v

    def _keep_mask(self, key_mask, attn_mask, nk: int):
        """The bool keep-mask (True = attend) for ``xtk.attention``, broadcastable to
        ``(b, heads, n, nk)``, or None: the key padding mask ``(b, nk - num_mem_kv)`` and
        ``attn_mask`` (2-, 3- or 4-D), both padded with True over the memory key/values."""
        k_prefix = self.num_mem_kv
        keep = None
        if key_mask is not None:
            keep = key_mask[:, None, None, :]
            if k_prefix:
                keep = F.pad(keep, (k_prefix, 0), value=True)
        if attn_mask is not None:
            am = attn_mask
            if am.dtype != torch.bool:
                raise TypeError(f"attn_mask: expected a bool tensor (True = attend), got dtype {am.dtype}")
            if am.dim() == 2:
                am = am[None, None]
            elif am.dim() == 3:
                am = am[None]
            if am.shape[-1] == nk - k_prefix and k_prefix:
                am = F.pad(am, (k_prefix, 0), value=True)
            keep = am if keep is None else keep & am
        return keep

    def _qk_norm_and_scale(self):
        """-> (``xtk.QKNorm`` with the dim scales, and logit scale None) under QK-norm, else (None,
        ``dim_head ** -0.5``)."""
        if not self.qk_norm:
            return None, self.scale
        qs = ks = None
        if self.qk_norm_dim_scale:
            qs, ks = self.qk_norm_q_scale, self.qk_norm_k_scale
        return QKNorm(self.qk_norm_groups, self.qk_norm_scale, qs, ks), None

    def _merge_heads(self, out, x):
        """``xtk.attention``'s out ``(b, heads, n, value_dim_head)`` -> the layer's output ``(b, n,
        dim_out)``: times ``head_scale_params``, heads merged, gated by ``sigmoid(to_v_gate(x))``,
        through ``to_out``."""
        b, n, _ = x.shape
        out = out.transpose(1, 2)   # (b, n, h, dv)
        if self.head_scale:
            out = out * self.head_scale_params.transpose(1, 2)
        out = out.reshape(b, n, self.heads * self.value_dim_head)
        if self.to_v_gate is not None:
            out = out * torch.sigmoid(self.to_v_gate(x))
        return self.to_out(out)

    @staticmethod
    def _intermediates(cached_kv, hooks: Optional[ScoreHooks]) -> Intermediates:
        """This call's ``Intermediates``: ``cached_kv`` and the attention maps the hooks recorded
        (``(b, heads, n, nk)``)."""
        inter = Intermediates(cached_kv=cached_kv)
        if hooks is not None:
            s_pre = hooks.record.get("pre_softmax") if hooks.record is not None else None
            if s_pre is not None:
                inter.pre_softmax_attn = s_pre
            p = hooks._post_store.get("p")
            if p is not None:
                inter.post_softmax_attn = p
        return inter


def _checked_kv_heads(dim_head, heads, kv_heads, one_kv_head, sparse_topk, qk_norm, qk_norm_groups, dropout,
                      collab_heads) -> int:
    """Checks ``Attention``'s settings (ValueError naming the x-transformers kwarg); -> the number
    of key/value heads (1 with ``one_kv_head``, ``heads`` when ``kv_heads`` is None)."""
    if dim_head < 1:
        raise ValueError(f"attn_dim_head: expected >= 1, got {dim_head}")
    if heads < 1:
        raise ValueError(f"heads: expected >= 1, got {heads}")
    if kv_heads is not None and one_kv_head:
        raise ValueError("attn_one_kv_head / attn_kv_heads: set one of them, not both")
    kv_heads = 1 if one_kv_head else (heads if kv_heads is None else kv_heads)
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"attn_kv_heads: expected a divisor of heads ({heads}), got {kv_heads}")
    if sparse_topk is not None and (not isinstance(sparse_topk, int) or sparse_topk < 1):
        raise ValueError(f"attn_sparse_topk: expected an int >= 1, got {sparse_topk!r}")
    if qk_norm and dim_head % qk_norm_groups:
        raise ValueError(f"attn_qk_norm_groups: expected a divisor of dim_head ({dim_head}), got {qk_norm_groups}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"attn_dropout: expected a float in [0, 1), got {dropout}")
    if collab_heads and (kv_heads != heads or qk_norm):
        raise ValueError("attn_collab_heads: not combinable with attn_kv_heads/attn_one_kv_head or attn_qk_norm")
    return kv_heads


def _key_padding_mask(mask, context_mask, mem_mask, has_context: bool, b: int, nk_pos: int, mem_len: int, device):
    """The key padding mask (True = keep) ``(b, nk_pos)`` over the memories and the keys, or None:
    ``context_mask`` (cross attention) or ``mask`` (self attention), ``(b, nk_pos - mem_len)`` or
    already ``(b, nk_pos)``; the memories take ``mem_mask`` ``(b, mem_len)``, else are never masked."""
    key_mask = context_mask if context_mask is not None else (None if has_context else mask)
    if key_mask is not None:
        key_mask = _check_mask("mask" if context_mask is None else "context_mask", key_mask, b, nk_pos - mem_len, nk_pos)
        if key_mask.shape[-1] == nk_pos - mem_len and mem_len:
            pre = mem_mask if mem_mask is not None else torch.ones(b, mem_len, dtype=torch.bool, device=device)
            key_mask = torch.cat((pre, key_mask), dim=-1)
    elif mem_mask is not None:
        key_mask = torch.cat((mem_mask, torch.ones(b, nk_pos - mem_len, dtype=torch.bool, device=device)), dim=-1)
    return key_mask


def _check_mask(name, m, b, n_new, n_all):
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor (True = keep), got "
                        f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
    if m.dim() != 2 or m.shape[0] != b or m.shape[1] not in (n_new, n_all):
        raise ValueError(f"{name}: expected shape ({b}, {n_new}), got {tuple(m.shape)}")
    return m
