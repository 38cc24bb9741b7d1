"""``xtk.attention_varlen`` on packed batches against the reference run on each sequence alone.

Sequences of different lengths (one without queries, nq > nk, one key) are packed back to back;
the oracle cuts them out with the test's own offsets and runs the reference on each as a batch of
one, positions from 0. Values and every gradient (q, k, v, learned bias inputs) by the 2x rule
against fp64, on every backend; every bad offset tensor refused by name.
"""
import os

import pytest
import torch

import xtk
from xtk.bias import Alibi, Dense, DistanceTable, T5, alibi_slopes
from xtk.qk import QKNorm, Rotary, rotary_inv_freq, xpos_scale
from xtk.reference.attention import attention as reference

from tolerance import attention_sums, check_against_oracle

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TRITON = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
LENS_Q = [5, 0, 17, 9, 1]
LENS_K = [5, 3, 17, 4, 1]
H, HK, D = 4, 2, 16
FEATURES = ["none", "causal", "alibi", "t5", "dtable", "topk", "qknorm", "prefix", "offset"]


def _offsets(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _kwargs(feature, slopes=None, table=None):
    kw = dict(is_causal=feature in ("causal", "alibi", "dtable", "qknorm", "offset"), enable_gqa=True)
    if slopes is not None:
        kw["bias"] = Alibi(slopes)
    if table is not None:
        kw["bias"] = T5(table, num_buckets=16, max_distance=32) if feature == "t5" else DistanceTable(table)
    if feature == "topk":
        kw["topk"] = 2
    if feature == "qknorm":
        kw["qk_norm"] = QKNorm(groups=2, scale=8.0)
        kw["rotary"] = Rotary(8, rotary_inv_freq(8, device=DEV), xpos_scale=xpos_scale(8, device=DEV))
    if feature == "prefix":
        kw["k_prefix"] = 1
    if feature == "offset":
        kw["q_offset"] = 2
    return kw


def _inputs(feature):
    g = torch.Generator().manual_seed(len(feature))
    t = dict(q=torch.randn(sum(LENS_Q), H, D, generator=g), k=torch.randn(sum(LENS_K), HK, D, generator=g),
             v=torch.randn(sum(LENS_K), HK, D, generator=g))
    if feature == "alibi":
        t["slopes"] = torch.tensor(alibi_slopes(H))
    if feature == "t5":
        t["table"] = torch.randn(16, H, generator=g)
    if feature == "dtable":
        t["table"] = torch.randn(2 * 20 - 1, H, generator=g)
    return {n: x.to(DEV) for n, x in t.items()}


def _packed(backend, feature):
    cq = torch.tensor(_offsets(LENS_Q), dtype=torch.int32, device=DEV)
    ck = torch.tensor(_offsets(LENS_K), dtype=torch.int32, device=DEV)

    def call(q, k, v, **learned):
        return xtk.attention_varlen(q, k, v, cq, ck, max(LENS_Q), max(LENS_K), backend=backend,
                                    **_kwargs(feature, **learned))
    return call


def _reference_kwargs(feature, **learned):
    kw = _kwargs(feature, **learned)
    kw.pop("enable_gqa")
    return kw


def _per_sequence(feature):
    oq, ok = _offsets(LENS_Q), _offsets(LENS_K)

    def call(q, k, v, **learned):
        outs = []
        for b in range(len(LENS_Q)):
            qs = q[oq[b]:oq[b + 1]].transpose(0, 1)[None]
            ks = k[ok[b]:ok[b + 1]].transpose(0, 1)[None].repeat_interleave(H // HK, 1)
            vs = v[ok[b]:ok[b + 1]].transpose(0, 1)[None].repeat_interleave(H // HK, 1)
            outs.append(reference(qs, ks, vs, **_reference_kwargs(feature, **learned))[0].transpose(0, 1))
        return torch.cat(outs, 0)
    return call


def _sequence_term_sums(feature, learned):
    """``term_sums`` for a learned bias input: the sums of |terms| over every sequence's logits."""
    oq, ok = _offsets(LENS_Q), _offsets(LENS_K)

    def sums(grad_out, q, k, v, **rest):
        total = {}
        for b in range(len(LENS_Q)):
            qs = q[oq[b]:oq[b + 1]].transpose(0, 1)[None]
            ks = k[ok[b]:ok[b + 1]].transpose(0, 1)[None].repeat_interleave(H // HK, 1)
            vs = v[ok[b]:ok[b + 1]].transpose(0, 1)[None].repeat_interleave(H // HK, 1)
            part = attention_sums(lambda **r: _reference_kwargs(feature, **r), bias=learned)(
                grad_out[oq[b]:oq[b + 1]].transpose(0, 1)[None], qs, ks, vs, **rest)
            for n, x in part.items():
                total[n] = total.get(n, 0) + x
        return total
    return sums


BACKENDS = ["chunked", "eager"] + (["triton"] if TRITON else [])


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_each_sequence_alone(backend, feature):
    inputs = _inputs(feature)
    grads = list(inputs)
    learned = "slopes" if "slopes" in inputs else "table" if "table" in inputs else None
    sums = _sequence_term_sums(feature, learned) if learned else None  # bias gradients: whole-matrix sums
    for dtype in (torch.float32,) + ((torch.bfloat16,) if backend != "triton" else ()):
        check_against_oracle(_packed(backend, feature), _per_sequence(feature), inputs, dtype, grad_names=grads,
                             term_sums=sums)


def _bad(case):
    q, k, v = torch.randn(6, H, D, device=DEV), torch.randn(7, HK, D, device=DEV), torch.randn(7, HK, D, device=DEV)
    cq = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEV)
    ck = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEV)
    kw = dict(max_seqlen_q=4, max_seqlen_k=4)
    extra = {}
    if case == "int64":
        cq = cq.long()
    elif case == "not_from_zero":
        cq = torch.tensor([1, 2, 6], dtype=torch.int32, device=DEV)
    elif case == "decreasing":
        ck = torch.tensor([0, 8, 7], dtype=torch.int32, device=DEV)
    elif case == "wrong_total":
        ck = torch.tensor([0, 3, 6], dtype=torch.int32, device=DEV)
    elif case == "count":
        ck = torch.tensor([0, 3, 5, 7], dtype=torch.int32, device=DEV)
    elif case == "max_seqlen":
        kw["max_seqlen_k"] = 3
    elif case == "dense":
        extra["bias"] = Dense(torch.zeros(1, H, 2, 3, device=DEV))
    elif case == "prefix":
        extra["k_prefix"] = 4
    elif case == "four_d":
        q = q[None]
    return (q, k, v, cq, ck), dict(kw, enable_gqa=True, **extra)


@pytest.mark.parametrize("case,error,match", [
    ("int64", TypeError, "cu_seqlens_q: expected an int32 tensor, got dtype torch.int64"),
    ("not_from_zero", ValueError, r"cu_seqlens_q: expected offsets starting at 0 and never decreasing, got \[1, 2, 6\]"),
    ("decreasing", ValueError, r"cu_seqlens_k: expected offsets starting at 0 and never decreasing, got \[0, 8, 7\]"),
    ("wrong_total", ValueError, "cu_seqlens_k: expected its last entry to be the packed length 7, got 6"),
    ("count", ValueError, "cu_seqlens_k: expected 3 entries"),
    ("max_seqlen", ValueError, "max_seqlen_k: expected at least the longest sequence, 4, got 3"),
    ("dense", NotImplementedError, "bias: a Dense bias is not supported by attention_varlen"),
    ("prefix", ValueError, r"k_prefix: every sequence starts with 4 memory key/values, but sequences \[0\]"),
    ("four_d", ValueError, r"q: expected a 3-D tensor, got shape \(1, 6, 4, 16\)"),
])
def test_bad_offsets_are_refused_by_name(case, error, match, monkeypatch):
    if CUDA:  # the one-launch CUDA path reads the offsets' values on the host only when asked to
        monkeypatch.setenv("XTK_DEBUG_CHECKS", "1")
    args, kw = _bad(case)
    with pytest.raises(error, match=match):
        xtk.attention_varlen(*args, **kw)
