"""Module patches for Hugging Face models whose attention bias lives outside transformers' registry.

``xtk.integrations.hf.patch(model)`` replaces, in place, the ``forward`` of each attention module it
knows (an instance attribute: the class is untouched, every Parameter stays the same object, an
optimizer built before keeps working) with one that computes q/k/v with the module's own
projections, updates transformers' own cache, and calls ``xtk.attention`` with the bias in-kernel;
``unpatch(model)`` removes those attributes (outputs bit-identical to before). Per family:

- BLOOM: ALiBi in-kernel, slopes from BLOOM's own ``_get_alibi_slopes``. BLOOM's bias is
  ``slope * key_position`` with positions counted from each row's first unpadded token; it equals
  xtk's ``-slope * |p_i - p_j|`` up to a per-query constant (which softmax cancels) when every
  unmasked key precedes its query and each row's unmasked keys are one contiguous run (left or
  right padding). A padding mask with holes gets BLOOM's own alibi tensor as a dense bias instead.
- MPT: ALiBi in-kernel, slopes read from the ``position_bias`` the model passes (its own
  ``build_mpt_alibi_tensor`` as its forward calls it: ``alibi_bias_max`` 8 whatever ``attn_config``
  says; its interleaved order equals BLOOM's for every head count, its fp32 values may differ in the
  last bits). Its bias ``slope * (j - last key)`` depends on key indices only, so any padding is
  exact. MPT's mask is True where masked.
- Falcon without ALiBi: rotary (Falcon's own ``apply_rotary_pos_emb``), causal in-kernel, MQA/GQA.
  Falcon does not route attention through the registry, so ``attn_implementation="xtk"`` cannot
  reach it. Falcon with ALiBi: its bias is ``bfloat16(slope * position)`` (``build_alibi_tensor``),
  which no in-kernel ALiBi reproduces, so the model's own bias (folded into its mask) goes in dense;
  under ``"eager"`` Falcon adds that bias twice (once in the scores, once in the mask) and the patch
  does the same, under ``"sdpa"`` once.
- T5, mT5, LongT5's decoder: ``xtk.bias.T5`` on the stack's first ``relative_attention_bias.weight``
  (the table's gradient flows), bidirectional buckets in the encoder, causal in the decoder, no bias
  in cross-attention, logit scale 1. UMT5: the same with each layer's own table. At patch time the
  bucket function is checked against the module's own ``_relative_position_bucket``.
- Kept, with the reason in the report: LongT5's local and transient-global encoder attention
  (blocked windows and global side tokens: not one xtk.attention call), Falcon's flash-attention
  class, BLOOM with ``pretraining_tp > 1`` and ``slow_but_exact`` (its sliced output projection),
  subclasses of these classes (they may compute another function).

Masks: the model's mask (float 0/min, or bool) becomes the kernel's masking where its structure
allows -- causal from the query offset and a ``(b, 1, 1, nk)`` key padding row -- and a dense bool
mask otherwise. A query row with no key to see (a left-padded position) gives zeros (SPEC §2.8) where
eager gives the average of all values: the outputs at padded positions differ, no other position
reads them. Refused: ``output_attentions`` (the weights are never formed; ``unpatch`` first).
Dropout on the probabilities runs in-kernel (another random stream than torch's).
Tested with transformers 5.24 only (``TESTED``): other versions are refused, module internals change.
"""
from __future__ import annotations

import sys
import types
import weakref
from typing import Optional

import torch

from ..bias import Alibi, Dense, T5, t5_bucket
from ..ops.attention import attention
from .report import PatchReport

__all__ = ["patch", "unpatch", "TESTED"]

TESTED = ("5.24", "5.25")  # transformers versions [low, high) the patches were tested with
_SAVED = "_xtk_saved_forward"  # attribute holding the instance forward a patch replaced (or _NONE)
_OWNER = "_xtk_table_owner"  # (module holding the relative-attention table,): a tuple, not a submodule
_NONE = "<the class forward>"  # a str: deepcopy keeps it identical (an object() would be copied)


# ----------------------------------------------------------------------------------------------------
# masks: the model's mask as the kernel's masking


_last_mask: list = [None]  # one entry: (weakref to the mask, key, result); every layer gets the same mask


def _kernel_masking(mask: Optional[torch.Tensor], nq: int, nk: int, q_offset: int, causal_if_none: bool,
                    masked_is_true: bool = False) -> tuple[Optional[torch.Tensor], bool, Optional[torch.Tensor]]:
    """``(attn_mask, is_causal, key_row)`` for ``xtk.attention`` from a model's mask ``(b, 1, nq, nk)``
    (float: 0 keep / min masked, or bool), queries at ``q_offset + i``. ``key_row`` ``(b, 1, 1, nk)``
    bool when the mask is causal-and-padding or padding alone (None: no structure found); a float
    mask with other values than 0/min is returned as is (an additive bias)."""
    if mask is None:
        return None, causal_if_none, None
    key = (mask._version, nq, nk, q_offset, masked_is_true)
    hit = _last_mask[0]
    if hit is not None and hit[0]() is mask and hit[1] == key:
        return hit[2]
    result = _structure(mask, nq, nk, q_offset, masked_is_true)
    _last_mask[0] = (weakref.ref(mask), key, result)
    return result


def _structure(mask, nq, nk, q_offset, masked_is_true):
    if mask.dtype == torch.bool:
        keep = ~mask if masked_is_true else mask
    else:
        masked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | masked).all()):
            return mask, False, None
        keep = ~masked
    keep = keep.expand(keep.shape[0], keep.shape[1], nq, nk) if keep.dim() == 4 else keep
    if keep.dim() != 4 or keep.shape[1] != 1:
        return keep, False, None
    row = keep[:, :, -1:, :]
    pad = None if bool(row.all()) else row
    if torch.equal(keep, row.expand_as(keep)):
        return pad, False, row
    i = torch.arange(nq, device=keep.device)[:, None] + q_offset
    causal = torch.arange(nk, device=keep.device)[None, :] <= i
    if torch.equal(keep, causal & row):
        return pad, True, row
    return keep, False, None


def _contiguous(row: torch.Tensor) -> bool:
    """Every batch entry's kept keys form one run (left or right padding, no holes)."""
    r = row.reshape(row.shape[0], -1).to(torch.int8)
    starts = (r[:, 1:] > r[:, :-1]).sum(-1) + r[:, 0]
    return bool((starts <= 1).all())


def _keys_precede(row: torch.Tensor, q_offset: int) -> bool:
    """No kept key sits after the first query (position ``q_offset``): a mask without causality
    still sees only earlier keys (a decoding step)."""
    r = row.reshape(row.shape[0], -1)
    return bool((r * torch.arange(r.shape[1], device=r.device)).amax() <= q_offset)


def _past(cache, layer_idx) -> int:
    """Tokens in the cache before this call's update (the first query's position)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length(layer_idx))


def _dropout(module, p: float) -> float:
    return p if module.training else 0.0


def _refuse_attentions(flag) -> None:
    if flag:
        raise ValueError("output_attentions: the xtk patch never forms the attention weights; "
                         "call xtk.integrations.hf.unpatch(model) to get them")


def _own(module, name: str):
    """A function of the module's own modeling file (its slopes, its rotary): the model's code, not a copy."""
    return getattr(sys.modules[type(module).__module__], name)


# ----------------------------------------------------------------------------------------------------
# BLOOM


def _bloom_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                   output_attentions=False, **kwargs):
    _refuse_attentions(output_attentions)
    b, nq, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))
    past = _past(layer_past, self.layer_idx)
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    nk = k.shape[2]
    mask, causal, row = _kernel_masking(attention_mask, nq, nk, past, causal_if_none=True)
    if attention_mask is None or (row is not None and _contiguous(row) and (causal or _keys_precede(row, past))):
        bias = Alibi(_own(self, "_get_alibi_slopes")(self.num_heads, q.device) * self.beta)
    else:  # holes in the padding (BLOOM's positions skip them) or later keys visible: its own tensor
        bias = Dense(alibi.view(b, self.num_heads, 1, nk) * self.beta)
    out = attention(q, k, v, attn_mask=mask, dropout_p=_dropout(self, self.attention_dropout.p), is_causal=causal,
                    scale=self.inv_norm_factor, bias=bias, q_offset=past)
    out = self.dense(out.transpose(1, 2).reshape(b, nq, self.hidden_size))
    return _own(self, "dropout_add")(out, residual, self.hidden_dropout, self.training), None


def _bloom_kept(module) -> Optional[str]:
    if module.pretraining_tp > 1 and module.slow_but_exact:
        return "pretraining_tp > 1 with slow_but_exact: its sliced output projection is not reproduced"
    return None


# ----------------------------------------------------------------------------------------------------
# MPT


def _mpt_forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
    b, nq = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (t.reshape(b, nq, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
    past = _past(cache, self.layer_idx)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    nk = k.shape[2]
    mask, causal, row = _kernel_masking(attention_mask, nq, nk, past, causal_if_none=False, masked_is_true=True)
    bias = None
    if position_bias is not None:
        if position_bias.dim() != 3 or position_bias.shape[2] < max(nk, 2):
            raise ValueError(f"MPT position_bias: expected (heads, 1, >= {max(nk, 2)}) (max_seq_len covering the "
                             f"keys), got {tuple(position_bias.shape)}")
        if causal or (row is not None and _keys_precede(row, past)):
            bias = Alibi(-position_bias[:, 0, -2])  # the model's bias is slope * (j - last): -slope at last but one
        else:  # keys after a query visible: slope * (j - last) is no distance form there; the model's own tensor
            bias = Dense(position_bias[:, :, position_bias.shape[2] - nk:])
    out = attention(q, k, v, attn_mask=mask, dropout_p=_dropout(self, self.attn_dropout_p), is_causal=causal,
                    scale=self.softmax_scale, bias=bias, q_offset=past)
    return self.out_proj(out.transpose(1, 2).reshape(b, nq, -1)), None


# ----------------------------------------------------------------------------------------------------
# Falcon


def _falcon_forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, use_cache=False,
                    output_attentions=False, position_embeddings=None, **kwargs):
    _refuse_attentions(output_attentions)
    q, k, v = self._split_heads(self.query_key_value(hidden_states))
    b, nq = q.shape[:2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if alibi is None:
        cos, sin = position_embeddings
        q, k = _own(self, "apply_rotary_pos_emb")(q, k, cos, sin)
    past = _past(layer_past, self.layer_idx)
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    nk = k.shape[2]
    if alibi is None:
        mask, causal, _ = _kernel_masking(attention_mask, nq, nk, past, causal_if_none=True)
        bias, dropout = None, 0.0  # Falcon applies no dropout without ALiBi
    else:  # the model folded alibi / sqrt(d) into its float mask; eager adds alibi once more
        mask, causal, dropout = None, False, _dropout(self, self.attention_dropout.p)
        dense = attention_mask
        if self.config._attn_implementation != "sdpa":
            dense = dense + alibi.view(b, self.num_heads, 1, -1) * self.inv_norm_factor
        bias = Dense(dense)
    out = attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.inv_norm_factor,
                    enable_gqa=k.shape[1] != q.shape[1], bias=bias, q_offset=past)
    return self.dense(out.transpose(1, 2).reshape(b, nq, self.num_heads * self.head_dim)), None


# ----------------------------------------------------------------------------------------------------
# T5, mT5, LongT5 (decoder), UMT5


def _t5_states(self, hidden_states, kv_states, cache, kwargs):
    """q, k, v and the first query's position, with the module's projections and transformers' cache
    (EncoderDecoderCache: self- and cross-attention caches, cross k/v computed once)."""
    from transformers.cache_utils import EncoderDecoderCache
    b, nq = hidden_states.shape[:2]
    past = _past(cache, self.layer_idx)
    q = self.q(hidden_states).view(b, nq, -1, self.key_value_proj_dim).transpose(1, 2)
    cross = kv_states is not None
    is_updated = False
    current = cache
    if isinstance(cache, EncoderDecoderCache):
        is_updated = cache.is_updated.get(self.layer_idx)
        current = cache.cross_attention_cache if cross else cache.self_attention_cache
    if cross and cache is not None and is_updated:
        k, v = current.layers[self.layer_idx].keys, current.layers[self.layer_idx].values
    else:
        source = kv_states if cross else hidden_states
        shape = (b, source.shape[1], -1, self.key_value_proj_dim)
        k, v = (proj(source).view(shape).transpose(1, 2) for proj in (self.k, self.v))
        if cache is not None:
            k, v = current.update(k, v, self.layer_idx, kwargs=kwargs)
            if cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
    return q, k, v, past


def _t5_attend(self, q, k, v, mask, past, owner, cross: bool) -> torch.Tensor:
    causal_default = self.is_decoder and not cross
    bias = None
    if owner is not None and not cross:
        bias = T5(owner.relative_attention_bias.weight, self.relative_attention_num_buckets,
                  self.relative_attention_max_distance, causal=self.is_decoder, scale=1.0)
    attn_mask, causal, _ = _kernel_masking(mask, q.shape[2], k.shape[2], past, causal_if_none=causal_default)
    out = attention(q, k, v, attn_mask=attn_mask, dropout_p=_dropout(self, self.dropout), is_causal=causal,
                    scale=self.scaling, bias=bias, q_offset=past)
    return self.o(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))


def _t5_forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
    """T5/mT5/LongT5Attention.forward; the stack's table is read from ``self._xtk_table_owner``."""
    _refuse_attentions(kwargs.get("output_attentions", False))
    q, k, v, past = _t5_states(self, hidden_states, key_value_states, cache, kwargs)
    out = _t5_attend(self, q, k, v, mask, past, getattr(self, _OWNER)[0], cross=key_value_states is not None)
    return out, position_bias, None  # the next layers ignore position_bias: they hold the table too


def _umt5_forward(self, hidden_states, encoder_hidden_states=None, cache=None, attention_mask=None, **kwargs):
    _refuse_attentions(kwargs.get("output_attentions", False))
    q, k, v, past = _t5_states(self, hidden_states, encoder_hidden_states, cache, kwargs)
    out = _t5_attend(self, q, k, v, attention_mask, past, getattr(self, _OWNER)[0],
                     cross=encoder_hidden_states is not None)
    return out, None


def _t5_buckets_match(module, causal: bool) -> Optional[str]:
    """None when xtk's bucket function equals the module's own on every distance up to 2 * max_distance."""
    nb, md = module.relative_attention_num_buckets, module.relative_attention_max_distance
    rel = torch.arange(-2 * md, 2 * md + 1)
    if type(module).__name__ == "UMT5Attention":
        theirs = module._relative_position_bucket(rel)
    else:
        theirs = module._relative_position_bucket(rel, bidirectional=not causal, num_buckets=nb, max_distance=md)
    try:
        ours = t5_bucket(rel, nb, md, causal)
    except (TypeError, ValueError) as e:
        return f"relative buckets num_buckets={nb}, max_distance={md}: {e}"
    if not torch.equal(theirs.long(), ours):
        bad = rel[theirs.long() != ours][:4].tolist()
        return (f"xtk's T5 buckets differ from the model's at relative positions {bad} (num_buckets={nb}, "
                f"max_distance={md})")
    return None


# ----------------------------------------------------------------------------------------------------
# finding the modules


_T5_STACKS = {"T5Stack", "MT5Stack", "LongT5Stack", "UMT5Stack"}
_T5_CLASSES = {"T5Attention", "MT5Attention", "LongT5Attention", "UMT5Attention"}
_KEPT_CLASSES = {
    "LongT5LocalAttention": "LongT5's local attention (blocks of keys around each query block, its own bucket "
                            "offsets) is not one xtk.attention call",
    "LongT5TransientGlobalAttention": "LongT5's transient-global attention (local blocks plus summed global side "
                                      "tokens with a second bias table) is not one xtk.attention call",
    "FalconFlashAttention2": "Falcon's flash-attention class: build the model with attn_implementation='eager' or "
                             "'sdpa' to patch it",
}
_FAMILIES = "BLOOM, MPT, Falcon, T5, mT5, UMT5, LongT5"


def _t5_plan(stack, names: dict, swaps: list, kept: list, seen: set) -> None:
    """The self- and cross-attention modules of one T5-style stack (``block[i].layer[j]``)."""
    first = getattr(stack.block[0].layer[0], "SelfAttention", None) if len(stack.block) else None
    shared = first if getattr(first, "has_relative_attention_bias", False) else None
    for block in stack.block:
        for sub in block.layer:
            for attr in ("SelfAttention", "EncDecAttention"):
                att = getattr(sub, attr, None)
                if att is None:
                    continue
                seen.add(att)
                cls, cross = type(att).__name__, attr == "EncDecAttention"
                if cls not in _T5_CLASSES:
                    kept.append((names[att], f"{cls}: not a class the patch knows (a subclass may compute another "
                                             f"function)"))
                    continue
                umt5 = cls == "UMT5Attention"
                owner = None if cross else (att if umt5 and att.has_relative_attention_bias else shared)
                why = None
                if not cross and owner is None:
                    why = "self-attention without a relative-attention table to read"
                elif not cross:
                    why = _t5_buckets_match(att, att.is_decoder)
                if why:
                    kept.append((names[att], why))
                    continue
                what = ("attention: xtk.attention, cross-attention without bias" if cross else
                        f"attention: xtk.attention, T5 relative buckets in-kernel "
                        f"({'causal' if att.is_decoder else 'bidirectional'}, table of {names[owner]})")
                swaps.append((names[att], att, _umt5_forward if umt5 else _t5_forward, what, owner))


def _plan(model) -> tuple[list, list]:
    """``[(path, module, forward, what, table owner)]`` to swap and ``[(path, why)]`` to keep."""
    swaps, kept, seen = [], [], set()
    names = {m: n for n, m in model.named_modules()}
    for stack in model.modules():
        if type(stack).__name__ in _T5_STACKS:
            _t5_plan(stack, names, swaps, kept, seen)
    simple = {"BloomAttention": (_bloom_forward, "attention: xtk.attention, ALiBi in-kernel (BLOOM's slopes)"),
              "MptAttention": (_mpt_forward, "attention: xtk.attention, ALiBi in-kernel (MPT's slopes)")}
    known = set(simple) | _T5_CLASSES | {"FalconAttention"}
    for path, m in model.named_modules():
        cls = type(m).__name__
        if m in seen:
            continue
        if cls in _KEPT_CLASSES:
            kept.append((path, _KEPT_CLASSES[cls]))
        elif cls in simple:
            why = _bloom_kept(m) if cls == "BloomAttention" else None
            if why:
                kept.append((path, why))
            else:
                swaps.append((path, m, *simple[cls], None))
        elif cls == "FalconAttention":
            what = ("attention: xtk.attention, Falcon's ALiBi as its own dense bias (bfloat16(slope * position) is "
                    "not an in-kernel ALiBi)" if m.config.alibi else
                    "attention: xtk.attention, rotary (Falcon's), causal in-kernel")
            swaps.append((path, m, _falcon_forward, what, None))
        elif any(base.__name__ in known for base in type(m).__mro__[1:]):
            kept.append((path, f"{cls}: a subclass of a class the patch knows (it may compute another function)"))
    return swaps, kept


def _installed_version() -> str:
    import transformers
    return transformers.__version__


def _check_version() -> None:
    from packaging.version import Version
    installed = _installed_version()
    if not Version(TESTED[0]) <= Version(installed) < Version(TESTED[1]):
        raise RuntimeError(f"xtk.integrations.hf.patch: tested with transformers >={TESTED[0]},<{TESTED[1]}, got "
                           f"{installed} (the patches replace module internals that change between versions)")


def _output_attentions_hook(module, args, kwargs):
    flag = kwargs.get("output_attentions")
    if flag is None:
        flag = getattr(getattr(module, "config", None), "output_attentions", False)
    _refuse_attentions(flag)


def patch(model: torch.nn.Module) -> PatchReport:
    """Swap, in place, the attention of a BLOOM, MPT, Falcon, T5, mT5, UMT5 or LongT5 model for
    ``xtk.attention`` with its bias in-kernel; returns (and logs) the report of what was swapped and
    what was kept, and why. ``TypeError`` naming the class for a model with none of these modules;
    ``RuntimeError`` with the tested range for another transformers version; ``ValueError`` when the
    model is already patched."""
    _check_version()
    if any(hasattr(m, _SAVED) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already patched by xtk; call unpatch(model) first")
    swaps, kept = _plan(model)
    if not swaps and not kept:
        raise TypeError(f"xtk.integrations.hf.patch: {type(model).__name__} has no attention module the patch "
                        f"knows ({_FAMILIES}); models that route attention through transformers' registry "
                        f"(Llama, Mistral, Qwen2, GPT-NeoX, ...) use attn_implementation='xtk' instead")
    report = PatchReport(type(model).__name__)
    for path, module, forward, what, owner in swaps:
        if forward in (_t5_forward, _umt5_forward):
            object.__setattr__(module, _OWNER, (owner,))  # a tuple: deepcopy maps it to the copy's module
        object.__setattr__(module, _SAVED, module.__dict__.get("forward", _NONE))
        module.forward = types.MethodType(forward, module)
        report.swap(path, what)
    for path, why in kept:
        report.keep(path, why)
    for m in model.modules():
        if isinstance(m, _pretrained()):
            m.register_forward_pre_hook(_output_attentions_hook, with_kwargs=True)
    return report.attach(model).log()


def _pretrained():
    from transformers import PreTrainedModel
    return PreTrainedModel


def unpatch(model: torch.nn.Module) -> None:
    """Restore every module ``patch`` swapped (the class's forward again, or the instance forward
    that was there before) and remove its hooks. A model that is not patched is left as is."""
    PatchReport.detach(model)
    for m in model.modules():
        m.__dict__.pop(_OWNER, None)
        for key in [k for k, hook in m._forward_pre_hooks.items() if hook is _output_attentions_hook]:
            del m._forward_pre_hooks[key]  # by value, not by handle: a deepcopy's handles point at the original
            m._forward_pre_hooks_with_kwargs.pop(key, None)
        saved = m.__dict__.pop(_SAVED, None)
        if saved is None:
            continue
        if isinstance(saved, str):  # _NONE
            del m.forward
        else:
            m.forward = saved
