"""``xtk.attention_varlen``'s one launch (the Triton kernels' VARLEN switch) against the eager
reference run on each sequence alone.

Ragged packed batches -- sequences of 0 and 1 queries, a sequence without keys, lengths that are
not multiples of the 32-row interpreter tile, nq != nk in every sequence -- through
``backend="triton"`` (CPU tensors under ``TRITON_INTERPRET=1``, as the other Triton tests):
output and every gradient (q, k, v, ALiBi slopes, T5 / distance tables, QK-norm dim scales and
learned scale) by the 2x rule against fp64, each bias kind, GQA 8->2 and 4->1 in both head
orders, causal and not, top-k (exact inputs), QK-norm, rotary/xpos (whose max position is each
sequence's own), ``k_prefix`` memory keys, a query offset, dropout (the kernels' keep-mask fed to
the reference). Each kernel runs once per call (spied), with no host read of the offsets; what the
path refuses is refused by name, and ``auto`` falls back to the per-sequence loop.
"""
import os

import pytest
import torch

import xtk
from xtk.bias import Alibi, DistanceTable, T5, alibi_slopes
from xtk.kernels import attention_op
from xtk.ops import attention_triton
from xtk.qk import QKNorm, Rotary, rotary_inv_freq, xpos_scale
from xtk.reference.attention import attention as reference

from host_reads import no_host_reads
from launch_spy import spy_launches
from tolerance import attention_sums, check_against_oracle

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs CUDA or TRITON_INTERPRET=1")
LENS_Q = [33, 0, 1, 17, 40, 5]  # 0 and 1 queries; 33, 17, 40, 5: not multiples of 32
LENS_K = [20, 3, 1, 45, 40, 0]  # nk != nq but in one; the last sequence has queries and no key
LENS_K_PREFIX = [20, 3, 2, 45, 40, 2]  # every sequence holds the two memory keys
D = 16
KERNELS = ("_attn_topk_threshold", "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")

# name -> (heads, kv heads, keyword arguments; learned inputs are filled in by _kwargs)
CASES = {
    "mqa4to1": (4, 1, dict()),
    "causal_gqa8to2": (8, 2, dict(is_causal=True)),
    "alibi": (8, 2, dict(is_causal=True, bias="alibi")),
    "t5": (4, 1, dict(bias="t5")),
    "dtable_causal": (4, 2, dict(is_causal=True, bias="dtable")),
    "qknorm_dimscales": (4, 2, dict(is_causal=True, qk_norm="dimscale")),
    "qknorm_learned_scale": (4, 1, dict(qk_norm="learned")),
    "rotary_xpos": (4, 2, dict(is_causal=True, rotary="xpos")),
    "prefix_alibi": (4, 2, dict(is_causal=True, bias="alibi", k_prefix=2)),
    "offset_t5_repeat": (8, 2, dict(is_causal=True, bias="t5_causal", q_offset=3, gqa_order="repeat")),
    "everything": (8, 2, dict(is_causal=True, bias="dtable", qk_norm="dimscale", rotary="xpos", k_prefix=2,
                              gqa_order="repeat")),
}


def _offsets(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _lens_k(case):
    return LENS_K_PREFIX if CASES[case][2].get("k_prefix") else LENS_K


def _inputs(case, exact=False):
    h, hk, spec = CASES[case]
    lk = _lens_k(case)
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    if exact:  # small integers: every logit exact, so the kept set of top-k is the reference's
        t = dict(q=torch.randint(-2, 3, (sum(LENS_Q), h, D), generator=g).float(),
                 k=torch.randint(-2, 3, (sum(lk), hk, D), generator=g).float())
    else:
        t = dict(q=torch.randn(sum(LENS_Q), h, D, generator=g), k=torch.randn(sum(lk), hk, D, generator=g))
    t["v"] = torch.randn(sum(lk), hk, D, generator=g)
    bias, qn = spec.get("bias"), spec.get("qk_norm")
    if bias == "alibi":
        t["slopes"] = torch.tensor(alibi_slopes(h))
    if bias in ("t5", "t5_causal"):  # exact: quarters
        t["table"] = torch.randint(-4, 5, (16, h), generator=g) / 4.0 if exact else torch.randn(16, h, generator=g)
    if bias == "dtable":
        t["table"] = torch.randn(2 * 50 - 1, h, generator=g)
    if qn == "dimscale":
        t["qsc"] = 0.5 + torch.rand(h, 1, D, generator=g)
        t["ksc"] = 0.5 + torch.rand(hk, 1, D, generator=g)
    if qn == "learned":
        t["lsc"] = torch.tensor(6.0)
    return {n: x.to(DEV) for n, x in t.items()}


def _kwargs(case, slopes=None, table=None, qsc=None, ksc=None, lsc=None):
    kw = dict(CASES[case][2])
    bias, qn, rot = kw.pop("bias", None), kw.pop("qk_norm", None), kw.pop("rotary", None)
    if bias == "alibi":
        kw["bias"] = Alibi(slopes)
    if bias == "t5":
        kw["bias"] = T5(table, num_buckets=16, max_distance=32)
    if bias == "t5_causal":
        kw["bias"] = T5(table, num_buckets=16, max_distance=32, causal=True)
    if bias == "dtable":
        kw["bias"] = DistanceTable(table)
    if qn == "dimscale":
        kw["qk_norm"] = QKNorm(groups=2, scale=D ** -0.5, q_dim_scale=qsc, k_dim_scale=ksc)
    if qn == "learned":
        kw["qk_norm"] = QKNorm(groups=1, scale=lsc)
    if rot == "xpos":
        kw["rotary"] = Rotary(8, rotary_inv_freq(8, device=DEV), xpos_scale=xpos_scale(8, device=DEV),
                              xpos_scale_base=16)
    return kw


def _one_launch(case, backend="triton"):
    lk = _lens_k(case)
    cq = torch.tensor(_offsets(LENS_Q), dtype=torch.int32, device=DEV)
    ck = torch.tensor(_offsets(lk), dtype=torch.int32, device=DEV)

    def call(q, k, v, **learned):
        return xtk.attention_varlen(q, k, v, cq, ck, max(LENS_Q), max(lk), enable_gqa=True, backend=backend,
                                    **_kwargs(case, **learned))
    return call


def _sequences(case, q, k, v):
    """(q, k, v) of each sequence as a batch of one, (1, heads, n, d)."""
    oq, ok = _offsets(LENS_Q), _offsets(_lens_k(case))
    for b in range(len(LENS_Q)):
        yield tuple(t[o[b]:o[b + 1]].transpose(0, 1)[None] for t, o in ((q, oq), (k, ok), (v, ok)))


def _per_sequence(case, **extra):
    def call(q, k, v, **learned):
        outs = [reference(*seq, **_kwargs(case, **learned), **extra)[0].transpose(0, 1)
                for seq in _sequences(case, q, k, v)]
        return torch.cat(outs, 0)
    return call


def _term_sums(case, learned):
    """``term_sums`` for the learned inputs whose gradient sums whole score matrices: over every sequence."""
    bias = next((n for n in ("slopes", "table") if n in learned), None)
    scale = "lsc" if "lsc" in learned else None

    def sums(grad_out, q, k, v, **rest):
        total = {}
        oq = _offsets(LENS_Q)
        for b, seq in enumerate(_sequences(case, q, k, v)):
            part = attention_sums(lambda **r: _kwargs(case, **r), bias=bias, scale=scale)(
                grad_out[oq[b]:oq[b + 1]].transpose(0, 1)[None], *seq, **rest)
            for n, x in part.items():
                total[n] = total.get(n, 0) + x
        return total
    return sums if bias or scale else None


@pytest.fixture
def launches(monkeypatch):
    """The attention kernels' launches in this test as (kernel name, VARLEN, NAN_GUARD) (a spy around each)."""
    seen = []
    spy_launches(monkeypatch, attention_op, KERNELS,
                 lambda name, args, kwargs: seen.append((name, kwargs.get("VARLEN"), kwargs.get("NAN_GUARD"))))
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_one_launch_equals_each_sequence_alone(case, launches):
    inputs = _inputs(case)
    learned = [n for n in inputs if n not in ("q", "k", "v")]
    check_against_oracle(_one_launch(case), _per_sequence(case), inputs, torch.float32, grad_names=list(inputs),
                         term_sums=_term_sums(case, learned))
    # one launch of each kernel for the whole packed batch, forward and backward (each everyday
    # kernel once; a NaN-rule guard twin, kernels/attention_op.py, once after it where the masks need one)
    everyday = sorted((n, v) for n, v, guard in launches if not guard)
    assert everyday == sorted([("_attn_fwd", True), ("_attn_bwd_dkdv", True), ("_attn_bwd_dq", True)])
    twins = [(n, v) for n, v, guard in launches if guard]
    assert len(twins) == len(set(twins)) and all(v for _, v in twins)


@pytest.mark.skipif(CUDA, reason="the interpreter's tile override; on a GPU every test runs the shipped tiles")
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_one_launch_with_the_shipped_tiles(arch, monkeypatch):
    """The tiles a GPU runs (``XTK_INTERPRET_TILES``), not the interpreter's 32x32: the heaviest case."""
    monkeypatch.setenv("XTK_INTERPRET_TILES", arch)
    case = "everything"
    inputs = _inputs(case)
    check_against_oracle(_one_launch(case), _per_sequence(case), inputs, torch.float32, grad_names=list(inputs),
                         term_sums=_term_sums(case, ["table"]))


@pytest.mark.parametrize("case", ["causal_gqa8to2", "alibi"])
def test_one_launch_half_precision(case):
    inputs = _inputs(case)
    check_against_oracle(_one_launch(case), _per_sequence(case), inputs, torch.float16, grad_names=list(inputs))


@pytest.mark.parametrize("case,topk", [("mqa4to1", 1), ("prefix_alibi", 3), ("offset_t5_repeat", 8)])
def test_topk_exact_kept_set(case, topk, launches):
    """Top-k on exactly representable logits (SPEC §4): the kept set is the reference's, values to 1e-5
    (sequences with fewer keys than topk keep them all, as the per-sequence path does)."""
    inputs = _inputs(case, exact=True)
    k = inputs["k"]
    k[4] = k[6]  # constructed ties inside the first sequence
    k[10] = k[6]
    learned = {n: x for n, x in inputs.items() if n not in ("q", "k", "v")}
    kw = dict(topk=topk, scale=0.25) if "qk_norm" not in CASES[case][2] else dict(topk=topk)
    got_in = {n: x.clone().requires_grad_() for n, x in inputs.items()}
    want_in = {n: x.double().requires_grad_() for n, x in inputs.items()}
    lk = _lens_k(case)
    cq = torch.tensor(_offsets(LENS_Q), dtype=torch.int32, device=DEV)
    ck = torch.tensor(_offsets(lk), dtype=torch.int32, device=DEV)
    got = xtk.attention_varlen(got_in["q"], got_in["k"], got_in["v"], cq, ck, max(LENS_Q), max(lk), enable_gqa=True,
                               backend="triton", **kw, **_kwargs(case, **{n: got_in[n] for n in learned}))
    want = _per_sequence(case, **kw)(want_in["q"], want_in["k"], want_in["v"], **{n: want_in[n] for n in learned})
    assert (got.double() - want).abs().max().item() < 1e-5
    g = torch.randn_like(want)
    got.backward(g.float())
    want.backward(g)
    for n in ("q", "k", "v"):
        assert (got_in[n].grad.double() - want_in[n].grad).abs().max().item() < 1e-4, n
    assert ("_attn_topk_threshold", True, 0) in launches


def test_dropout_is_the_kernels_keep_mask_per_sequence():
    """Dropout in the one launch: the reference fed the keep-mask the kernels draw (``dropout_keep_mask``
    over (sequences, heads, max_seqlen_q, max_seqlen_k), sequence b's corner) gives the same output and gradients."""
    case, p, seed = "causal_gqa8to2", 0.3, 11
    h, hk, _ = CASES[case]
    inputs = _inputs(case)
    lk = _lens_k(case)
    cq = torch.tensor(_offsets(LENS_Q), dtype=torch.int32, device=DEV)
    ck = torch.tensor(_offsets(lk), dtype=torch.int32, device=DEV)
    keep = attention_op.dropout_keep_mask(seed, len(LENS_Q), h, max(LENS_Q), max(lk), p, DEV)

    def kernel(q, k, v):
        view = [t.transpose(0, 1)[None] for t in (q, k, v)]
        out = torch.ops.xtk.attention_fwd(*view, None, None, None, None, D ** -0.5, True, 0, 0, 0, p, seed,
                                          cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(LENS_Q),
                                          max_seqlen_k=max(lk))[0]
        return out[0].transpose(0, 1)

    def eager(q, k, v):
        outs = []
        for b, seq in enumerate(_sequences(case, q, k, v)):
            mask = keep[b:b + 1, :, :LENS_Q[b], :lk[b]]
            outs.append(reference(*seq, dropout_p=p, is_causal=True, dropout_mask=mask)[0].transpose(0, 1))
        return torch.cat(outs, 0)
    check_against_oracle(kernel, eager, inputs, torch.float32, grad_names=["q", "k", "v"])


def test_no_host_read_of_the_offsets(monkeypatch):
    """Forward and backward of the one launch read no device value on the host (the interpreter's own
    reads inside a launch are paused, as for the decode kernels)."""
    case = "alibi"
    inputs = {n: x.requires_grad_() for n, x in _inputs(case).items()}
    with no_host_reads(monkeypatch, attention_op):
        out = _one_launch(case)(**inputs)
        out.square().sum().backward()
    assert all(x.grad is not None for x in inputs.values())


def test_deterministic_table_gradient(monkeypatch):
    """In deterministic mode the table gradient comes from the whole dS (padded per sequence), not atomics."""
    case = "dtable_causal"
    inputs = _inputs(case)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    check_against_oracle(_one_launch(case), _per_sequence(case), inputs, torch.float32, grad_names=list(inputs),
                         term_sums=_term_sums(case, ["table"]))


def test_opcheck_varlen():
    h, hk = 4, 2
    lq, lk = [3, 0, 5], [4, 2, 1]
    q = torch.randn(sum(lq), h, D, device=DEV, requires_grad=True)
    k = torch.randn(sum(lk), hk, D, device=DEV, requires_grad=True)
    v = torch.randn(sum(lk), hk, D, device=DEV, requires_grad=True)
    slopes = torch.rand(h, device=DEV, requires_grad=True)
    cq = torch.tensor(_offsets(lq), dtype=torch.int32, device=DEV)
    ck = torch.tensor(_offsets(lk), dtype=torch.int32, device=DEV)
    view = [t.transpose(0, 1)[None] for t in (q, k, v)]
    torch.library.opcheck(torch.ops.xtk.attention_fwd.default,
                          (*view, slopes, None, None, None, 0.25, True, 0, 0, 0, 0.0, 0),
                          dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=5, max_seqlen_k=4))


# ----------------------------------------------------------------------------- dispatch and refusals

def _packed(lq=(3, 5), lk=(4, 2), h=4, hk=2):
    q = torch.randn(sum(lq), h, D, device=DEV)
    k = torch.randn(sum(lk), hk, D, device=DEV)
    v = torch.randn(sum(lk), hk, D, device=DEV)
    cq = torch.tensor(_offsets(lq), dtype=torch.int32, device=DEV)
    ck = torch.tensor(_offsets(lk), dtype=torch.int32, device=DEV)
    return q, k, v, cq, ck


def test_a_table_shorter_than_the_max_lengths_is_refused_when_forced_and_falls_back_in_auto(monkeypatch):
    """max_seqlen_k larger than any sequence: the one launch would read the table at distances it
    lacks, so it refuses (a per-sequence run needs only each sequence's distances)."""
    q, k, v, cq, ck = _packed()
    table = torch.randn(2 * 6 - 1, 4, device=DEV)
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested.*bias.table covers distances up to 5, "
                                           r"and max_seqlen_q / max_seqlen_k allow 9"):
        xtk.attention_varlen(q, k, v, cq, ck, 5, 10, enable_gqa=True, bias=DistanceTable(table), backend="triton")
    assert "bias.table covers" in " ".join(attention_triton.varlen_reasons(
        _validated(q, k, v, DistanceTable(table)), True, 5, 10))
    out = xtk.attention_varlen(q, k, v, cq, ck, 5, 10, enable_gqa=True, bias=DistanceTable(table))  # auto: per sequence
    want = xtk.attention_varlen(q, k, v, cq, ck, 5, 4, enable_gqa=True, bias=DistanceTable(table), backend="triton")
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def _validated(q, k, v, bias):
    from xtk.ops.attention import _validate
    import dataclasses
    inputs = _validate(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, 0.0, False,
                       None, True, None, None, None, None, None, 0, None)
    return dataclasses.replace(inputs, bias=bias)


def test_a_bias_subclass_is_refused_by_name():
    class ShiftedAlibi(Alibi):
        pass
    q, k, v, cq, ck = _packed()
    with pytest.raises(RuntimeError, match="bias ShiftedAlibi: the one-launch varlen path runs Alibi, T5, DistanceTable"):
        xtk.attention_varlen(q, k, v, cq, ck, 5, 4, enable_gqa=True, bias=ShiftedAlibi(torch.rand(4, device=DEV)),
                             backend="triton")


@pytest.mark.skipif(CUDA, reason="CPU dispatch: auto takes the per-sequence loop there")
def test_auto_on_cpu_runs_each_sequence(monkeypatch, launches):
    q, k, v, cq, ck = _packed()
    monkeypatch.setattr(attention_triton, "run_varlen", lambda *a, **kw: pytest.fail("one launch taken on CPU auto"))
    out = xtk.attention_varlen(q, k, v, cq, ck, 5, 4, enable_gqa=True)
    want = xtk.attention_varlen(q, k, v, cq, ck, 5, 4, enable_gqa=True, backend="eager")
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert launches == []


def test_debug_checks_read_the_offsets(monkeypatch):
    """XTK_DEBUG_CHECKS=1: the one-launch path reads and checks the offsets, as the per-sequence path does."""
    q, k, v, cq, ck = _packed()
    bad = torch.tensor([0, 3, 5], dtype=torch.int32, device=DEV)
    monkeypatch.setenv("XTK_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match="cu_seqlens_q: expected its last entry to be the packed length 8, got 5"):
        xtk.attention_varlen(q, k, v, bad, ck, 5, 4, enable_gqa=True, backend="triton")
    with pytest.raises(ValueError, match=r"max_seqlen_q: expected at least the longest sequence, 5, got 4"):
        xtk.attention_varlen(q, k, v, cq, ck, 4, 4, enable_gqa=True, backend="triton")
    with pytest.raises(ValueError, match=r"k_prefix: every sequence starts with 3 memory key/values, but sequences \[1\]"):
        xtk.attention_varlen(q, k, v, cq, ck, 5, 4, enable_gqa=True, k_prefix=3, backend="triton")


def test_offsets_metadata_is_checked_without_a_read():
    q, k, v, cq, ck = _packed()
    with pytest.raises(TypeError, match="cu_seqlens_k: expected an int32 tensor, got dtype torch.int64"):
        xtk.attention_varlen(q, k, v, cq, ck.long(), 5, 4, enable_gqa=True, backend="triton")
    with pytest.raises(ValueError, match="cu_seqlens_k: expected 3 entries"):
        xtk.attention_varlen(q, k, v, cq, ck[:2], 5, 4, enable_gqa=True, backend="triton")
    with pytest.raises(ValueError, match="k_prefix: every sequence starts with 5 memory key/values, but max_seqlen_k is 4"):
        xtk.attention_varlen(q, k, v, cq, ck, 5, 4, enable_gqa=True, k_prefix=5, backend="triton")
