"""The split-KV decode kernel (``kernels/attention_decode.py``, ``backend="triton"`` of
``xtk.attention_with_kvcache``) against the reference on each sequence's logical keys, SPEC §4.

Each sequence's keys and values are made first (``(hk, CAP, d)``), rounded to the test dtype, then
placed into a contiguous cache (rows permuted by ``cache_batch_idx``, one spare row) or into shuffled
pages of a paged one (page 16 or 64, spare pages); new keys/values, when given, are not in the cache
before the call. The oracle never reads the cache: ``xtk.reference.attention`` on the logical tensors
with the API's positions, in the test dtype (eager) and in fp64 (oracle), output and log-sum-exp
(``reference.log_sum_exp``) judged by the 2x rule. Ragged lengths in every case: 0 (with new keys: they
alone), 1, page boundaries +-1, the full cache. Split counts 1/2/7 and the picked one; split and
unsplit agree; the refusals name the argument; the kernel's path reads no device value on the host
(``host_reads.no_host_reads``). Runs under the Triton interpreter on CPU (tests/conftest.py) and compiled on CUDA.
"""
import os

import pytest
import torch

import xtk
from xtk.bias import Alibi, DistanceTable, T5, alibi_slopes
from xtk.kernels import attention_decode_op as attention_decode
from xtk.ops import attention_kvcache
from xtk.qk import QKNorm, Rotary, rotary_inv_freq, xpos_scale
from xtk.reference import attention as reference

from host_reads import no_host_reads as _no_host_reads
from tolerance import FLOOR, assert_close_2x

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs CUDA or the Triton interpreter (tests/conftest.py sets it on CPU)")
D, CAP = 16, 128  # head dim; slots per sequence (8 pages of 16, 2 of 64)


def _seqlens(nq, new_kv, k_prefix):
    """Ragged lengths: none/one key, page boundaries +-1, the full cache."""
    lens = [0, 1, 15, 16, 17, 63, 64, 65, CAP - (nq if new_kv else 0)]
    return [max(s, k_prefix) for s in lens]


def _place(keys, vals, layout, g):
    """The logical per-sequence tensors ``[(hk, CAP, d)]`` as caches: -> (k_cache, v_cache,
    block_table | None, cache_batch_idx | None)."""
    b, hk, dtype = len(keys), keys[0].shape[0], keys[0].dtype
    if layout == "contiguous":
        rows = torch.randperm(b + 1, generator=g)[:b]
        kc, vc = (torch.zeros(b + 1, hk, CAP, D, dtype=dtype, device=DEV) for _ in range(2))
        for i in range(b):
            kc[rows[i]], vc[rows[i]] = keys[i], vals[i]
        return kc, vc, None, rows.to(DEV, torch.int32)
    page = int(layout[5:])
    per = CAP // page
    table = torch.randperm(b * per + 3, generator=g)[:b * per].reshape(b, per)
    kc, vc = (torch.zeros(b * per + 3, hk, page, D, dtype=dtype, device=DEV) for _ in range(2))
    for i in range(b):
        for j in range(per):
            kc[table[i, j]], vc[table[i, j]] = keys[i][:, j * page:(j + 1) * page], vals[i][:, j * page:(j + 1) * page]
    return kc, vc, table.to(DEV, torch.int32), None


def _case(layout, h, hk, nq, new_kv, k_prefix, dtype, seed, exact=False):
    """Inputs rounded to ``dtype``; the cache holds only the cached keys (new ones are zeros there).
    ``exact``: q and the keys small integers (-2..2), so that the logits (with a power-of-two scale
    and slopes) are exact and tie (SPEC §4's top-k rule)."""
    g = torch.Generator().manual_seed(seed)
    seqlens = _seqlens(nq, new_kv, k_prefix)
    b = len(seqlens)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(DEV)  # noqa: E731
    qk = (lambda *shape: torch.randint(-2, 3, shape, generator=g).to(dtype).to(DEV)) if exact else rnd  # noqa: E731
    keys, vals = [qk(hk, CAP, D) for _ in range(b)], [rnd(hk, CAP, D) for _ in range(b)]
    q, new = qk(b, h, nq, D), (qk(b, hk, nq, D), rnd(b, hk, nq, D))
    cached = [(k.clone(), v.clone()) for k, v in zip(keys, vals)]
    for i, s in enumerate(seqlens):
        if new_kv:
            keys[i][:, s:s + nq], vals[i][:, s:s + nq] = new[0][i], new[1][i]
            cached[i][0][:, s:s + nq] = cached[i][1][:, s:s + nq] = 0.0
    kc, vc, table, idx = _place([c[0] for c in cached], [c[1] for c in cached], layout, g)
    return dict(q=q, kc=kc, vc=vc, table=table, idx=idx, seqlens=seqlens, keys=keys, vals=vals,
                new=new if new_kv else (None, None))


def _features(feature, h, hk, dtype, cast):
    """The call's keyword arguments for ``feature`` ('+'-joined), learned tensors rounded to ``dtype``
    and held in ``cast`` (the kernel and eager: dtype; the oracle: fp64)."""
    feats, kw = set(feature.split("+")), {}
    rounded = lambda t: t.to(dtype).to(cast)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    if "alibi" in feats:
        kw["bias"] = Alibi(rounded(torch.tensor(alibi_slopes(h - 2), device=DEV)))  # two heads without a slope
    if "alibi2" in feats:  # power-of-two slopes: exact logits
        kw["bias"] = Alibi(torch.tensor([2.0 ** -(1 + i % 3) for i in range(h - 1)], device=DEV).to(cast))
    for f in feats:
        if f.startswith("topk"):
            kw["topk"], kw["scale"] = int(f[4:]), 0.25
    if "t5" in feats:
        kw["bias"] = T5(rounded(torch.randn(32, h, generator=g).to(DEV)), num_buckets=32, max_distance=64,
                        causal="noncausal" not in feats, scale=0.5)
    if "dtable" in feats:
        kw["bias"] = DistanceTable(rounded(torch.randn(2 * (CAP + 16) + 1, h, generator=g).to(DEV)))
    if "qknorm" in feats:
        qs, ks = (rounded(1 + 0.2 * torch.randn(n, 1, D, generator=g)).to(DEV) for n in (h, hk))
        kw["qk_norm"] = QKNorm(groups=2, scale=8.0, q_dim_scale=qs, k_dim_scale=ks)
    if "rot" in feats:
        kw["rotary"] = Rotary(8, rotary_inv_freq(8, device=DEV), xpos_scale=xpos_scale(8, device=DEV),
                              xpos_scale_base=64)
    if "repeat" in feats:
        kw["gqa_order"] = "repeat"
    if "noncausal" in feats:
        kw["is_causal"] = False
    return kw


def _reference(c, i, nk, k_prefix, kw, cast):
    """(out, lse) of sequence ``i`` by the reference on its logical keys, inputs held in ``cast``."""
    q = c["q"][i:i + 1].to(cast)
    k, v = c["keys"][i][None, :, :nk].to(cast), c["vals"][i][None, :, :nk].to(cast)
    kw = dict(kw, is_causal=kw.get("is_causal", True), q_offset=c["seqlens"][i] - k_prefix, k_prefix=k_prefix)
    return reference.attention(q, k, v, **kw), reference.log_sum_exp(q, k, **kw)


def _run(c, feature, h, hk, k_prefix, splits, dtype, backend="triton"):
    kw = _features(feature, h, hk, dtype, dtype)
    return xtk.attention_with_kvcache(
        c["q"], c["kc"], c["vc"], *c["new"], cache_seqlens=torch.tensor(c["seqlens"], dtype=torch.int32, device=DEV),
        block_table=c["table"], cache_batch_idx=c["idx"], k_prefix=k_prefix, num_splits=splits, return_lse=True,
        backend=backend, **kw)


def _check(c, out, lse, feature, h, hk, k_prefix, dtype):
    nq = c["q"].shape[2]
    for i, s in enumerate(c["seqlens"]):
        nk = s + (nq if c["new"][0] is not None else 0)
        e_out, e_lse = _reference(c, i, nk, k_prefix, _features(feature, h, hk, dtype, dtype), dtype)
        o_out, o_lse = _reference(c, i, nk, k_prefix, _features(feature, h, hk, dtype, torch.float64), torch.float64)
        assert_close_2x(out[i:i + 1], e_out, o_out, f"out of sequence {i} ({nk} keys)")
        empty = torch.isneginf(o_lse)
        assert torch.equal(torch.isneginf(lse[i:i + 1]), empty), f"lse of sequence {i}: -inf rows differ"
        assert_close_2x(lse[i:i + 1][~empty], e_lse[~empty], o_lse[~empty], f"lse of sequence {i} ({nk} keys)")


# (layout, (h, hk), nq, new k/v, feature, k_prefix, num_splits, dtype)
CASES = [
    ("paged16", (8, 2), 1, True, "none", 0, 1, torch.float32),
    ("paged16", (8, 2), 1, True, "none", 0, 2, torch.float32),
    ("paged64", (8, 1), 1, False, "alibi", 0, 7, torch.float32),
    ("contiguous", (8, 2), 3, True, "t5", 0, 2, torch.float32),
    ("contiguous", (8, 1), 4, False, "dtable", 0, 7, torch.float32),
    ("paged16", (8, 2), 2, True, "qknorm+rot", 0, 2, torch.float32),
    ("paged64", (8, 2), 16, True, "alibi", 2, 7, torch.float32),  # 64 rows per kv head: two row blocks
    ("paged16", (8, 2), 3, True, "t5+noncausal", 1, 2, torch.float32),
    ("contiguous", (4, 4), 2, True, "rot", 0, 1, torch.float32),
    ("paged16", (8, 2), 1, True, "alibi", 0, 2, torch.float16),
    ("paged64", (8, 1), 3, True, "t5+qknorm", 0, 7, torch.bfloat16),
    ("contiguous", (8, 2), 1, True, "qknorm+rot", 1, 0, torch.bfloat16),
    ("paged16", (8, 2), 2, False, "dtable+repeat", 0, 2, torch.float16),
    ("paged64", (8, 2), 5, True, "alibi+rot+repeat", 0, 7, torch.float32),
]


@pytest.mark.parametrize("layout,heads,nq,new_kv,feature,k_prefix,splits,dtype", CASES,
                         ids=[f"{la}-{h}to{hk}-nq{nq}-{'new' if n else 'cached'}-{f}-prefix{p}-s{s}-{str(dt)[6:]}"
                              for la, (h, hk), nq, n, f, p, s, dt in CASES])
def test_decode_matches_the_reference(layout, heads, nq, new_kv, feature, k_prefix, splits, dtype):
    h, hk = heads
    c = _case(layout, h, hk, nq, new_kv, k_prefix, dtype, seed=nq + 3 * hk)
    out, lse = _run(c, feature, h, hk, k_prefix, splits, dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == out.shape[:3]
    _check(c, out, lse, feature, h, hk, k_prefix, dtype)


# top-k on exact logits (integer q and keys, scale 1/4, power-of-two slopes; SPEC §4): k below, at
# and above the ragged key counts (0..128), and k >= the capacity (no threshold pass)
# (layout, (h, hk), nq, new k/v, feature, num_splits, dtype)
TOPK_CASES = [
    ("paged16", (8, 2), 1, True, "alibi2+topk17", 1, torch.float32),
    ("contiguous", (8, 1), 3, False, "topk16", 7, torch.bfloat16),
    ("paged64", (8, 2), 4, True, "alibi2+topk1+noncausal", 2, torch.float16),
    ("contiguous", (8, 2), 2, True, "alibi2+topk64+repeat", 0, torch.float32),
    ("paged16", (8, 2), 2, True, "topk128", 2, torch.float32),
]


def _kept(c, i, nk, kw, kth):
    """(the reference's kept set of sequence ``i``, the set its logits give under the kernel's
    thresholds ``kth`` (b, h, nq)), both ``(1, h, nq, nk)`` bool, in fp64."""
    q = c["q"][i:i + 1].double()
    k = c["keys"][i][None, :, :nk].double()
    kw = dict(kw, is_causal=kw.get("is_causal", True))
    args = (kw["is_causal"], kw["scale"], kw.get("bias"))
    rest = (None, None, c["seqlens"][i], 0, None, kw.get("gqa_order", "interleave"))
    s, keep = reference._scores(q, k, None, *args, None, *rest)
    _, want = reference._scores(q, k, None, *args, kw["topk"], *rest)
    return want, keep & ~(s < kth[i:i + 1, :, :, None].double())


@pytest.mark.parametrize("layout,heads,nq,new_kv,feature,splits,dtype", TOPK_CASES,
                         ids=[f"{la}-{h}to{hk}-nq{nq}-{'new' if n else 'cached'}-{f}-s{s}-{str(dt)[6:]}"
                              for la, (h, hk), nq, n, f, s, dt in TOPK_CASES])
def test_topk_keeps_the_references_set(layout, heads, nq, new_kv, feature, splits, dtype, monkeypatch):
    """The kernel's per-row thresholds (a spy on ``_row_thresholds``) keep exactly the reference's
    set in every row (ties kept; rows with fewer than k keys keep all), and out / lse pass the 2x
    rule; the threshold pass reads nothing on the host either."""
    h, hk = heads
    c = _case(layout, h, hk, nq, new_kv, 0, dtype, seed=11 + nq, exact=True)
    seen, thresholds = [], attention_decode._row_thresholds
    monkeypatch.setattr(attention_decode, "_row_thresholds", lambda *a: seen.append(thresholds(*a)) or seen[-1])
    with _no_host_reads(monkeypatch):
        out, lse = _run(c, feature, h, hk, 0, splits, dtype)
    _check(c, out, lse, feature, h, hk, 0, dtype)
    kw = _features(feature, h, hk, dtype, torch.float64)
    if kw["topk"] >= CAP:
        assert not seen, "topk >= the capacity: no threshold pass"
        return
    assert len(seen) == 1
    for i, s in enumerate(c["seqlens"]):
        want, got = _kept(c, i, s + (nq if new_kv else 0), kw, seen[0])
        assert torch.equal(got, want), f"sequence {i}: kept sets differ in {(got != want).sum().item()} places"


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_shipped_decode_tiles(arch, monkeypatch):
    """The tiles that ship (kernels/tiles_sm80.json, tiles_sm90.json: BLOCK_M, BLOCK_N of the
    ``decode`` entries) run in the interpreter too (XTK_INTERPRET_TILES; the interpreter's default
    is 32x32): 64 rows of one kv head, 16-slot pages (one key tile spans several pages)."""
    monkeypatch.setenv("XTK_INTERPRET_TILES", arch)
    h, hk, nq = 8, 2, 16
    c = _case("paged16", h, hk, nq, True, 0, torch.float16, seed=9)
    out, lse = _run(c, "alibi+qknorm+rot", h, hk, 0, 2, torch.float16)
    _check(c, out, lse, "alibi+qknorm+rot", h, hk, 0, torch.float16)


@pytest.mark.parametrize("layout,feature", [("paged16", "alibi"), ("contiguous", "t5+qknorm+rot")])
def test_split_counts_agree_with_unsplit(layout, feature):
    """1, 2, 7 splits and the picked count (0): each within the 2x rule of the oracle, and within the
    fp32 floor of the unsplit result (the new keys are rewritten, identical, by every call)."""
    h, hk, nq = 8, 2, 2
    c = _case(layout, h, hk, nq, True, 0, torch.float32, seed=5)
    out1, lse1 = _run(c, feature, h, hk, 0, 1, torch.float32)
    for splits in (2, 7, 0):
        out, lse = _run(c, feature, h, hk, 0, splits, torch.float32)
        _check(c, out, lse, feature, h, hk, 0, torch.float32)
        assert (out - out1).abs().max().item() <= FLOOR[torch.float32], f"{splits} splits vs unsplit: out"
        finite = torch.isfinite(lse1)
        assert torch.equal(finite, torch.isfinite(lse))
        assert (lse - lse1)[finite].abs().max().item() <= FLOOR[torch.float32], f"{splits} splits vs unsplit: lse"


def test_lse_correction_matters():
    """Two splits whose partial log-sum-exps differ by a lot: a combine that averaged the partials
    unweighted would be off by O(1) (the break-on-purpose check of the combine, kept as a test)."""
    h, hk, nq = 4, 4, 1
    c = _case("paged16", h, hk, nq, False, 0, torch.float32, seed=2)
    c["keys"] = [k * 0 for k in c["keys"]]
    for i in range(len(c["seqlens"])):
        c["keys"][i][:, :16] = 3.0 * c["q"][i, :, 0, None, :] / c["q"][i, :, 0, None, :].norm(dim=-1, keepdim=True)
    kc, vc, table, _ = _place(c["keys"], c["vals"], "paged16", torch.Generator().manual_seed(0))
    c.update(kc=kc, vc=vc, table=table)
    out, lse = _run(c, "none", h, hk, 0, 7, torch.float32)
    _check(c, out, lse, "none", h, hk, 0, torch.float32)


def test_forced_triton_refuses_with_reasons_and_auto_falls_back():
    c = _case("paged16", 8, 2, 1, False, 0, torch.float32, seed=1)
    seqlens = torch.tensor(c["seqlens"], dtype=torch.int32, device=DEV)
    args = (c["q"], c["kc"], c["vc"])
    kw = dict(cache_seqlens=seqlens, block_table=c["table"])
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested but cannot run these inputs: "
                                           r"num_splits 129 > 128"):
        xtk.attention_with_kvcache(*args, num_splits=129, backend="triton", **kw)
    a = xtk.attention_with_kvcache(*args, num_splits=129, **kw)  # auto: the reference path
    b = xtk.attention_with_kvcache(*args, backend="eager", **kw)
    torch.testing.assert_close(a, b)
    why = dict(attention_kvcache.explain(attention_kvcache.kvcache_inputs(*args, num_splits=129, **kw)))
    assert why["reference"] == [] and any(w.startswith("num_splits") for w in why["triton"])


def test_keys_without_a_spill_free_tile_are_refused(monkeypatch):
    """Exact fp32 with QK features at head dim 256: no decode tile compiles spill-free, none ships,
    the kernel refuses (auto runs the reference path); without QK features the same size runs."""
    monkeypatch.setenv("XTK_INTERPRET_TILES", "sm90")
    q = torch.zeros(1, 8, 1, 256, device=DEV)
    assert "no decode tile" in attention_decode.tile_refusal(q, 2, 256, 0, True)
    assert attention_decode.tile_refusal(q, 2, 256, 0, False) is None
    assert attention_decode.tile_refusal(q.half(), 2, 256, 0, True) is None


def test_pick_splits_rule():
    """num_splits=0 off CUDA: one split per 64 cache slots, at most 4; on CUDA two waves of programs
    over the SMs, no split shorter than 4 key tiles."""
    cpu = torch.device("cpu")
    assert attention_decode.pick_splits(8, 2, 128, 32, cpu) == 2
    assert attention_decode.pick_splits(8, 2, 32, 32, cpu) == 1
    assert attention_decode.pick_splits(8, 2, 32768, 32, cpu) == 4
    if CUDA:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        dev = torch.device("cuda")
        assert attention_decode.pick_splits(1, 1, 1 << 20, 64, dev) == min(2 * sms, attention_decode.MAX_SPLITS)
        assert attention_decode.pick_splits(1, 1, 256, 64, dev) == 1


def test_the_host_read_guard_catches_reads():
    """The guard itself: each way of reading a value to the host raises (so the test below can fail)."""
    t = torch.tensor([3, 4], dtype=torch.int32, device=DEV)
    for read in (lambda: t[0].item(), t.tolist, lambda: bool(t[0]), lambda: int(t[0]), lambda: [0] * 9 * t[0],
                 lambda: t[t > 3], lambda: torch.arange(t[0])):
        with pytest.raises(AssertionError, match="host"), _no_host_reads(pytest.MonkeyPatch()):
            read()


@pytest.mark.parametrize("layout,new_kv,feature", [("contiguous", True, "t5+qknorm+rot"), ("contiguous", False, "alibi"),
                                                   ("paged16", True, "dtable"), ("paged64", False, "alibi+rot")])
def test_the_kernel_path_reads_nothing_on_the_host(layout, new_kv, feature, monkeypatch):
    """Forced 'triton': no host read of cache_seqlens, the block table or cache_batch_idx (checks,
    dispatch, the cache write, the launch), so a decode step can be captured in a CUDA graph;
    results as the reference. The reference path, which reads the lengths, trips the same guard."""
    monkeypatch.delenv("XTK_DEBUG_CHECKS", raising=False)
    h, hk, nq = 8, 2, 2
    c = _case(layout, h, hk, nq, new_kv, 0, torch.float32, seed=4)
    with _no_host_reads(monkeypatch):
        out, lse = _run(c, feature, h, hk, 0, 2, torch.float32)
    _check(c, out, lse, feature, h, hk, 0, torch.float32)
    with pytest.raises(AssertionError, match="host"), _no_host_reads(monkeypatch):
        _run(c, feature, h, hk, 0, 2, torch.float32, backend="eager")


@pytest.mark.parametrize("layout,bad", [("contiguous", "overflow"), ("paged16", "overflow"), ("paged16", "page")])
def test_debug_checks_refuse_on_the_kernel_path_with_nothing_written(layout, bad, monkeypatch):
    """XTK_DEBUG_CHECKS=1: the forced kernel path reads and checks the values too; an overflowing
    call (or a page outside the pool) raises and the cache is as it was."""
    monkeypatch.setenv("XTK_DEBUG_CHECKS", "1")
    c = _case(layout, 4, 2, 2, True, 0, torch.float32, seed=6)
    seqlens = torch.tensor(c["seqlens"], dtype=torch.int32, device=DEV)
    if bad == "overflow":
        seqlens[-1] = CAP - 1
    else:
        c["table"][-1, -1] = c["kc"].shape[0]
    before = c["kc"].clone(), c["vc"].clone()
    match = "would hold 129 keys" if bad == "overflow" else "outside the page pool"
    with pytest.raises(ValueError, match=match):
        xtk.attention_with_kvcache(c["q"], c["kc"], c["vc"], *c["new"], cache_seqlens=seqlens, block_table=c["table"],
                                   cache_batch_idx=c["idx"], backend="triton")
    assert torch.equal(c["kc"], before[0]) and torch.equal(c["vc"], before[1])
