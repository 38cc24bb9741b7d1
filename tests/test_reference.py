"""The eager oracle itself: norms and GLUs against their formulas, attention gradients by gradcheck,
rotary/xpos against a per-element formula."""
import math

import pytest
import torch
import torch.nn.functional as F

import xtk
from xtk.bias import Alibi, Dense, DistanceTable, T5
from xtk.reference import attention as ref_attention
from xtk.reference import glu as ref_glu
from xtk.reference import rms_norm as ref_norm


@pytest.mark.parametrize("dim", [1, 7, 64])
def test_rms_norm_formula(dim):
    x, g = torch.randn(5, dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    want = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * math.sqrt(dim) * g
    torch.testing.assert_close(xtk.rms_norm(x, g), want)
    r = torch.randn_like(x)
    y, s = xtk.rms_norm(x, g, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, ref_norm.rms_norm(x + r, g))
    scale = torch.tensor([2.5], dtype=torch.float64)  # ScaleNorm: one learned scalar
    torch.testing.assert_close(xtk.rms_norm(x, scale), want / g * 2.5)


def test_rms_norm_zero_row_is_finite():
    x = torch.zeros(2, 8, requires_grad=True)
    y = xtk.rms_norm(x, torch.ones(8))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("act,fn", [
    ("gelu", lambda g: 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))),
    ("gelu_tanh", lambda g: 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))),
    ("silu", lambda g: g / (1 + torch.exp(-g))),
    ("relu", lambda g: g.clamp_min(0)),
    ("relu_squared", lambda g: g.clamp_min(0) ** 2),
])
def test_glu_and_activation_formulas(act, fn):
    x = torch.randn(3, 10, dtype=torch.float64)
    a, g = x[:, :5], x[:, 5:]
    torch.testing.assert_close(xtk.glu(x, act), a * fn(g))
    torch.testing.assert_close(xtk.ops.glu.activation(x, act), fn(x))


def test_glu_errors():
    with pytest.raises(ValueError, match="even last dim"):
        xtk.glu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="activation"):
        xtk.glu(torch.randn(3, 4), "tanh")
    with pytest.raises(ValueError, match="weight"):
        xtk.rms_norm(torch.randn(3, 4), torch.ones(5))
    with pytest.raises(ValueError, match="residual"):
        xtk.rms_norm(torch.randn(3, 4), torch.ones(4), residual=torch.randn(3, 5))


def _gradcheck_attention(**kw):
    torch.manual_seed(0)
    b, h, hk, nq, nk, d = 1, 4, 2, 3, 5, 4
    q = torch.randn(b, h, nq, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hk, nk, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hk, nk, d, dtype=torch.float64, requires_grad=True)
    extra = kw.pop("tensors", ())
    bias_fn = kw.pop("bias_fn", None)

    def f(q, k, v, *t):
        bias = bias_fn(*t) if bias_fn else None
        return xtk.attention(q, k, v, enable_gqa=True, bias=bias, backend="eager", **kw)
    assert torch.autograd.gradcheck(f, (q, k, v, *extra))


@pytest.mark.parametrize("case", ["alibi", "t5", "table", "dense", "qknorm_rotary_xpos"])
def test_reference_gradients_gradcheck(case):
    f64 = dict(dtype=torch.float64, requires_grad=True)
    if case == "alibi":
        _gradcheck_attention(is_causal=True, q_offset=2, k_prefix=1, tensors=(torch.rand(3, **f64),), bias_fn=Alibi)
    elif case == "t5":
        _gradcheck_attention(tensors=(torch.randn(8, 4, **f64),), bias_fn=lambda t: T5(t, num_buckets=8, max_distance=16))
    elif case == "table":
        _gradcheck_attention(is_causal=True, q_offset=2, tensors=(torch.randn(11, 4, **f64),), bias_fn=DistanceTable)
    elif case == "dense":
        _gradcheck_attention(tensors=(torch.randn(1, 4, 3, 5, **f64),), bias_fn=Dense)
    else:
        qs, ks = torch.rand(4, 1, 4, **f64), torch.rand(2, 1, 4, **f64)
        rot = xtk.Rotary(2, xtk.qk.rotary_inv_freq(2).double(), xpos_scale=xtk.qk.xpos_scale(2).double(), xpos_scale_base=4)
        q = torch.randn(1, 4, 3, 4, **f64)
        k = torch.randn(1, 2, 5, 4, **f64)
        v = torch.randn(1, 2, 5, 4, **f64)

        def f(q, k, v, qs, ks):
            return xtk.attention(q, k, v, enable_gqa=True, qk_norm=xtk.QKNorm(2, 3.0, qs, ks), rotary=rot,
                                 q_offset=2, k_prefix=1, is_causal=True)
        assert torch.autograd.gradcheck(f, (q, k, v, qs, ks))


def test_xpos_scales_q_up_and_k_down():
    n, d = 6, 4
    x = torch.randn(1, 1, n, d, dtype=torch.float64)
    inv = xtk.qk.rotary_inv_freq(d).double()
    s = xtk.qk.xpos_scale(d).double()
    rot = xtk.Rotary(d, inv, xpos_scale=s, xpos_scale_base=8)
    pos = torch.arange(n)
    power = (pos - n // 2) / 8
    yq = ref_attention.rotary_apply(x, pos, rot, power)
    yk = ref_attention.rotary_apply(x, pos, rot, -power)
    plain = ref_attention.rotary_apply(x, pos, xtk.Rotary(d, inv), None)
    for p in range(n):
        for m in range(d // 2):
            f = s[m].item() ** power[p].item()
            for c in (2 * m, 2 * m + 1):
                assert math.isclose(yq[0, 0, p, c].item(), plain[0, 0, p, c].item() * f, rel_tol=1e-9, abs_tol=1e-12)
                assert math.isclose(yk[0, 0, p, c].item(), plain[0, 0, p, c].item() / f, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("xpos", [False, True])
def test_rotary_runs_in_fp32_and_rounds_once(dtype, xpos):
    """The oracle's rotary/xpos keeps cos, sin and the xpos scales in fp32 at every input dtype (as
    x-transformers) and rounds the rotated features once: bf16/fp16 input gives exactly the fp32
    computation on the same (rounded) input, rounded to the input dtype. (Rounding cos/sin to bf16
    first, as the oracle did before, is off by up to 2^-8 relative at every position.)"""
    from xtk.qk import Rotary, rotary_inv_freq, xpos_scale
    from xtk.reference.attention import rotary_apply
    d = 32
    rot = Rotary(d, rotary_inv_freq(d), xpos_scale=xpos_scale(d) if xpos else None)
    x = torch.randn(2, 3, 300, 40).to(dtype)
    pos = torch.arange(300) + 1000
    power = (pos - 650) / rot.xpos_scale_base if xpos else None
    got = rotary_apply(x, pos, rot, power)
    want = rotary_apply(x.float(), pos, rot, power).to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotary_is_the_pairwise_formula_exactly(dtype):
    """rotary_apply (x * cos + swap(x) * signed sin, times the xpos scale) gives the bits of the
    pair formula y0 = x0 cos - x1 sin, y1 = x1 cos + x0 sin in fp32 (fp64 angles rounded once), values
    and gradients, with a partial rotary dim; and the memoized tables (key) change nothing."""
    from xtk.qk import Rotary, rotary_inv_freq, xpos_scale
    from xtk.reference.attention import rotary_apply
    r, d, n = 16, 24, 37
    rot = Rotary(r, rotary_inv_freq(r), xpos_scale=xpos_scale(r), interpolation_factor=1.5)
    x = (torch.randn(2, 3, n, d) * 3).to(dtype).requires_grad_(True)
    pos = torch.arange(n) * 97 + 5
    power = (pos - 700) / 512
    work = torch.promote_types(dtype, torch.float32)
    theta = pos.double()[:, None] * rot.inv_freq.double()[None, :] / 1.5
    cos, sin = theta.cos().to(work), theta.sin().to(work)
    s = (rot.xpos_scale.double()[None, :] ** power.double()[:, None]).to(work)
    x0, x1 = x[..., :r].to(work)[..., 0::2], x[..., :r].to(work)[..., 1::2]
    y = torch.stack([(x0 * cos - x1 * sin) * s, (x1 * cos + x0 * sin) * s], -1).flatten(-2).to(dtype)
    want = torch.cat([y, x[..., r:]], -1)
    go = torch.randn_like(want)
    for key in (None, ("test", n)):
        got = rotary_apply(x, pos, rot, power, key=key)
        assert torch.equal(got, want)
        assert torch.equal(torch.autograd.grad(got, x, go)[0], torch.autograd.grad(want, x, go, retain_graph=True)[0])


def test_rotary_tables_memo_is_per_descriptor_and_key():
    """Tables kept under a key are reused by the same descriptor and key only; an in-place change of
    inv_freq (its version) or another key recomputes them; without a key nothing is kept."""
    from xtk.qk import Rotary, rotary_inv_freq
    from xtk.reference.attention import rotary_tables
    rot = Rotary(8, rotary_inv_freq(8))
    pos = torch.arange(5)
    a = rotary_tables(pos, rot, None, torch.float32, key=("k", 5))
    assert rotary_tables(pos, rot, None, torch.float32, key=("k", 5))[0] is a[0]
    b = rotary_tables(pos + 1, rot, None, torch.float32, key=("k", 6))
    assert not torch.equal(a[0], b[0])
    assert rotary_tables(pos, rot, None, torch.float32)[0] is not a[0]
    rot.inv_freq.mul_(2)
    c = rotary_tables(pos, rot, None, torch.float32, key=("k", 5))
    assert c[0] is not a[0] and not torch.equal(c[0], a[0])
    other = Rotary(8, rotary_inv_freq(8))
    assert rotary_tables(pos, other, None, torch.float32, key=("k", 5))[0] is not a[0]
