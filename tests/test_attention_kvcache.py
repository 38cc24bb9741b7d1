"""``xtk.attention_with_kvcache`` against the reference on each sequence's logical keys.

The oracle never reads the cache: each sequence's keys and values are made first (``(hk, L, d)``), then
placed into a contiguous cache (rows permuted by ``cache_batch_idx``) or into shuffled pages of a paged
one; the reference runs on the logical tensors with the positions the API defines (query ``i`` of
sequence ``b`` at ``cache_seqlens[b] - k_prefix + i``). Values by the 2x rule against fp64 (decode is
inference); ragged lengths (1, page boundaries +-1, the full cache), GQA 8->2 and 8->1, every position
bias, top-k, QK-norm + rotary, memory key/values, new keys written in place; every bad input refused
by name with the cache untouched.
"""
import os

import pytest
import torch

import xtk
from xtk.bias import Alibi, Dense, DistanceTable, T5, alibi_slopes
from xtk.qk import QKNorm, Rotary, rotary_inv_freq, xpos_scale
from xtk.reference.attention import attention as reference

from tolerance import assert_close_2x

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
BACKENDS = ["chunked", "eager"] + (["triton"] if CUDA or os.environ.get("TRITON_INTERPRET") == "1" else [])
D, CAP = 16, 128  # head dim; slots per sequence (8 pages of 16, 2 of 64)


def _bias(feature, h):
    if feature == "alibi":
        return Alibi(torch.tensor(alibi_slopes(h), device=DEV))
    if feature == "t5":
        return T5(torch.randn(32, h, device=DEV), num_buckets=32, max_distance=64, causal=True)
    if feature == "dtable":
        return DistanceTable(torch.randn(2 * (CAP + 16) + 1, h, device=DEV))
    return None


def _extras(feature):
    kw = {}
    if "topk" in feature:
        kw["topk"] = 5
    if "qknorm" in feature:
        kw["qk_norm"] = QKNorm(groups=2, scale=8.0)
        kw["rotary"] = Rotary(8, rotary_inv_freq(8, device=DEV), xpos_scale=xpos_scale(8, device=DEV))
    return kw


def _place(keys, vals, layout, g):
    """The logical per-sequence tensors ``[(hk, CAP, d)]`` as caches: -> (k_cache, v_cache,
    block_table | None, cache_batch_idx | None)."""
    b, hk = len(keys), keys[0].shape[0]
    if layout == "contiguous":
        rows = torch.randperm(b + 1, generator=g)[:b]  # one spare row, sequences permuted
        kc, vc = (torch.zeros(b + 1, hk, CAP, D, device=DEV) for _ in range(2))
        for i in range(b):
            kc[rows[i]], vc[rows[i]] = keys[i], vals[i]
        return kc, vc, None, rows.to(DEV, torch.int32)
    page = int(layout[5:])
    per_seq = CAP // page
    table = torch.randperm(b * per_seq + 3, generator=g)[:b * per_seq].reshape(b, per_seq)  # 3 pages unused
    kc, vc = (torch.zeros(b * per_seq + 3, hk, page, D, device=DEV) for _ in range(2))
    for i in range(b):
        for j in range(per_seq):
            kc[table[i, j]] = keys[i][:, j * page:(j + 1) * page]
            vc[table[i, j]] = vals[i][:, j * page:(j + 1) * page]
    return kc, vc, table.to(DEV, torch.int32), None


def _slot(table, idx, i, slot, page):
    """(index of the cache's dim 0, index of its dim 2) of sequence i's slot."""
    return (idx[i], slot) if table is None else (table[i, slot // page], slot % page)


def _case(layout, new_kv, h, hk, nq, seed):
    g = torch.Generator().manual_seed(seed)
    seqlens = [1, 15, 16, 17, 63, 64, 65, CAP - nq]  # page boundaries +- 1, the full cache
    b = len(seqlens)
    keys = [torch.randn(hk, CAP, D, generator=g).to(DEV) for _ in range(b)]
    vals = [torch.randn(hk, CAP, D, generator=g).to(DEV) for _ in range(b)]
    q = torch.randn(b, h, nq, D, generator=g).to(DEV)
    new = (torch.randn(b, hk, nq, D, generator=g).to(DEV), torch.randn(b, hk, nq, D, generator=g).to(DEV))
    if new_kv:  # the logical sequence holds the new rows right after the cached ones
        for i, s in enumerate(seqlens):
            keys[i][:, s:s + nq], vals[i][:, s:s + nq] = new[0][i], new[1][i]
    kc, vc, table, idx = _place(keys, vals, layout, g)
    if new_kv:  # the cache must not hold them before the call
        for i, s in enumerate(seqlens):
            for slot in range(s, s + nq):
                r, c = _slot(table, idx, i, slot, kc.shape[2])
                kc[r, :, c] = vc[r, :, c] = 0.0
    return dict(q=q, kc=kc, vc=vc, table=table, idx=idx, seqlens=seqlens, keys=keys, vals=vals, new=new)


def _oracle(c, i, nk, k_prefix, feature, h, dtype):
    q = c["q"][i:i + 1].to(dtype)
    k, v = c["keys"][i][None, :, :nk].to(dtype), c["vals"][i][None, :, :nk].to(dtype)
    if h != k.shape[1]:
        k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1)
    return reference(q, k, v, is_causal=True, bias=c["bias"], q_offset=c["seqlens"][i] - k_prefix, k_prefix=k_prefix,
                     **_extras(feature))


FEATURES = ["none", "alibi", "t5", "dtable", "topk", "qknorm", "prefix"]
LAYOUTS = ["contiguous", "paged16", "paged64"]
# every combination on the CPU backends; on Triton (the split-KV decode kernel, whose top-k is
# judged on exact logits in tests/test_attention_decode.py, SPEC §4) every other feature on 16-slot pages with new keys and GQA 8->2,
# and two cached-only cases
SWEEP = ([(be, hd, nw, la, f) for be in BACKENDS if be != "triton" for hd in ((8, 2), (8, 1)) for nw in (False, True)
          for la in LAYOUTS for f in FEATURES]
         + [("triton", (8, 2), True, "paged16", f) for f in FEATURES if "triton" in BACKENDS and f != "topk"]
         + [c for c in (("triton", (8, 1), False, "contiguous", "t5"), ("triton", (8, 2), False, "paged64", "alibi"))
            if "triton" in BACKENDS])


@pytest.mark.parametrize("backend,heads,new_kv,layout,feature", SWEEP,
                         ids=[f"{b}-{h}to{k}-{'new' if n else 'cached'}-{la}-{f}" for b, (h, k), n, la, f in SWEEP])
def test_matches_the_reference_on_the_logical_keys(backend, heads, new_kv, layout, feature):
    h, hk = heads
    nq = 1 if feature in ("none", "alibi") else 3
    c = _case(layout, new_kv, h, hk, nq, seed=len(feature) + 7 * new_kv)
    c["bias"] = _bias(feature, h)
    k_prefix = 1 if feature == "prefix" else 0
    k, v = c["new"] if new_kv else (None, None)
    out = xtk.attention_with_kvcache(c["q"], c["kc"], c["vc"], k, v, cache_seqlens=torch.tensor(
        c["seqlens"], dtype=torch.int32, device=DEV), block_table=c["table"], cache_batch_idx=c["idx"],
        bias=c["bias"], k_prefix=k_prefix, backend=backend, **_extras(feature))
    for i, s in enumerate(c["seqlens"]):
        nk = s + (nq if new_kv else 0)
        eager = _oracle(c, i, nk, k_prefix, feature, h, torch.float32)
        oracle = _oracle(c, i, nk, k_prefix, feature, h, torch.float64)
        assert_close_2x(out[i:i + 1], eager, oracle, f"out of sequence {i} ({nk} keys)")


def test_new_keys_are_written_in_place_and_nothing_else():
    c = _case("paged16", True, 4, 2, 2, seed=3)
    before_k, before_v = c["kc"].clone(), c["vc"].clone()
    seqlens = torch.tensor(c["seqlens"], dtype=torch.int32, device=DEV)
    xtk.attention_with_kvcache(c["q"][:, :4], c["kc"], c["vc"], *c["new"], cache_seqlens=seqlens, block_table=c["table"])
    changed = ((c["kc"] != before_k) | (c["vc"] != before_v)).any(-1).any(1)  # (pages, page slots)
    written = torch.zeros_like(changed)
    for i, s in enumerate(c["seqlens"]):
        for j in range(2):
            r, col = _slot(c["table"], None, i, s + j, 16)
            written[r, col] = True
            assert torch.equal(c["kc"][r, :, col], c["new"][0][i, :, j])
            assert torch.equal(c["vc"][r, :, col], c["new"][1][i, :, j])
    assert torch.equal(changed & ~written, torch.zeros_like(changed))


def _small():
    q = torch.randn(2, 4, 1, D, device=DEV)
    kc, vc = torch.zeros(2, 2, 32, D, device=DEV), torch.zeros(2, 2, 32, D, device=DEV)
    return q, kc, vc, torch.tensor([3, 7], dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("case,error,match", [
    ("overflow", ValueError, r"cache_seqlens: sequence 1 would hold 33 keys \(32 cached \+ 1 new\), more than the "
                             r"cache's 32 slots; nothing was written"),
    ("k_without_v", ValueError, "k, v: give both new keys and values or neither"),
    ("int64_seqlens", TypeError, "cache_seqlens: expected an int32 tensor, got dtype torch.int64"),
    ("too_many_rows", ValueError, "q: expected 1 to 16 query rows per sequence"),
    ("page_outside_pool", ValueError, r"block_table: sequence 0 names pages \[9\] outside the page pool \[0, 4\)"),
    ("page_size", ValueError, "k_cache: expected a page size .* multiple of 16, got 24"),
    ("batch_idx_with_pages", ValueError, "cache_batch_idx: not used with a paged cache"),
    ("same_row_twice", ValueError, r"cache_batch_idx: two sequences would write the same cache row, got \[1, 1\]"),
    ("row_outside", ValueError, r"cache_batch_idx: expected rows in \[0, 2\) of k_cache, got \[5\]"),
    ("short_prefix", ValueError, "cache_seqlens: sequence 0 holds 3 keys, fewer than the k_prefix = 4"),
    ("dense", NotImplementedError, "bias: a Dense bias is not supported by attention_with_kvcache"),
    ("dtype", TypeError, "v_cache: expected dtype torch.float32 .* got torch.float16"),
    ("head_dim", ValueError, "k_cache: expected head dim 16"),
    ("new_k_shape", ValueError, r"k: expected shape \(2, 2, 1, 16\)"),
])
def test_bad_input_is_refused_by_name_and_the_cache_is_untouched(case, error, match, monkeypatch):
    """XTK_DEBUG_CHECKS=1: the value checks (overflow, pages, rows, k_prefix) run on the kernel's path
    too (on CUDA auto picks it; the reference path, CPU's, runs them always)."""
    monkeypatch.setenv("XTK_DEBUG_CHECKS", "1")
    q, kc, vc, seqlens = _small()
    kw = dict(cache_seqlens=seqlens)
    k = v = None
    new = torch.ones(2, 2, 1, D, device=DEV)
    if case == "overflow":
        k, v, kw["cache_seqlens"] = new, new, torch.tensor([3, 32], dtype=torch.int32, device=DEV)
    elif case == "k_without_v":
        k = new
    elif case == "int64_seqlens":
        kw["cache_seqlens"] = seqlens.long()
    elif case == "too_many_rows":
        q = torch.randn(2, 4, 17, D, device=DEV)
    elif case in ("page_outside_pool", "batch_idx_with_pages"):
        kc, vc = torch.zeros(4, 2, 16, D, device=DEV), torch.zeros(4, 2, 16, D, device=DEV)
        kw["block_table"] = torch.tensor([[9], [1]], dtype=torch.int32, device=DEV)
        if case == "batch_idx_with_pages":
            kw["cache_batch_idx"] = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    elif case == "page_size":
        kc, vc = torch.zeros(4, 2, 24, D, device=DEV), torch.zeros(4, 2, 24, D, device=DEV)
        kw["block_table"] = torch.tensor([[0], [1]], dtype=torch.int32, device=DEV)
    elif case == "same_row_twice":
        k, v, kw["cache_batch_idx"] = new, new, torch.tensor([1, 1], dtype=torch.int32, device=DEV)
    elif case == "row_outside":
        kw["cache_batch_idx"] = torch.tensor([0, 5], dtype=torch.int32, device=DEV)
    elif case == "short_prefix":
        kw["k_prefix"] = 4
    elif case == "dense":
        kw["bias"] = Dense(torch.zeros(1, 4, 1, 8, device=DEV))
    elif case == "dtype":
        vc = vc.half()
    elif case == "head_dim":
        kc, vc = torch.zeros(2, 2, 32, 8, device=DEV), torch.zeros(2, 2, 32, 8, device=DEV)
    elif case == "new_k_shape":
        k, v = torch.ones(2, 2, 1, 8, device=DEV), new
    before = (kc.clone(), vc.clone())
    with pytest.raises(error, match=match):
        xtk.attention_with_kvcache(q, kc, vc, k, v, **kw)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_an_int_length_and_an_empty_cache():
    """cache_seqlens as one int for every sequence; 0 cached keys and no new ones: rows with no key
    give zeros (the xtk.attention rule)."""
    q, kc, vc, _ = _small()
    a = xtk.attention_with_kvcache(q, kc, vc, cache_seqlens=5)
    b = xtk.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([5, 5], dtype=torch.int32, device=DEV))
    assert torch.equal(a, b)
    assert torch.equal(xtk.attention_with_kvcache(q, kc, vc, cache_seqlens=0), torch.zeros_like(q))
