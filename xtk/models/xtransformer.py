"""``XTransformer``: encoder-decoder (x-transformers 2.31.10 kwargs, plus its older signatures).

Keyword routing: ``enc_*`` kwargs configure the encoder, ``dec_*`` the decoder; kwargs without a
prefix (the oldest README's ``XTransformer(num_tokens=256, dim=512, depth=6, heads=8,
max_seq_len=1024)``) configure both sides, a prefixed kwarg overriding the shared one. Each side's
kwargs go to its ``TransformerWrapper`` when that class takes them (``num_tokens``, ``max_seq_len``,
``emb_dropout``, ``num_memory_tokens``, ``use_abs_pos_emb``, ...), the rest to its
``Encoder``/``Decoder``, which reject names they do not know.

``forward(src, tgt, mask=src_mask)`` returns the decoder's next-token loss (``return_tgt_loss``,
the default) or, with ``return_tgt_loss=False`` (the default of the oldest signature, as that
version did), the decoder logits ``(b, n_tgt, dec_num_tokens)``. The seed-000 names ``src_mask``
and ``tgt_mask`` are accepted. The decoder is always held as ``self.decoder.net`` inside an
``AutoregressiveWrapper`` (``self.decoder``), as in x-transformers, so its checkpoints load.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from ..ops import _check
from .autoregressive import AutoregressiveWrapper
from .layers import check_nonempty, dropout_seq

__all__ = ["XTransformer"]

# the TransformerWrapper kwargs that XTransformer itself decides
_RESERVED = {"self", "attn_layers", "return_only_embed"}


def _wrapper_kwarg_names(cls) -> set:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - _RESERVED


def _split(side: str, kwargs: dict, wrapper_names: set):
    wrapper_kw = {k: v for k, v in kwargs.items() if k in wrapper_names}
    layer_kw = {k: v for k, v in kwargs.items() if k not in wrapper_names}
    for req in ("num_tokens", "max_seq_len"):
        if req not in wrapper_kw:
            raise TypeError(f"{side}_{req}: XTransformer needs the {side}oder's {req} (as {side}_{req}, or "
                            f"{req} for both sides), got none")
    return wrapper_kw, layer_kw


class XTransformer(nn.Module):
    def __init__(
        self,
        *,
        dim: int,
        tie_token_emb: bool = False,
        ignore_index: int = -100,
        pad_value: int = 0,
        cross_attn_tokens_dropout: float = 0.,
        return_tgt_loss: Optional[bool] = None,
        **kwargs,
    ):
        super().__init__()
        from .layers import Decoder, Encoder
        from .wrapper import TransformerWrapper

        dim = _check.integer("dim", dim, minimum=1)
        if not 0. <= cross_attn_tokens_dropout < 1.:
            raise ValueError(f"cross_attn_tokens_dropout: expected a float in [0, 1), got {cross_attn_tokens_dropout!r}")

        enc = {k[4:]: v for k, v in kwargs.items() if k.startswith("enc_")}
        dec = {k[4:]: v for k, v in kwargs.items() if k.startswith("dec_")}
        shared = {k: v for k, v in kwargs.items() if not k.startswith(("enc_", "dec_"))}
        for side, kw in (("enc", enc), ("dec", dec)):
            if "dim" in kw:
                raise TypeError(f"{side}_dim: the model width is set once with `dim` for both sides, got {side}_dim={kw['dim']}")
            if "cross_attend" in kw and side == "dec":
                raise TypeError("dec_cross_attend: the decoder always cross-attends to the encoder")
        oldest_signature = len(shared) > 0
        enc = {**shared, **enc}
        dec = {**shared, **dec}

        names = _wrapper_kwarg_names(TransformerWrapper)
        enc_wrapper, enc_layers = _split("enc", enc, names)
        dec_wrapper, dec_layers = _split("dec", dec, names)

        self.cross_attn_tokens_dropout = cross_attn_tokens_dropout
        self.return_tgt_loss = (not oldest_signature) if return_tgt_loss is None else bool(return_tgt_loss)

        try:
            enc_attn = Encoder(dim=dim, **enc_layers)
        except TypeError as e:  # name the prefixed kwargs the user wrote
            raise TypeError(f"enc_* kwargs (the encoder's Encoder): {e}") from e
        try:
            dec_attn = Decoder(dim=dim, cross_attend=True, **dec_layers)
        except TypeError as e:
            raise TypeError(f"dec_* kwargs (the decoder's Decoder): {e}") from e
        self.encoder = TransformerWrapper(**enc_wrapper, return_only_embed=True, attn_layers=enc_attn)
        decoder = TransformerWrapper(**dec_wrapper, attn_layers=dec_attn)
        if tie_token_emb:
            if enc_wrapper["num_tokens"] != dec_wrapper["num_tokens"]:
                raise ValueError(f"tie_token_emb: expected enc_num_tokens == dec_num_tokens to share one embedding, "
                                 f"got {enc_wrapper['num_tokens']} and {dec_wrapper['num_tokens']}")
            decoder.token_emb = self.encoder.token_emb
        self.decoder = AutoregressiveWrapper(decoder, ignore_index=ignore_index, pad_value=pad_value)

    @staticmethod
    def _src_mask(mask, src_mask):
        if mask is not None and src_mask is not None:
            raise ValueError("mask, src_mask: the same source mask under two names; expected one, got both")
        return mask if mask is not None else src_mask

    def _encode(self, src, mask, attn_mask, prepend_embeds=None):
        kw = dict(mask=mask, return_embeddings=True)
        if attn_mask is not None:
            kw["attn_mask"] = attn_mask
        if prepend_embeds is not None:
            kw["prepend_embeds"] = prepend_embeds
        return self.encoder(src, **kw)

    @torch.no_grad()
    def generate(self, seq_in, seq_out_start, seq_len, mask=None, attn_mask=None, src_mask=None, **kwargs):
        """Encode ``seq_in`` once, then sample ``seq_len`` decoder tokens after ``seq_out_start``
        (``AutoregressiveWrapper.generate`` kwargs: temperature, filter_logits_fn, cache_kv, eos_token...)."""
        mask = self._src_mask(mask, src_mask)
        _check.tensor("seq_in", seq_in, ndim=2)
        check_nonempty("seq_in", seq_in, "token")
        encodings = self._encode(seq_in, mask, attn_mask)
        return self.decoder.generate(seq_out_start, seq_len, context=encodings, context_mask=mask, **kwargs)

    def forward(self, src, tgt, mask=None, attn_mask=None, src_prepend_embeds=None, src_mask=None, tgt_mask=None):
        mask = self._src_mask(mask, src_mask)
        _check.tensor("src", src, ndim=2)
        _check.tensor("tgt", tgt, ndim=2)
        if src_prepend_embeds is None:
            check_nonempty("src", src, "token")
        check_nonempty("tgt", tgt, "token")
        enc = self._encode(src, mask, attn_mask, src_prepend_embeds)
        if src_prepend_embeds is not None and mask is not None:
            mask = torch.nn.functional.pad(mask, (src_prepend_embeds.shape[-2], 0), value=True)
        if self.training and self.cross_attn_tokens_dropout > 0:
            enc, mask = dropout_seq(enc, mask, self.cross_attn_tokens_dropout, cap_valid_per_row=True)
        dec_kw = dict(context=enc, context_mask=mask)
        if tgt_mask is not None:
            dec_kw["mask"] = tgt_mask
        if self.return_tgt_loss:
            return self.decoder(tgt, **dec_kw)
        return self.decoder.net(tgt, **dec_kw)
