"""Models called on an empty sequence ``(b, 0)`` (issue 12, item 7): a ValueError naming the input
and what was expected, not a reshape error from inside an attention layer (x-transformers itself
crashes there). Prepended embeddings alone are a sequence, and still run."""
import pytest
import torch

from xtk import (AutoregressiveWrapper, ContinuousTransformerWrapper, CrossAttender, Decoder, Encoder,
                 TransformerWrapper, XTransformer)

EMPTY = torch.zeros(2, 0, dtype=torch.long)
TOKENS = torch.zeros(2, 4, dtype=torch.long)


def wrapper(layers=Decoder, **kw):
    return TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=layers(dim=16, depth=1, heads=2), **kw)


def continuous(dim=16, **kw):
    return ContinuousTransformerWrapper(dim_in=4, max_seq_len=16, attn_layers=Decoder(dim=dim, depth=1, heads=2), **kw)


def xtransformer():
    return XTransformer(dim=16, enc_num_tokens=20, enc_depth=1, enc_heads=2, enc_max_seq_len=16, dec_num_tokens=20,
                        dec_depth=1, dec_heads=2, dec_max_seq_len=16)


CASES = {
    "decoder_wrapper": (lambda: wrapper()(EMPTY), r"x: expected at least one token .* got shape \(2, 0\)"),
    "encoder_wrapper": (lambda: wrapper(Encoder)(EMPTY), r"x: expected at least one token"),
    "with_memory_tokens": (lambda: wrapper(num_memory_tokens=2)(EMPTY), r"x: expected at least one token"),
    "with_mask": (lambda: wrapper()(EMPTY, mask=torch.ones(2, 0, dtype=torch.bool)), r"x: expected at least one token"),
    "attention_layers": (lambda: Decoder(dim=16, depth=1, heads=2)(torch.randn(2, 0, 16)),
                         r"x: expected at least one position .* got shape \(2, 0, 16\)"),
    "cross_attender_x": (lambda: CrossAttender(dim=16, depth=1, heads=2)(torch.randn(2, 0, 16),
                                                                         context=torch.randn(2, 3, 16)),
                         r"x: expected at least one position"),
    "cross_attender_context": (lambda: CrossAttender(dim=16, depth=1, heads=2)(torch.randn(2, 3, 16),
                                                                               context=torch.randn(2, 0, 16)),
                               r"context: expected at least one position .* got shape \(2, 0, 16\)"),
    "continuous": (lambda: continuous()(torch.randn(2, 0, 4)),
                   r"x: expected at least one vector .* got shape \(2, 0, 4\)"),
    "xtransformer_src": (lambda: xtransformer()(EMPTY, TOKENS), r"src: expected at least one token"),
    "xtransformer_tgt": (lambda: xtransformer()(TOKENS, EMPTY), r"tgt: expected at least one token"),
    "xtransformer_generate": (lambda: xtransformer().generate(EMPTY, TOKENS[:, :1], 2),
                              r"seq_in: expected at least one token"),
    "generate": (lambda: AutoregressiveWrapper(wrapper()).generate(EMPTY, 3), r"prompts: expected at least one token"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_empty_sequence_is_a_clear_value_error(case, one_thread):
    torch.manual_seed(0)
    call, match = CASES[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_prepended_embeddings_alone_are_a_sequence(one_thread):
    torch.manual_seed(0)
    model = wrapper()
    out = model(EMPTY, prepend_embeds=torch.randn(2, 3, 16))
    assert out.shape == (2, 3, 20) and torch.isfinite(out).all()
    cont = continuous(dim=4, dim_out=5)
    out = cont(torch.randn(2, 0, 4), prepend_embeds=torch.randn(2, 3, 4))
    assert out.shape == (2, 3, 5) and torch.isfinite(out).all()


def test_one_token_still_runs(one_thread):
    out = wrapper()(TOKENS[:, :1])
    assert out.shape == (2, 1, 20) and torch.isfinite(out).all()
