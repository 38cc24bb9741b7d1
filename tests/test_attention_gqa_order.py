"""``gqa_order='repeat'`` (x-transformers' ``(r kvh)`` order: query head i reads kv head i % hk) on
every backend, values and every gradient, against an oracle that shares nothing with it: the
reference run without GQA on k and v repeated with ``Tensor.repeat`` (and the k dim scale with
them). Every per-head input (ALiBi slopes for fewer heads than h, T5 and distance tables, a
per-head dense bias and mask, the q dim scale) must follow its query head, and the dK/dV of a kv
head must gather the query heads h % hk == kv. The triton backend runs the kernels' GQA_REPEAT
switch (compiled on CUDA, the interpreter on CPU); chunked permutes the heads into SDPA's order.
"""
import os

import pytest
import torch

import xtk
from xtk.bias import Alibi, Dense, DistanceTable, T5
from xtk.reference.attention import attention as reference

from tolerance import check_against_oracle

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TRITON = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["eager", "chunked"] + (["triton"] if TRITON else [])
B, H, HK, NQ, NK, D = 2, 6, 2, 9, 13, 16
FEATURES = ["none", "alibi", "t5", "dtable", "dense", "mask", "qknorm", "rotary", "topk"]


def _inputs(feature):
    g = torch.Generator().manual_seed(FEATURES.index(feature))

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).float().to(DEV)
    t = dict(q=rnd(B, H, NQ, D), k=rnd(B, HK, NK, D), v=rnd(B, HK, NK, D))
    if feature == "alibi":
        t["slopes"] = rnd(H - 2).abs()  # heads 4, 5 get none
    if feature in ("t5", "dtable"):
        t["table"] = rnd(32 if feature == "t5" else 2 * (NQ + NK) + 1, H) * 0.5
    if feature in ("dense", "mask"):
        t["dense"] = rnd(1 if feature == "dense" else B, H, NQ, NK)
    if feature == "qknorm":
        t["qs"], t["ks"] = rnd(H, 1, D) * 0.2 + 1.0, rnd(HK, 1, D) * 0.2 + 1.0
    return t


def _kwargs(feature, slopes=None, table=None, dense=None, qs=None, ks=None):
    kw = dict(is_causal=feature in ("alibi", "dtable", "rotary"), q_offset=NK - NQ)
    if feature == "alibi":
        kw["bias"] = Alibi(slopes)
    if feature == "t5":
        kw["bias"] = T5(table, num_buckets=32, max_distance=16, scale=0.5)
    if feature == "dtable":
        kw["bias"] = DistanceTable(table)
    if feature == "dense":
        kw["bias"] = Dense(dense)
    if feature == "mask":
        kw["attn_mask"] = dense
    if feature == "qknorm":
        kw["qk_norm"] = xtk.QKNorm(groups=2, scale=4.0, q_dim_scale=qs, k_dim_scale=ks)
    if feature == "rotary":
        kw["rotary"] = xtk.Rotary(8, 1.0 / 10000 ** (torch.arange(0, 8, 2, device=DEV).float() / 8))
    if feature == "topk":
        kw["topk"] = 4
    return kw


def _repeat_order(backend, feature):
    def call(q, k, v, **extra):
        return xtk.attention(q, k, v, enable_gqa=True, gqa_order="repeat", backend=backend, **_kwargs(feature, **extra))
    return call


def _oracle(feature):
    """No GQA at all: k, v (and the k dim scale) repeated to H heads, head i taking kv head i % HK."""
    def call(q, k, v, ks=None, **extra):
        r = H // HK
        ks = None if ks is None else ks.repeat(r, 1, 1)
        return reference(q, k.repeat(1, r, 1, 1), v.repeat(1, r, 1, 1), **_kwargs(feature, ks=ks, **extra))
    return call


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_repeat_order_equals_repeated_kv(backend, feature):
    inputs = _inputs(feature)
    grads = [n for n in inputs if not (feature == "mask" and n == "dense")]
    for dtype in (torch.float32,) + ((torch.bfloat16,) if backend != "triton" or CUDA else ()):
        check_against_oracle(_repeat_order(backend, feature), _oracle(feature), inputs, dtype, grad_names=grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_two_orders_differ_and_mqa_has_one(backend):
    """The switch is not a no-op (a test that cannot fail would pass it), and with one kv head both
    orders are the same attention."""
    t = _inputs("none")
    run = {o: xtk.attention(t["q"], t["k"], t["v"], enable_gqa=True, gqa_order=o, backend=backend)
           for o in ("interleave", "repeat")}
    assert (run["interleave"] - run["repeat"]).abs().max() > 0.1
    k1, v1 = t["k"][:, :1], t["v"][:, :1]
    a, b = (xtk.attention(t["q"], k1, v1, enable_gqa=True, gqa_order=o, backend=backend) for o in ("interleave", "repeat"))
    assert torch.equal(a, b)


def test_gqa_order_is_checked():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="gqa_order: expected 'interleave' .* or 'repeat' .*, got 'tile'"):
        xtk.attention(q, q[:, :2], q[:, :2], enable_gqa=True, gqa_order="tile")
