"""Hugging Face transformers with ``attn_implementation="xtk"`` against the same model with "eager".

Tiny configs built with ``from_config`` (nothing is downloaded), the same weights everywhere; fp32
logits and every parameter gradient by the 2x rule (xtk vs "eager", both fp32) against the model in
fp64 -- run with "sdpa" there: "eager" takes its softmax in fp32, where fp64's masked-out minimum
becomes -inf and a fully padded row NaN -- with and without left padding (padded positions carry no
loss); greedy ``generate()`` with transformers' own cache gives the same tokens.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import xtk.integrations.hf  # noqa: E402,F401  (registers "xtk")

from tolerance import assert_close_2x  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **SMALL),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **SMALL),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=1, **SMALL),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(rotary_pct=0.5, **SMALL),
    "gemma": lambda: transformers.GemmaConfig(num_key_value_heads=2, head_dim=16, **SMALL),
    "qwen3": lambda: transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **SMALL),   # QK-norm in HF's code
    "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                            **SMALL),
}
SEQ2SEQ = {   # encoder-decoders: encoder self-attention (padding mask), causal decoder, cross-attention
    "bart": lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=97, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64)),
    "whisper": lambda: transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=97, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, num_mel_bins=16, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
}


def _models(family):
    torch.manual_seed(0)
    cfg = FAMILIES[family]()
    eager = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation("xtk")
    oracle = copy.deepcopy(eager).double()
    oracle.set_attn_implementation("sdpa")
    return ours, eager, oracle


def _batch(padded: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    if padded:
        mask[1, :4] = 0  # left padding of the second sequence
    return ids, mask


def _run(model, ids, mask):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()[..., None]
    torch.where(keep, logits.double(), 0.0).square().mean().backward()  # padded positions carry no loss
    return torch.where(keep, logits.detach(), 0.0), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_xtk_attention_equals_eager(family, padded):
    ours, eager, oracle = _models(family)
    assert ours.config._attn_implementation == "xtk"
    ids, mask = _batch(padded)
    runs = [_run(m, ids, mask) for m in (ours, eager, oracle)]
    assert_close_2x(*(r[0] for r in runs), "logits")
    for name in runs[0][1]:
        assert_close_2x(*(r[1][name] for r in runs), f"grad of {name}")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_generation_gives_the_same_tokens(family):
    ours, eager, _ = _models(family)
    ids, mask = _batch(True)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))


def test_softcap_and_attention_weights_are_refused_by_name():
    from xtk.integrations.hf import xtk_attention_forward
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap: attn_implementation='xtk' has no logit soft-capping"):
        xtk_attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match="output_attentions: attn_implementation='xtk' never forms"):
        xtk_attention_forward(torch.nn.Module(), q, q, q, None, output_attentions=True)


def _seq2seq(family):
    torch.manual_seed(0)
    eager = SEQ2SEQ[family]().eval()
    eager.set_attn_implementation("eager")
    with torch.no_grad():   # larger weights: logits that differ between tokens, so generate can fail
        for p in eager.parameters():
            p.mul_(3.0)
    ours, oracle = copy.deepcopy(eager), copy.deepcopy(eager).double()
    ours.set_attn_implementation("xtk")
    oracle.set_attn_implementation("sdpa")
    return ours, eager, oracle


def _seq2seq_inputs(family, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    dec = torch.randint(3, 97, (2, 6), generator=g)
    if family == "whisper":
        return dict(input_features=torch.randn(2, 16, 32, generator=g).to(dtype), decoder_input_ids=dec)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0   # right padding of the second source
    return dict(input_ids=torch.randint(3, 97, (2, 9), generator=g), attention_mask=mask, decoder_input_ids=dec)


@pytest.mark.parametrize("family", list(SEQ2SEQ))
def test_encoder_decoder_equals_eager(family):
    models = _seq2seq(family)
    assert models[0].config._attn_implementation == "xtk"
    runs = []
    for m in models:
        m.zero_grad()
        kw = _seq2seq_inputs(family, torch.float64 if m is models[2] else torch.float32)
        logits = m(**kw).logits
        logits.double().square().mean().backward()
        runs.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    assert_close_2x(*(r[0] for r in runs), "logits")
    assert set(runs[0][1]) == set(runs[1][1])
    for name in runs[0][1]:
        assert_close_2x(*(r[1][name] for r in runs), f"grad of {name}")


@pytest.mark.parametrize("family", list(SEQ2SEQ))
def test_encoder_decoder_greedy_generation_gives_the_same_tokens(family):
    ours, eager, _ = _seq2seq(family)
    kw = {k: v for k, v in _seq2seq_inputs(family).items() if k != "decoder_input_ids"}
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1)   # no early EOS: 6 tokens compared
    a, b = ours.generate(**kw, **gen), eager.generate(**kw, **gen)
    assert torch.equal(a, b) and len(set(a.flatten().tolist())) > 2


def test_padding_reaches_the_kernel_as_a_key_row_with_causal_masking(monkeypatch):
    """Causal + key padding arrives as one key row (b, 1, 1, kv) and the kernel's causal flag (no
    (b, 1, q, kv) mask built); a sliding window (Mistral, window 4) keeps SDPA's full mask and still
    equals eager."""
    from xtk.integrations import hf
    seen = []
    real = hf.attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((None if attn_mask is None else tuple(attn_mask.shape), is_causal, kw.get("q_offset")))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
    monkeypatch.setattr(hf, "attention", spy)
    ours, eager, _ = _models("llama")
    ids, mask = _batch(True)
    ours(input_ids=ids, attention_mask=mask)
    assert seen and all(s == ((2, 1, 1, 11), True, 0) for s in seen), seen
    seen.clear()
    ours(input_ids=ids)   # no padding mask at all: the kernel's causal flag alone
    assert seen and all(s == (None, True, 0) for s in seen), seen

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(num_key_value_heads=2, sliding_window=4, **SMALL)
    eager = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation("xtk")
    seen.clear()
    got = ours(input_ids=ids, attention_mask=mask).logits
    assert seen and all(s[0] == (2, 1, 11, 11) and not s[1] for s in seen), seen
    keep = mask.bool()[..., None]
    want = eager(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(torch.where(keep, got, 0.0), torch.where(keep, want, 0.0), atol=1e-5, rtol=1e-4)


def test_several_new_tokens_after_a_cache_use_bottom_right_causal_masking():
    """A call with a cache and 5 new tokens (queries the last 5 of 11 positions), left padding: the key
    row with bottom-right causality equals eager."""
    ours, eager, _ = _models("llama")
    ids, mask = _batch(True)
    outs = []
    for m in (ours, eager):
        with torch.no_grad():
            past = m(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True).past_key_values
            outs.append(m(input_ids=ids[:, 6:], attention_mask=mask, past_key_values=past).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
