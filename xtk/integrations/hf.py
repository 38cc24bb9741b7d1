"""Hugging Face transformers: ``attn_implementation="xtk"``, the library's supported way.

``import xtk.integrations.hf`` registers ``"xtk"`` with transformers' ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (``xtk_mask``: key padding of a causal or bidirectional
mask as one key row ``(b, 1, 1, kv)`` with causality left to the kernel; otherwise SDPA's masks, a bool
keep-mask or None where causal alone describes it), so that::

    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="xtk")
    model.set_attn_implementation("xtk")

run ``xtk.attention`` in every model family whose attention goes through that registry (tested:
Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-NeoX, BART, Whisper). What the function receives and what it does with it:
q ``(b, h, q_len, d)``, k/v ``(b, hk, kv_len, d)`` (GQA: ``enable_gqa``, transformers' repeat order is
SDPA's), the mask (bool keep-mask or additive float; None with ``q_len > 1`` means causal, as in
SDPA's function), ``scaling``, ``dropout``, a ``position_bias`` ``(b|1, h, q_len, kv_len)`` as a dense
float bias (its gradient flows). Refused by name: ``softcap`` (logit soft-capping is not in the
kernels) and ``output_attentions`` (the weights are never formed). A sliding window arrives as the
mask the mask interface builds. Tested with transformers 5.24 (CPU; the test extras pin it;
the GPU image has 5.17, not yet run there).

Models whose bias lives outside the registry (BLOOM, MPT, Falcon, T5, mT5, UMT5, LongT5) get module
patches instead: ``patch(model)`` / ``unpatch(model)``, from ``hf_patch``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..bias import Dense
from ..ops.attention import attention
from .hf_patch import patch, unpatch  # noqa: F401  (module patches: BLOOM, MPT, Falcon, T5 family)

__all__ = ["NAME", "xtk_attention_forward", "register", "patch", "unpatch"]

NAME = "xtk"


def xtk_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                          is_causal: Optional[bool] = None, position_bias: Optional[torch.Tensor] = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature -> (attention output ``(b, q_len, h, dv)``, None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f"softcap: attn_implementation='xtk' has no logit soft-capping (got softcap="
                         f"{kwargs['softcap']}); use attn_implementation='eager' for this model")
    if kwargs.get("output_attentions", False):
        raise ValueError("output_attentions: attn_implementation='xtk' never forms the attention weights; "
                         "use attn_implementation='eager' to get them")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    key_row = _is_key_row(attention_mask)
    is_causal = bool(q_len > 1 and (attention_mask is None or key_row) and is_causal)
    q_offset = 0
    if is_causal and key_row:   # xtk_mask's row: the queries are the last q_len positions (bottom-right)
        q_offset = kv_len - q_len
    elif is_causal and kv_len > q_len:  # prefill into an empty static cache: the rest are empty slots
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = position_bias[..., :q_len] if position_bias is not None else None
    out = attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
                    enable_gqa=key.shape[1] != query.shape[1], q_offset=q_offset,
                    bias=Dense(position_bias) if position_bias is not None else None)
    return out.transpose(1, 2).contiguous(), None


def _is_key_row(mask) -> bool:
    """A bool keep-mask ``(b, 1, 1, kv)``: one row of keys for every query (``xtk_mask``'s padding row)."""
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[-2] == 1


def xtk_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0, mask_function=None,
             attention_mask: Optional[torch.Tensor] = None, local_size: Optional[int] = None, use_vmap: bool = False,
             **kwargs) -> Optional[torch.Tensor]:
    """transformers' mask-interface signature. Where the mask is causal or bidirectional with key padding
    only, and (causal) the queries are the last ``q_length`` positions, it returns the padding as one key row
    ``(b, 1, 1, kv_length)`` bool (or None without padding) and ``xtk_attention_forward`` applies causality
    with the kernel's own masking (bottom-right): no ``(b, 1, q, kv)`` mask is built. Anything else (sliding
    windows, chunked or packed masks, custom mask functions, static caches' empty slots): SDPA's mask."""
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                            prepare_padding_mask, sdpa_mask)
    full = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size, use_vmap=use_vmap, **kwargs)
    if mask_function is not None:
        full["mask_function"] = mask_function
    causal = mask_function is None or mask_function is causal_mask_function
    plain = causal or mask_function is bidirectional_mask_function
    last = isinstance(q_offset, int) and q_offset + q_length == kv_offset + kv_length
    if use_vmap or local_size is not None or not plain or (causal and not last):
        return sdpa_mask(**full)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        return padding[:, None, None, kv_offset:kv_offset + kv_length].bool()
    if not causal or q_length in (1, kv_length):
        return None   # every key, or causal from the first key (q_length == kv_length), or the last query alone
    return torch.ones(batch_size, 1, 1, kv_length, dtype=torch.bool, device=kwargs.get("device", "cpu"))


def register() -> None:
    """Register ``"xtk"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, xtk_attention_forward)
    AttentionMaskInterface.register(NAME, xtk_mask)


register()
