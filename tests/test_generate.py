"""AutoregressiveWrapper / ContinuousAutoregressiveWrapper: loss, sampling, KV-cached generation.

The central property: greedy decoding (temperature 0) gives the same tokens with and without
the KV cache, and with the cache every step after the first feeds only the new token through
the network. Exact eos / filter behaviour is checked on a tiny deterministic network.
"""
import pytest
import torch
from torch import nn

import x_transformers as xt
from x_transformers.autoregressive_wrapper import top_k as xt_top_k, top_p as xt_top_p

from xtk.models.autoregressive import AutoregressiveWrapper, top_k, top_p
import xtk
from xtk import TransformerWrapper, Decoder, XTransformer, ContinuousTransformerWrapper, ContinuousAutoregressiveWrapper


def copy_weights(net, ref):
    """Give the xtk model ``net`` the weights of the x-transformers model ``ref``."""
    xtk.load_x_transformers_weights(net, ref.state_dict())


V = 37  # vocabulary size, not a power of two


pytestmark = pytest.mark.usefixtures("one_thread")


def lm(max_seq_len=24, seed=0, wrapper_kw=None, **layer_kw):
    torch.manual_seed(seed)
    layer = dict(dim=16, depth=2, heads=2)
    layer.update(layer_kw)
    net = TransformerWrapper(num_tokens=V, max_seq_len=max_seq_len, attn_layers=Decoder(**layer),
                             **(wrapper_kw or {}))
    return net.eval()


class TokenCounter:
    """Counts the sequence rows every nn.Linear of a network sees, per network call."""

    def __init__(self, net):
        self.calls, self._cur = [], None
        self.handles = [m.register_forward_hook(self._hook) for m in net.modules() if isinstance(m, nn.Linear)]
        self.handles.append(net.register_forward_pre_hook(self._start))
        self.handles.append(net.register_forward_hook(self._end))

    def _start(self, mod, args):
        self._cur = 0

    def _hook(self, mod, args, out):
        x = args[0]
        if x.dim() >= 2:
            self._cur = max(self._cur, x.shape[-2])

    def _end(self, mod, args, out):
        self.calls.append(self._cur)

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------ greedy: cache == no cache

@pytest.mark.parametrize("layer_kw", [
    dict(),                                   # absolute positions
    dict(rotary_pos_emb=True),
    dict(alibi_pos_bias=True, heads=4),
    dict(rel_pos_bias=True),
    dict(attn_kv_heads=1, heads=4, rotary_pos_emb=True),  # GQA
])
def test_greedy_cached_equals_uncached(layer_kw):
    net = lm(**layer_kw)
    w = AutoregressiveWrapper(net)
    prompts = torch.randint(0, V, (3, 5))
    counter = TokenCounter(net)
    cached = w.generate(prompts, 12, temperature=0., cache_kv=True)
    steps_cached = counter.calls
    counter.calls = []
    plain = w.generate(prompts, 12, temperature=0., cache_kv=False)
    steps_plain = counter.calls
    counter.remove()
    assert cached.shape == (3, 12)
    assert torch.equal(cached, plain)
    # with the cache only the new token goes through the layers after the prompt
    assert steps_cached[0] == 5 and all(n == 1 for n in steps_cached[1:]), steps_cached
    assert steps_plain == list(range(5, 17))


def test_greedy_matches_x_transformers_generate():
    net = lm(rotary_pos_emb=True)
    ref = xt.TransformerWrapper(num_tokens=V, max_seq_len=24,
                                attn_layers=xt.Decoder(dim=16, depth=2, heads=2, rotary_pos_emb=True)).eval()
    copy_weights(net, ref)
    prompts = torch.randint(0, V, (2, 4))
    ours = AutoregressiveWrapper(net).generate(prompts, 10, temperature=0.)
    theirs = xt.AutoregressiveWrapper(ref).generate(prompts, 10, temperature=0.)
    assert torch.equal(ours, theirs)


def test_greedy_cached_with_prompt_mask():
    net = lm(rotary_pos_emb=True)
    w = AutoregressiveWrapper(net)
    prompts = torch.randint(0, V, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :3] = False
    a = w.generate(prompts, 8, temperature=0., mask=mask, cache_kv=True)
    b = w.generate(prompts, 8, temperature=0., mask=mask, cache_kv=False)
    assert torch.equal(a, b)
    # the unmasked row decodes as without a mask
    c = w.generate(prompts, 8, temperature=0.)
    assert torch.equal(a[1], c[1])


def test_greedy_cached_variable_length_prompts():
    net = lm(rotary_pos_emb=True)
    w = AutoregressiveWrapper(net)
    p0, p1 = torch.randint(0, V, (3,)), torch.randint(0, V, (6,))
    a = w.generate([p0, p1], 7, temperature=0., cache_kv=True)
    b = w.generate([p0, p1], 7, temperature=0., cache_kv=False)
    assert torch.equal(a, b)
    # a left-padded short prompt decodes like the same prompt alone
    alone = w.generate(p0[None], 7, temperature=0.)
    assert torch.equal(a[0], alone[0])


def test_cache_dropped_past_max_seq_len_with_absolute_positions():
    # absolute positions cannot slide a cached window: generation past max_seq_len recomputes
    net = lm(max_seq_len=10)
    w = AutoregressiveWrapper(net)
    prompts = torch.randint(0, V, (2, 4))
    a = w.generate(prompts, 15, temperature=0., cache_kv=True)
    b = w.generate(prompts, 15, temperature=0., cache_kv=False)
    assert a.shape == (2, 15) and torch.equal(a, b)


def test_one_dim_prompt():
    w = AutoregressiveWrapper(lm())
    p = torch.randint(0, V, (5,))
    out = w.generate(p, 6, temperature=0.)
    assert out.shape == (6,)
    assert torch.equal(out, w.generate(p[None], 6, temperature=0.)[0])


def test_generate_keeps_training_mode_and_no_grad():
    net = lm().train()
    w = AutoregressiveWrapper(net).train()
    out = w.generate(torch.randint(0, V, (1, 3)), 3)
    assert w.training and net.training
    assert not out.requires_grad


# ------------------------------------------------------------------ exact behaviour on a counting network

class Counter(nn.Module):
    """Always predicts (last token + 1) mod V, with a strong margin; supports the cache protocol."""
    max_seq_len = 64
    can_cache_kv = True

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, return_intermediates=False, cache=None, **kwargs):
        self.seen.append(x.shape[1])
        logits = torch.nn.functional.one_hot((x + 1) % V, V).float() * 10 + self.dummy
        if cache is not None:
            logits = logits[:, -1:]
        return (logits, object()) if return_intermediates else logits


def test_eos_stops_and_pads_after_eos():
    net = Counter()
    w = AutoregressiveWrapper(net, pad_value=-1)
    prompts = torch.tensor([[3], [7]])
    out = w.generate(prompts, 20, temperature=0., eos_token=9)
    # row 0: 4 5 6 7 8 9 then padding; row 1 reaches 9 after two tokens; all rows done at step 6
    assert out.tolist() == [[4, 5, 6, 7, 8, 9], [8, 9, -1, -1, -1, -1]]
    assert len(net.seen) == 6


def test_eos_in_prompt_does_not_stop():
    w = AutoregressiveWrapper(Counter())
    out = w.generate(torch.tensor([[9, 0]]), 3, temperature=0., eos_token=9)
    assert out.tolist() == [[1, 2, 3]]


def test_sampling_with_top_k_one_is_greedy():
    w = AutoregressiveWrapper(lm(rotary_pos_emb=True))
    prompts = torch.randint(0, V, (2, 4))
    greedy = w.generate(prompts, 6, temperature=0.)
    sampled = w.generate(prompts, 6, temperature=1., filter_logits_fn=top_k, filter_kwargs=dict(k=1))
    assert torch.equal(greedy, sampled)
    by_name = w.generate(prompts, 6, temperature=0.7, filter_logits_fn="top_p", filter_kwargs=dict(thres=1e-6))
    assert torch.equal(greedy, by_name)
    old_style = w.generate(prompts, 6, temperature=0.7, filter_logits_fn=top_k, filter_thres=0.99)
    assert torch.equal(greedy, old_style)  # keeps ceil(0.01 * 37) = 1 token


def test_sampling_stays_in_filtered_set():
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    allowed = logits.topk(5, dim=-1).indices
    w = AutoregressiveWrapper(Counter())
    w.net.forward = lambda x, return_intermediates=False, cache=None, **kw: (logits[:, None].expand(-1, x.shape[1], -1), None)
    out = w.generate(torch.zeros(4, 1, dtype=torch.long), 30, temperature=2., filter_kwargs=dict(k=5), cache_kv=False)
    for row, ok in zip(out, allowed):
        assert set(row.tolist()) <= set(ok.tolist())


@pytest.mark.parametrize("shape", [(3, 37), (2, 1), (1, 200)])
def test_filters_match_x_transformers(shape):
    torch.manual_seed(0)
    logits = torch.randn(shape)
    assert torch.equal(top_k(logits), xt_top_k(logits))
    assert torch.equal(top_k(logits, k=3), xt_top_k(logits, k=3))
    assert torch.equal(top_k(logits, frac_num_tokens=0.5), xt_top_k(logits, frac_num_tokens=0.5))
    for thres in (0.1, 0.5, 0.9, 1.0):
        assert torch.equal(top_p(logits, thres=thres), xt_top_p(logits, thres=thres))


def test_top_p_keeps_token_that_crosses_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p(logits, thres=0.6))
    assert kept.tolist() == [[True, True, False, False]]


# ------------------------------------------------------------------ training loss

def test_loss_matches_x_transformers_wrapper():
    net = lm(rotary_pos_emb=True)
    ref = xt.TransformerWrapper(num_tokens=V, max_seq_len=24,
                                attn_layers=xt.Decoder(dim=16, depth=2, heads=2, rotary_pos_emb=True)).eval()
    copy_weights(net, ref)
    x = torch.randint(0, V, (2, 11))
    x[1, 8:] = -100  # padding marked with ignore_index
    ours = AutoregressiveWrapper(net)(x)
    theirs = xt.AutoregressiveWrapper(ref)(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    lens = torch.tensor([11, 6])
    torch.testing.assert_close(AutoregressiveWrapper(net)(x, lens=lens),
                               xt.AutoregressiveWrapper(ref)(x, lens=lens), rtol=1e-5, atol=1e-5)


def test_loss_is_next_token_cross_entropy():
    net = lm()
    x = torch.randint(0, V, (2, 9))
    loss = AutoregressiveWrapper(net)(x)
    logits = net(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_mask_prob_matches_x_transformers_wrapper():
    net = lm()
    ref = xt.TransformerWrapper(num_tokens=V, max_seq_len=24,
                                attn_layers=xt.Decoder(dim=16, depth=2, heads=2)).eval()
    copy_weights(net, ref)
    x = torch.randint(0, V, (2, 20))
    torch.manual_seed(5)
    ours = AutoregressiveWrapper(net, mask_prob=0.25)(x)
    torch.manual_seed(5)
    theirs = xt.AutoregressiveWrapper(ref, mask_prob=0.25)(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and the masking does change the loss
    assert not torch.allclose(ours, AutoregressiveWrapper(net)(x))


def test_mask_prob_never_hides_first_token():
    seen = {}

    class Spy(Counter):
        def forward(self, x, **kwargs):
            seen.update(kwargs)
            return super().forward(x)

    x = torch.randint(0, V, (4, 10))
    AutoregressiveWrapper(Spy(), mask_prob=0.5)(x)
    m = seen["self_attn_kv_mask"]
    assert m.shape == (4, 10) and m.dtype == torch.bool
    assert m[:, 0].all() and (m.sum(-1) == 5).all()


# ------------------------------------------------------------------ bad input

def test_errors_name_the_argument():
    w = AutoregressiveWrapper(lm())
    p = torch.randint(0, V, (1, 3))
    with pytest.raises(ValueError, match="seq_len"):
        w.generate(p, 0)
    with pytest.raises(TypeError, match="seq_len"):
        w.generate(p, 2.5)
    with pytest.raises(TypeError, match="prompts.*integer.*float"):
        w.generate(p.float(), 3)
    with pytest.raises(ValueError, match="prompts.*1.*2.*-D"):
        w.generate(p[None], 3)
    with pytest.raises(ValueError, match="temperature"):
        w.generate(p, 3, temperature=-1.)
    with pytest.raises(ValueError, match="filter_logits_fn"):
        w.generate(p, 3, filter_logits_fn="top_q")
    with pytest.raises(ValueError, match="mask"):
        w.generate(p, 3, mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_prob"):
        AutoregressiveWrapper(lm(), mask_prob=1.)
    with pytest.raises(TypeError, match="net"):
        AutoregressiveWrapper(object())
    with pytest.raises(ValueError, match="x: expected at least 2 tokens"):
        w(torch.randint(0, V, (2, 1)))
    with pytest.raises(TypeError, match="x: expected an integer"):
        w(torch.randn(2, 5))


# ------------------------------------------------------------------ more cache variants

def test_greedy_cached_with_transformer_xl_mems():
    net = lm(max_seq_len=16, wrapper_kw=dict(max_mem_len=8), rel_pos_bias=True)
    _, mems = net(torch.randint(0, V, (2, 8)), return_mems=True)
    w = AutoregressiveWrapper(net)
    prompts = torch.randint(0, V, (2, 4))
    a = w.generate(prompts, 6, temperature=0., mems=mems, cache_kv=True)
    b = w.generate(prompts, 6, temperature=0., mems=mems, cache_kv=False)
    assert torch.equal(a, b)


def test_sliding_window_cache_matches_x_transformers():
    # rotary positions allow a cached window past max_seq_len: the cache is cut to max_seq_len - 1
    # keys each step, exactly as x-transformers does it
    kw = dict(dim=16, depth=2, heads=2, rotary_pos_emb=True)
    net = lm(max_seq_len=10, **kw)
    ref = xt.TransformerWrapper(num_tokens=V, max_seq_len=10, attn_layers=xt.Decoder(**kw)).eval()
    copy_weights(net, ref)
    prompts = torch.randint(0, V, (2, 4))
    ours = AutoregressiveWrapper(net).generate(prompts, 14, temperature=0.)
    theirs = xt.AutoregressiveWrapper(ref).generate(prompts, 14, temperature=0.)
    assert torch.equal(ours, theirs)
    # without the cache every step re-reads the last max_seq_len tokens, also as x-transformers does
    ours = AutoregressiveWrapper(net).generate(prompts, 14, temperature=0., cache_kv=False)
    theirs = xt.AutoregressiveWrapper(ref).generate(prompts, 14, temperature=0., cache_kv=False)
    assert torch.equal(ours, theirs)


def _xtransformer_pair(**kw):
    base = dict(dim=16, enc_num_tokens=V, enc_depth=1, enc_heads=2, enc_max_seq_len=16,
                dec_num_tokens=V, dec_depth=2, dec_heads=2, dec_max_seq_len=24)
    base.update(kw)
    torch.manual_seed(0)
    ref = xt.XTransformer(**base).eval()
    ours = XTransformer(**base).eval()
    xtk.load_x_transformers_weights(ours, ref.state_dict())
    return ours, ref


def test_xtransformer_generate_cached_equals_uncached_and_x_transformers():
    ours, ref = _xtransformer_pair(dec_rotary_pos_emb=True)
    src = torch.randint(0, V, (2, 9))
    mask = torch.ones_like(src).bool()
    mask[1, 6:] = False
    start = torch.randint(0, V, (2, 1))
    counter = TokenCounter(ours.decoder.net)
    a = ours.generate(src, start, 10, mask=mask, temperature=0.)
    assert all(n == 1 for n in counter.calls[1:]), counter.calls
    counter.remove()
    b = ours.generate(src, start, 10, mask=mask, temperature=0., cache_kv=False)
    c = ref.generate(src, start, 10, mask=mask, temperature=0.)
    assert a.shape == (2, 10)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_continuous_generate_cached_equals_uncached_and_x_transformers():
    kw = dict(dim=16, depth=2, heads=2)
    for rotary in (False, True):
        torch.manual_seed(0)
        ref = xt.ContinuousTransformerWrapper(dim_in=5, dim_out=5, max_seq_len=12,
                                              attn_layers=xt.Decoder(rotary_pos_emb=rotary, **kw)).eval()
        net = ContinuousTransformerWrapper(dim_in=5, dim_out=5, max_seq_len=12,
                                           attn_layers=Decoder(rotary_pos_emb=rotary, **kw)).eval()
        copy_weights(net, ref)
        start = torch.randn(2, 3, 5)
        w = ContinuousAutoregressiveWrapper(net)
        counter = TokenCounter(net)
        a = w.generate(start, 7)
        assert counter.calls[0] == 3 and all(n == 1 for n in counter.calls[1:]), counter.calls
        counter.remove()
        b = w.generate(start, 7, cache_kv=False)
        c = xt.ContinuousAutoregressiveWrapper(ref).generate(start, 7)
        assert a.shape == (2, 7, 5)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    assert w.generate(start[0], 2).shape == (2, 5)  # (n, d) start gives (seq_len, d)


def test_continuous_probabilistic_generate_samples():
    net = ContinuousTransformerWrapper(dim_in=4, dim_out=4, max_seq_len=12, probabilistic=True,
                                       attn_layers=Decoder(dim=16, depth=1, heads=2)).eval()
    w = ContinuousAutoregressiveWrapper(net)
    start = torch.randn(1, 2, 4)
    torch.manual_seed(0)
    a = w.generate(start, 4)
    torch.manual_seed(1)
    b = w.generate(start, 4)
    assert a.shape == (1, 4, 4) and not torch.equal(a, b)
    # temperature 0: the mean, deterministic, cache or not
    torch.testing.assert_close(w.generate(start, 4, temperature=0.), w.generate(start, 4, temperature=0., cache_kv=False),
                               rtol=1e-4, atol=1e-5)


def test_loss_with_prepend_embeds_matches_x_transformers():
    net = lm()
    ref = xt.TransformerWrapper(num_tokens=V, max_seq_len=24, attn_layers=xt.Decoder(dim=16, depth=2, heads=2)).eval()
    copy_weights(net, ref)
    x = torch.randint(0, V, (2, 9))
    prepend = torch.randn(2, 3, 16)
    ours, (logits, inter) = AutoregressiveWrapper(net)(x, prepend_embeds=prepend, return_outputs=True)
    theirs = xt.AutoregressiveWrapper(ref)(x, prepend_embeds=prepend)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 8, V) and inter is not None


def test_generate_with_memory_tokens_falls_back_to_full_recompute():
    net = lm(wrapper_kw=dict(num_memory_tokens=2), rotary_pos_emb=True)
    assert not net.can_cache_kv
    w = AutoregressiveWrapper(net)
    prompts = torch.randint(0, V, (2, 3))
    counter = TokenCounter(net)
    a = w.generate(prompts, 5, temperature=0.)  # cache_kv=True is ignored: the model cannot cache
    assert counter.calls == [5, 6, 7, 8, 9]     # 2 memory tokens + the sequence so far
    counter.remove()
    assert torch.equal(a, w.generate(prompts, 5, temperature=0., cache_kv=False))


def test_generate_return_intermediates_gives_cache():
    w = AutoregressiveWrapper(lm(rotary_pos_emb=True))
    out, cache = w.generate(torch.randint(0, V, (1, 4)), 3, temperature=0., return_intermediates=True)
    assert out.shape == (1, 3)
    assert cache.cached_length == 6  # the prompt and the first two new tokens went through the layers


# ------------------------------------------------------------------ beam search

@pytest.mark.parametrize("layer_kw", [dict(rotary_pos_emb=True), dict()])
def test_beam_search_matches_x_transformers(layer_kw):
    kw = dict(dim=16, depth=2, heads=2, **layer_kw)
    net = lm(**kw)
    ref = xt.TransformerWrapper(num_tokens=V, max_seq_len=24, attn_layers=xt.Decoder(**kw)).eval()
    copy_weights(net, ref)
    prompts = torch.randint(0, V, (3, 4))
    w, rw = AutoregressiveWrapper(net), xt.AutoregressiveWrapper(ref)
    best = w.beam_search(prompts, 6, beams=3)
    assert torch.equal(best, rw.beam_search(prompts, 6, beams=3))
    assert torch.equal(best, w.beam_search(prompts, 6, beams=3, cache_kv=False))
    out, scores = w.beam_search(prompts, 6, beams=3, return_beams_and_scores=True)
    ref_out, ref_scores = rw.beam_search(prompts, 6, beams=3, return_beams_and_scores=True)
    assert out.shape == (3, 3, 6) and scores.shape == (3, 3)
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert (scores[:-1] >= scores[1:]).all()  # best first
    # one beam is greedy decoding
    assert torch.equal(w.beam_search(prompts, 6, beams=1), w.generate(prompts, 6, temperature=0.))
    assert w.beam_search(prompts[0], 3).shape == (3,)


def test_beam_search_with_encoder_context_follows_beams():
    ours, _ = _xtransformer_pair(dec_rotary_pos_emb=True)
    src = torch.randint(0, V, (2, 9))
    mask = torch.ones_like(src).bool()
    mask[1, 5:] = False
    enc = ours.encoder(src, mask=mask, return_embeddings=True)
    start = torch.randint(0, V, (2, 1))
    w = ours.decoder
    a = w.beam_search(start, 5, beams=3, context=enc, context_mask=mask)
    b = w.beam_search(start, 5, beams=3, context=enc, context_mask=mask, cache_kv=False)
    assert torch.equal(a, b)
    # each row decodes as it would alone
    alone = w.beam_search(start[1:], 5, beams=3, context=enc[1:], context_mask=mask[1:])
    assert torch.equal(a[1], alone[0])


def test_beam_search_errors():
    w = AutoregressiveWrapper(lm())
    p = torch.randint(0, V, (1, 3))
    with pytest.raises(ValueError, match="eos_token"):
        w.beam_search(p, 3, eos_token=1)
    with pytest.raises(ValueError, match="beams"):
        w.beam_search(p, 3, beams=0)
    with pytest.raises(TypeError, match="prompts"):
        w.beam_search(p.float(), 3)


def test_contrastive_decoding_matches_x_transformers():
    kw = dict(dim=16, depth=2, heads=2, rotary_pos_emb=True)
    expert, amateur = lm(seed=0, **kw), lm(seed=1, depth=1, dim=16, heads=2, rotary_pos_emb=True)
    torch.manual_seed(0)
    ref_expert = xt.TransformerWrapper(num_tokens=V, max_seq_len=24, attn_layers=xt.Decoder(**kw)).eval()
    ref_amateur = xt.TransformerWrapper(num_tokens=V, max_seq_len=24,
                                        attn_layers=xt.Decoder(dim=16, depth=1, heads=2, rotary_pos_emb=True)).eval()
    copy_weights(expert, ref_expert)
    copy_weights(amateur, ref_amateur)
    prompts = torch.randint(0, V, (2, 4))
    ours = AutoregressiveWrapper(expert).generate(prompts, 8, temperature=0., amateur_model=amateur)
    theirs = xt.AutoregressiveWrapper(ref_expert).generate(prompts, 8, temperature=0., amateur_model=ref_amateur)
    assert torch.equal(ours, theirs)
    plain = AutoregressiveWrapper(expert).generate(prompts, 8, temperature=0., amateur_model=amateur, cache_kv=False)
    assert torch.equal(ours, plain)
    wrapped = AutoregressiveWrapper(expert).generate(prompts, 8, temperature=0.,
                                                     amateur_model=(AutoregressiveWrapper(amateur),),
                                                     contrastive_decode_kwargs=(dict(alpha=0.1, beta=0.5),))
    assert torch.equal(ours, wrapped)


# every seed attention-layer feature keeps cached greedy decoding identical to a full re-run
@pytest.mark.parametrize("layer_kw", [
    dict(attn_num_mem_kv=2), dict(dynamic_pos_bias=True), dict(rotary_xpos=True), dict(attn_qk_norm=True),
    dict(attn_qk_norm=True, attn_qk_norm_dim_scale=True), dict(attn_qk_norm=True, attn_qk_norm_groups=2),
    dict(ff_glu=True, use_rmsnorm=True), dict(ff_swish=True, ff_glu=True, ff_no_bias=True), dict(ff_relu_squared=True),
    dict(sandwich_norm=True), dict(attn_sparse_topk=3), dict(macaron=True), dict(residual_attn=True),
    dict(attn_talking_heads=True), dict(attn_on_attn=True), dict(attn_gate_values=True), dict(gate_values=True),
    dict(attn_head_scale=True), dict(ff_post_act_ln=True), dict(scale_residual=True), dict(gate_residual=True),
    dict(use_scalenorm=True), dict(deepnorm=True), dict(pre_norm=False), dict(shift_tokens=1),
    dict(attn_use_entmax15=True), dict(attn_collab_heads=True, attn_collab_compression=.5),
    dict(position_infused_attn=True), dict(use_rezero=True), dict(sandwich_coef=2), dict(alibi_pos_emb=True, heads=4,
    alibi_num_heads=2), dict(rel_pos_bias=True, attn_kv_heads=1, heads=4), dict(attn_one_kv_head=True, heads=4),
], ids=lambda kw: "-".join(kw))
def test_greedy_cache_feature_sweep(layer_kw):
    net = lm(**layer_kw)
    w = AutoregressiveWrapper(net)
    prompts = torch.randint(0, V, (2, 5))
    a = w.generate(prompts, 6, temperature=0., cache_kv=True)
    b = w.generate(prompts, 6, temperature=0., cache_kv=False)
    assert torch.equal(a, b)


def test_continuous_generate_with_start_mask():
    torch.manual_seed(0)
    net = ContinuousTransformerWrapper(dim_in=5, dim_out=5, max_seq_len=12,
                                       attn_layers=Decoder(dim=16, depth=2, heads=2, rotary_pos_emb=True)).eval()
    w = ContinuousAutoregressiveWrapper(net)
    start = torch.randn(2, 4, 5)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, :2] = False
    a = w.generate(start, 10, mask=mask)  # runs past max_seq_len: the window slides, the mask with it
    b = w.generate(start, 10, mask=mask, cache_kv=False)
    assert a.shape == (2, 10, 5)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=1e-4, atol=1e-5)  # within max_seq_len: identical
    unmasked = w.generate(start, 3)
    torch.testing.assert_close(a[1, :3], unmasked[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a[0, :3], unmasked[0])


def test_continuous_generate_with_prepend_embeds_cached_equals_uncached():
    torch.manual_seed(0)
    net = ContinuousTransformerWrapper(dim_in=5, dim_out=5, max_seq_len=12,
                                       attn_layers=Decoder(dim=16, depth=2, heads=2, rotary_pos_emb=True)).eval()
    w = ContinuousAutoregressiveWrapper(net)
    start, prepend = torch.randn(2, 3, 5), torch.randn(2, 2, 16)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    for kw in (dict(), dict(mask=mask)):
        a = w.generate(start, 4, prepend_embeds=prepend, **kw)
        b = w.generate(start, 4, prepend_embeds=prepend, cache_kv=False, **kw)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, w.generate(start, 4, mask=mask))


def test_greedy_cached_with_prepend_embeds_and_masks():
    net = lm(rotary_pos_emb=True)
    w = AutoregressiveWrapper(net)
    prompts, prepend = torch.randint(0, V, (2, 4)), torch.randn(2, 3, 16)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, :2] = False
    prepend_mask = torch.ones(2, 3, dtype=torch.bool)
    prepend_mask[1, 0] = False
    for kw in (dict(), dict(mask=mask), dict(prepend_mask=prepend_mask), dict(mask=mask, prepend_mask=prepend_mask)):
        a = w.generate(prompts, 6, temperature=0., prepend_embeds=prepend, **kw)
        b = w.generate(prompts, 6, temperature=0., prepend_embeds=prepend, cache_kv=False, **kw)
        assert torch.equal(a, b), kw


def test_prompt_lens_match_x_transformers_generate_and_beam_search():
    kw = dict(dim=16, depth=2, heads=2, rotary_pos_emb=True)
    net = lm(**kw)
    ref = xt.TransformerWrapper(num_tokens=V, max_seq_len=24, attn_layers=xt.Decoder(**kw)).eval()
    copy_weights(net, ref)
    w, rw = AutoregressiveWrapper(net), xt.AutoregressiveWrapper(ref)
    prompts, lens = torch.randint(0, V, (2, 5)), torch.tensor([3, 5])
    assert torch.equal(w.generate(prompts, 5, temperature=0., prompt_lens=lens),
                       rw.generate(prompts, 5, temperature=0., prompt_lens=lens))
    best = w.beam_search(prompts, 5, beams=3, prompt_lens=lens)
    assert torch.equal(best, rw.beam_search(prompts, 5, beams=3, prompt_lens=lens))
    assert torch.equal(best, w.beam_search(prompts, 5, beams=3, prompt_lens=lens, cache_kv=False))
