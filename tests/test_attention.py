"""xtk.attention: the eager path against SDPA and against naive per-feature formulas; input errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import xtk
from xtk.bias import Alibi, Dense, DistanceTable, T5, alibi_slopes, t5_bucket


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("nq,nk", [(1, 1), (17, 17), (17, 9), (5, 33)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hk", [4, 2, 1])
def test_equals_sdpa(nq, nk, causal, hk):
    q, k, v = rand(2, 4, nq, 16), rand(2, hk, nk, 16), rand(2, hk, nk, 8)
    gqa = hk != 4
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    got = xtk.attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_equals_sdpa_with_mask_and_scale(kind):
    q, k, v = rand(2, 4, 7, 16), rand(2, 4, 11, 16), rand(2, 4, 11, 16)
    mask = torch.rand(2, 1, 7, 11) > 0.3 if kind == "bool" else rand(2, 4, 7, 11)
    if kind == "bool":
        mask[..., 0] = True  # SDPA's math path gives NaN rows when all masked; checked separately
    want = F.scaled_dot_product_attention(q, k, v, mask, scale=0.3)
    torch.testing.assert_close(xtk.attention(q, k, v, mask, scale=0.3), want, atol=1e-5, rtol=1e-5)


def naive(q, k, v, bias_hij, keep_hij):
    """Per-row loop, float64: the definition of attention with an additive bias and a keep-mask."""
    b, h, nq, d = q.shape
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                s = (k[bi, hi].double() @ q[bi, hi, i].double()) * d ** -0.5 + bias_hij[hi, i]
                keep = keep_hij[hi, i]
                if keep.any():
                    p = torch.softmax(s[keep], 0)
                    out[bi, hi, i] = p @ v[bi, hi][keep].double()
    return out


def test_alibi_with_offset_and_prefix_matches_naive():
    b, h, nq, nk, d, prefix, off = 1, 4, 5, 9, 8, 2, 3
    q, k, v = rand(b, h, nq, d), rand(b, h, nk, d), rand(b, h, nk, d)
    slopes = torch.tensor(alibi_slopes(2))
    bias = torch.zeros(h, nq, nk, dtype=torch.float64)
    keep = torch.ones(h, nq, nk, dtype=torch.bool)
    for hh in range(h):
        for i in range(nq):
            for j in range(nk):
                if j >= prefix:
                    pi, pj = off + i, j - prefix
                    bias[hh, i, j] = -slopes[hh].item() * abs(pi - pj) if hh < 2 else 0.0
                    keep[hh, i, j] = pj <= pi
    got = xtk.attention(q, k, v, is_causal=True, bias=Alibi(slopes), q_offset=off, k_prefix=prefix)
    torch.testing.assert_close(got.double(), naive(q, k, v, bias, keep), atol=1e-5, rtol=1e-5)


def test_alibi_slopes_spec_values():
    assert alibi_slopes(4) == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]
    s6 = alibi_slopes(6)
    assert s6[:4] == alibi_slopes(4) and s6[4:] == alibi_slopes(8)[0::2][:2]


def test_t5_bucket_boundaries():
    # bidirectional, 32 buckets -> 16 per side, exact below 8, log-spaced to distance 128
    rel = torch.tensor([0, -1, -7, -8, -16, -32, -64, -127, -128, -1000, 1, 7, 8, 1000])
    got = t5_bucket(rel, 32, 128, causal=False).tolist()
    assert got[:4] == [0, 1, 7, 8]
    assert got[4] == 8 + math.floor(math.log(2) / math.log(16) * 8)  # n=16 -> 10
    assert got[8] == got[9] == 15 and got[10] == 17 and got[-1] == 31


def test_distance_table_and_t5_match_naive_lookup():
    h, nq, nk = 3, 4, 6
    q, k, v = rand(1, h, nq, 8), rand(1, h, nk, 8), rand(1, h, nk, 8)
    L = 8
    table = rand(2 * L - 1, h)
    bias = torch.stack([torch.tensor([[table[(i + 2 - j) + L - 1, hh].item() for j in range(nk)] for i in range(nq)]) for hh in range(h)])
    got = xtk.attention(q, k, v, bias=DistanceTable(table), q_offset=2)
    torch.testing.assert_close(got.double(), naive(q, k, v, bias.double(), torch.ones(h, nq, nk, dtype=torch.bool)), atol=1e-5, rtol=1e-5)
    t5 = rand(32, h)
    bias = torch.stack([torch.tensor([[t5[t5_bucket(torch.tensor(j - i), 32, 128, False), hh].item() * 2.0 for j in range(nk)] for i in range(nq)]) for hh in range(h)])
    got = xtk.attention(q, k, v, bias=T5(t5, scale=2.0))
    torch.testing.assert_close(got.double(), naive(q, k, v, bias.double(), torch.ones(h, nq, nk, dtype=torch.bool)), atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_give_zeros_and_finite_grads():
    q, k, v = (rand(1, 2, 4, 8).requires_grad_() for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1, :] = False
    out = xtk.attention(q, k, v, mask)
    assert (out[:, :, 1] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # causal with nq > nk and q_offset 0: the first rows see keys, none are empty; offset -2 empties two
    out = xtk.attention(q, k[:, :, :2], v[:, :, :2], is_causal=True, q_offset=-2)
    assert (out[:, :, :2] == 0).all() and (out[:, :, 2:] != 0).any()


def test_topk_keeps_ties_and_never_masked():
    q = torch.zeros(1, 1, 1, 4)
    k = torch.zeros(1, 1, 6, 4)
    v = torch.eye(6).reshape(1, 1, 6, 6)[..., :6]
    # logits via a dense bias: exactly representable, with a tie at the 2nd place
    bias = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 5.0]).reshape(1, 1, 1, 6)
    keep = torch.tensor([True, True, True, True, True, False]).reshape(1, 1, 1, 6)
    out = xtk.attention(q, k, v, keep, bias=Dense(bias), topk=2)
    kept = (out[0, 0, 0] > 0).tolist()
    assert kept == [True, False, True, True, False, False]


def test_qk_norm_and_rotary_match_naive():
    b, h, n, d = 1, 2, 5, 8
    q, k, v = rand(b, h, n, d), rand(b, h, n, d), rand(b, h, n, d)
    qs, ks = torch.rand(h, 1, d) + 0.5, torch.rand(h, 1, d) + 0.5
    got = xtk.attention(q, k, v, qk_norm=xtk.QKNorm(groups=2, scale=3.0, q_dim_scale=qs, k_dim_scale=ks))
    qn = F.normalize(q.view(b, h, n, 2, 4), dim=-1).view(b, h, n, d) * qs
    kn = F.normalize(k.view(b, h, n, 2, 4), dim=-1).view(b, h, n, d) * ks
    want = torch.softmax(qn @ kn.transpose(-1, -2) * 3.0, -1) @ v
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    inv = xtk.qk.rotary_inv_freq(4)
    rot = xtk.Rotary(4, inv)
    got = xtk.attention(q, k, v, rotary=rot)

    def rotate(x):
        y = x.clone()
        for p in range(n):
            for m in range(2):
                a = p * inv[m].item()
                x0, x1 = x[..., p, 2 * m], x[..., p, 2 * m + 1]
                y[..., p, 2 * m] = x0 * math.cos(a) - x1 * math.sin(a)
                y[..., p, 2 * m + 1] = x1 * math.cos(a) + x0 * math.sin(a)
        return y
    want = F.scaled_dot_product_attention(rotate(q), rotate(k), v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: xtk.attention(q, k[:, :3], v[:, :3], enable_gqa=True), "divisible"),
    (lambda q, k, v: xtk.attention(q, k[:, :2], v[:, :2]), "enable_gqa"),
    (lambda q, k, v: xtk.attention(q, k.double(), v), "dtype"),
    (lambda q, k, v: xtk.attention(q, k, v[..., :3, :]), "v:"),
    (lambda q, k, v: xtk.attention(q, k, v, torch.ones(3, 3)), "attn_mask"),
    (lambda q, k, v: xtk.attention(q, k, v, torch.ones(5, 5, dtype=torch.int64)), "attn_mask"),
    (lambda q, k, v: xtk.attention(q, k, v, topk=0), "topk"),
    (lambda q, k, v: xtk.attention(q, k, v, bias=Alibi(torch.ones(5))), "slopes"),
    (lambda q, k, v: xtk.attention(q, k, v, bias=DistanceTable(torch.ones(5, 4))), "distances"),
    (lambda q, k, v: xtk.attention(q, k, v, qk_norm=xtk.QKNorm(groups=3)), "groups"),
    (lambda q, k, v: xtk.attention(q, k, v, backend="nope"), "backend"),
    (lambda q, k, v: xtk.attention(q, k, v, backend="triton" if False else "ext"), "ext"),
])
def test_bad_input_errors_name_the_argument(call, match):
    q, k, v = rand(1, 4, 5, 8), rand(1, 4, 5, 8), rand(1, 4, 5, 8)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(q, k, v)


def test_xtk_backend_env_forces_and_raises(monkeypatch):
    q = rand(1, 2, 3, 8)
    monkeypatch.setenv("XTK_BACKEND", "eager")
    xtk.attention(q, q, q)
    monkeypatch.setenv("XTK_BACKEND", "bogus")
    with pytest.raises(ValueError, match="XTK_BACKEND"):
        xtk.attention(q, q, q)


def test_three_d_inputs_like_sdpa():
    q, k, v = rand(3, 7, 8), rand(3, 5, 8), rand(3, 5, 8)
    mask = torch.rand(3, 7, 5) > 0.2
    mask[..., 0] = True
    torch.testing.assert_close(xtk.attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask))
    torch.testing.assert_close(xtk.attention(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
