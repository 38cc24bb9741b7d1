"""``xtk.KVCache`` and ``xtk.PagedKVCache`` (the caches serving code owns) and the preallocated
stores the models' decoding loops use (``xtk.models.cache.StoredKV``).

A multi-layer decode through each cache object against ``xtk.attention`` on the whole sequences
(the 2x rule against fp64 through the reference, as the attention tests); page allocation is all or
nothing and freed pages are reused; every overflow refused with nothing written. The models:
generate and beam search write their keys in place (one store per layer, reused step after step)
and give the tokens of the run without a cache."""
import pytest
import torch

import xtk
from xtk.bias import Alibi, alibi_slopes
from xtk.models.cache import StoredKV, extend_kv
from xtk.reference.attention import attention as reference

from model_helpers import perturb
from tolerance import assert_close_2x

pytestmark = pytest.mark.usefixtures("one_thread")

H, HK, D, L = 4, 2, 16, 2   # query heads, kv heads, head dim, layers


def _sequence(b, n, g):
    """Per layer: q (b, H, n, D), k and v (b, HK, n, D)."""
    return [tuple(torch.randn(b, hh, n, D, generator=g) for hh in (H, HK, HK)) for _ in range(L)]


def _expected(seq, t, bias):
    """Each layer's output for position t, by the reference on the whole prefix (fp64 oracle)."""
    out = []
    for q, k, v in seq:
        f = lambda x: x.double()  # noqa: E731
        full = reference(f(q[:, :, :t + 1]), f(k[:, :, :t + 1]), f(v[:, :, :t + 1]), is_causal=True, bias=bias)
        low = reference(q[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1], is_causal=True, bias=bias)
        out.append((full[:, :, t:t + 1], low[:, :, t:t + 1]))
    return out


def _check_step(outs, seq, t, bias):
    for got, (ref64, ref_low) in zip(outs, _expected(seq, t, bias)):
        assert_close_2x(got, ref_low, ref64)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_through_every_layer_equals_attention_on_the_whole_sequence(paged):
    g = torch.Generator().manual_seed(0)
    b, n = 3, 20
    seq = _sequence(b, n, g)
    bias = Alibi(torch.tensor(alibi_slopes(H)))
    if paged:
        cache = xtk.PagedKVCache(layers=L, num_pages=8, page_size=16, kv_heads=HK, dim_head=D, max_seqs=5)
        seqs = [4, 0, 2]   # sequence slots in any order
    else:
        cache = xtk.KVCache(layers=L, batch=b, kv_heads=HK, max_len=n, dim_head=D)
    for t in range(n):
        if paged:
            cache.reserve(seqs, 1)
        kw = dict(seqs=seqs) if paged else {}
        outs = [cache.attend(layer, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], bias=bias, **kw)
                for layer, (q, k, v) in enumerate(seq)]
        cache.advance(1, **({"seqs": seqs} if paged else {}))
        if t in (0, 1, 15, 16, n - 1):   # page boundaries
            _check_step(outs, seq, t, bias)
    lengths = cache.lengths
    assert [lengths[s] for s in (seqs if paged else range(b))] == [n] * b
    assert cache.seqlens.tolist() == lengths


def test_paged_sequences_join_and_leave_at_different_steps():
    """Continuous batching: sequence slot s joins at step start[s]; one leaves (free) and its pages
    serve a newcomer; each step attends the active slots only, every one at its own length."""
    g = torch.Generator().manual_seed(2)
    n = 20
    start = {3: 0, 1: 5, 0: 9, 2: 17}    # slot -> step it joins
    seq = {s: _sequence(1, n, g) for s in start}
    bias = Alibi(torch.tensor(alibi_slopes(H)))
    cache = xtk.PagedKVCache(layers=L, num_pages=6, page_size=16, kv_heads=HK, dim_head=D, max_seqs=4)
    for t in range(n + 9):
        if t == 14:
            cache.free([1])                # slot 1 leaves after 9 positions; its pages go back
        active = [s for s in start if start[s] <= t < start[s] + n and not (s == 1 and t >= 14)]
        cache.reserve(active, 1)
        pos = {s: t - start[s] for s in active}
        outs = [cache.attend(layer, torch.cat([seq[s][layer][0][:, :, pos[s]:pos[s] + 1] for s in active]),
                             *(torch.cat([seq[s][layer][i][:, :, pos[s]:pos[s] + 1] for s in active]) for i in (1, 2)),
                             bias=bias, seqs=active) for layer in range(L)]
        cache.advance(1, active)
        for row, s in enumerate(active):
            _check_step([o[row:row + 1] for o in outs], seq[s], pos[s], bias)
    assert cache.free_pages == 6 - sum(len(cache.pages(s)) for s in range(4))


def test_kvcache_refuses_overflow_with_nothing_written():
    cache = xtk.KVCache(layers=1, batch=2, kv_heads=HK, max_len=4, dim_head=D)
    cache.advance(3)
    before = cache.k.clone()
    q, k = torch.randn(2, H, 2, D), torch.randn(2, HK, 2, D)
    with pytest.raises(ValueError, match=r"q: sequences \[0, 1\] hold \[3, 3\] positions; 2 more exceed max_len = 4"):
        cache.attend(0, q, k, k)
    with pytest.raises(ValueError, match="n: .* exceed max_len"):
        cache.advance(2)
    assert torch.equal(cache.k, before) and cache.lengths == [3, 3] and cache.seqlens.tolist() == [3, 3]
    with pytest.raises(ValueError, match=r"layer: expected a layer in \[0, 1\), got 1"):
        cache.attend(1, q[:, :, :1], k[:, :, :1], k[:, :, :1])
    cache.reset([1])
    assert cache.lengths == [3, 0] and cache.seqlens.tolist() == [3, 0]


def test_paged_reserve_is_all_or_nothing_and_free_reuses_pages():
    cache = xtk.PagedKVCache(layers=1, num_pages=4, page_size=16, kv_heads=HK, dim_head=D, max_seqs=3,
                             max_pages_per_seq=3)
    cache.reserve([0], 17)                       # two pages
    assert cache.pages(0) == [0, 1] and cache.free_pages == 2
    assert cache.block_table[0].tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="n: 4 more pages needed, 2 free in the pool; nothing was allocated"):
        cache.reserve([1, 2], 17)
    assert cache.free_pages == 2 and cache.pages(1) == [] and cache.pages(2) == []
    with pytest.raises(ValueError, match=r"n: sequences \[0\] would need more than max_pages_per_seq = 3"):
        cache.reserve([0], 64)
    q, k = torch.randn(1, H, 1, D), torch.randn(1, HK, 1, D)
    with pytest.raises(ValueError, match=r"q: sequences \[1\] have no pages reserved for 1 more positions"):
        cache.attend(0, q, k, k, seqs=[1])
    cache.free([0])
    assert cache.free_pages == 4 and cache.lengths == [0, 0, 0]
    cache.reserve([2], 1)
    assert cache.pages(2) == [0]
    with pytest.raises(ValueError, match=r"rows: expected distinct sequence ids, got \[2, 2\]"):
        cache.advance(1, [2, 2])
    with pytest.raises(ValueError, match=r"rows: expected sequence ids in \[0, 3\), got \[3\]"):
        cache.free([3])
    with pytest.raises(ValueError, match="page_size: expected a multiple of 16, got 24"):
        xtk.PagedKVCache(layers=1, num_pages=4, page_size=24, kv_heads=HK, dim_head=D, max_seqs=1)
    with pytest.raises(ValueError, match="max_len: expected an int >= 1, got 0"):
        xtk.KVCache(layers=1, batch=1, kv_heads=1, max_len=0, dim_head=D)


def test_extend_kv_writes_in_place_and_never_over_a_branch():
    g = torch.Generator().manual_seed(1)
    k0, v0 = torch.randn(2, HK, 3, D, generator=g), torch.randn(2, HK, 3, D, generator=g)
    entry = StoredKV.holding(k0, v0, 5)
    k1, v1 = torch.randn(2, HK, 1, D, generator=g), torch.randn(2, HK, 1, D, generator=g)
    ka, va, after = extend_kv(entry, k1, v1)
    assert after.store is entry.store and ka.data_ptr() == entry.store.k.data_ptr()   # in place
    assert torch.equal(ka, torch.cat((k0, k1), -2)) and torch.equal(va, torch.cat((v0, v1), -2))
    k2 = torch.randn(2, HK, 1, D, generator=g)
    kb, _, branch = extend_kv(entry, k2, k2)   # `entry` is no longer the store's newest: a new store
    assert branch.store is not entry.store and torch.equal(kb, torch.cat((k0, k2), -2))
    assert torch.equal(after[0], torch.cat((k0, k1), -2))   # the other branch is untouched
    k3 = torch.randn(2, HK, 2, D, generator=g)
    kc, _, grown = extend_kv(after, k3, k3)   # no room (4 + 2 > 5): twice as long
    assert grown.store.max_len == 12 and torch.equal(kc, torch.cat((k0, k1, k3), -2))


def _lm(**kw):
    torch.manual_seed(0)
    layers = xtk.Decoder(**{**dict(dim=32, depth=2, heads=4, attn_dim_head=8), **kw})
    return perturb(xtk.AutoregressiveWrapper(xtk.TransformerWrapper(num_tokens=20, max_seq_len=64,
                                                                      attn_layers=layers))).eval()


@pytest.mark.parametrize("layer_kw", [dict(alibi_pos_bias=True), dict(rel_pos_bias=True),
                                      dict(dynamic_pos_bias=True), dict(rotary_pos_emb=True, rotary_xpos=True),
                                      dict(attn_kv_heads=2, attn_qk_norm=True, rotary_pos_emb=True)])
def test_generate_writes_in_place_and_equals_uncached(layer_kw):
    m = _lm(**layer_kw)
    prompt = torch.randint(0, 20, (2, 5))
    out, cache = m.generate(prompt, 12, temperature=0., return_intermediates=True)
    assert torch.equal(out, m.generate(prompt, 12, temperature=0., cache_kv=False))
    entries = [i.cached_kv for i in cache.attn_intermediates]
    assert all(isinstance(e, StoredKV) and e.store.max_len == 5 + 11 and e.length == 16 for e in entries)
    assert torch.equal(m.beam_search(prompt, 6, beams=3), m.beam_search(prompt, 6, beams=3, cache_kv=False))
