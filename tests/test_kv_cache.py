"""``xtk.models.cache.KVCache``, the one KV-cache type of the model layer: its methods (kv_length,
first_new_position, layer_caches, append, trim, index, copy) on the caches the models return, and
that a step on a trimmed / re-indexed cache equals the step without a cache."""
from copy import copy

import pytest
import torch

import xtk
from model_helpers import perturb as _perturb
from xtk.models.cache import KVCache, trimmed_or_none
from xtk.models.intermediates import Intermediates, LayerIntermediates

pytestmark = pytest.mark.usefixtures("one_thread")

V = 20


def _lm(**kw):
    torch.manual_seed(0)
    layers = xtk.Decoder(**{**dict(dim=16, depth=2, heads=4, attn_dim_head=8), **kw})
    return _perturb(xtk.TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=layers)).eval()


def _self_kv(cache):
    return [i.cached_kv for i in cache.attn_intermediates if i.layer_type == "a"]


def test_lengths_grow_with_each_step():
    m = _lm(rotary_pos_emb=True)
    x = torch.randint(0, V, (2, 9))
    _, cache = m(x[:, :4], return_intermediates=True)
    assert isinstance(cache, KVCache) and isinstance(cache, LayerIntermediates)
    assert cache.kv_length == cache.cache_length == cache.cached_length == 4
    assert all(k.shape == (2, 4, 4, 8) and v.shape == (2, 4, 4, 8) for k, v in _self_kv(cache))  # (b, kv_heads, n, d)
    _, cache = m(x[:, :6], return_intermediates=True, cache=cache)
    assert cache.kv_length == cache.cache_length == 6


def test_first_new_position():
    cache = _lm()(torch.randint(0, V, (1, 5)), return_intermediates=True)[1]
    assert cache.first_new_position(7) == 5
    assert cache.first_new_position(4, prepend_len=2) == 3    # the cache holds 2 prepended + 3 of x
    with pytest.raises(ValueError, match="x: with a cache of 5 positions expected more than 5 tokens, got 5"):
        cache.first_new_position(5)
    with pytest.raises(ValueError, match="expected more than -1 vectors"):
        cache.first_new_position(4, prepend_len=6, what="vectors")   # fewer held than prepended


def test_trim_keeps_positions_and_continues_like_a_fresh_window():
    m = _lm(rotary_pos_emb=True, depth=1)   # one layer: the window's keys do not depend on older tokens
    x = torch.randint(0, V, (1, 10))
    _, cache = m(x[:, :8], return_intermediates=True)
    assert cache.trim(5) is True
    assert cache.kv_length == 5 and cache.cache_length == 8   # positions seen stay counted
    step, cache = m(x[:, 3:9], return_intermediates=True, cache=cache)
    torch.testing.assert_close(step, m(x[:, 3:9])[:, -1:], rtol=1e-5, atol=1e-5)


def test_trim_leaves_cross_attention_and_refuses_without_self_attention():
    m = xtk.TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=xtk.Decoder(dim=16, depth=1, heads=2,
                                                                                      cross_attend=True)).eval()
    ctx = torch.randn(2, 7, 16)
    _, cache = m(torch.randint(0, V, (2, 6)), context=ctx, return_intermediates=True)
    cross = [i.cached_kv for i in cache.attn_intermediates if i.layer_type == "c"]
    assert cache.trim(3) and cache.kv_length == 3
    assert [i.cached_kv for i in cache.attn_intermediates if i.layer_type == "c"] == cross   # untouched (7 keys)
    only_cross = KVCache(attn_intermediates=[Intermediates(cached_kv=cross[0], layer_type="c")], cache_length=6)
    assert only_cross.kv_length == 6 and only_cross.trim(3) is False
    assert only_cross.attn_intermediates[0].cached_kv is cross[0]


def test_index_follows_rows_and_step_matches():
    m = _lm(alibi_pos_bias=True)
    x = torch.randint(0, V, (2, 7))
    _, cache = m(x[:, :5], return_intermediates=True)
    rows = torch.tensor([1, 1, 0])
    before = _self_kv(cache)
    cache.index(rows)
    for (k0, v0), (k1, v1) in zip(before, _self_kv(cache)):
        assert torch.equal(k1, k0[rows]) and torch.equal(v1, v0[rows])
    step, _ = m(x[rows, :6], return_intermediates=True, cache=cache)
    torch.testing.assert_close(step, m(x[rows, :6])[:, -1:], rtol=1e-5, atol=1e-5)


def test_append_returns_a_new_cache_of_the_same_type():
    cache = _lm()(torch.randint(0, V, (1, 4)), return_intermediates=True)[1]
    cache.hiddens = ["stale"]
    entries = cache.layer_caches()
    assert entries == cache.attn_intermediates and entries is not cache.attn_intermediates
    grown = cache.append(entries, 3)
    assert type(grown) is LayerIntermediates and grown.cache_length == 7 and grown.hiddens is None
    assert cache.cache_length == 4   # self unchanged
    assert KVCache().append([], 2).cache_length == 2


def test_copy_is_independent_of_trim_and_index():
    cache = _lm()(torch.randint(0, V, (2, 6)), return_intermediates=True)[1]
    dup = copy(cache)
    dup.trim(2)
    dup.index(torch.tensor([0]))
    assert cache.kv_length == 6 and all(k.shape[0] == 2 for k, _ in _self_kv(cache))
    assert dup.kv_length == 2 and all(k.shape[0] == 1 for k, _ in _self_kv(dup))


def test_trimmed_or_none():
    cache = _lm()(torch.randint(0, V, (1, 6)), return_intermediates=True)[1]
    assert trimmed_or_none(None, 3, True) is None
    assert trimmed_or_none(object(), 3, True) is None      # a duck-typed network's cache: recompute
    assert trimmed_or_none(cache, 3, False) is None        # absolute positions: recompute
    assert cache.kv_length == 6
    assert trimmed_or_none(cache, 3, True) is cache and cache.kv_length == 3
