"""The ``chunked`` attention backend against the eager reference (SPEC §4's 2x rule), values and
gradients, over every bias kind, causal, q_offset, k_prefix, GQA, masks, fully masked rows,
odd lengths, nq != nk, QK-norm, rotary/xpos, top-k (exact logits), fp32/bf16, both cores."""
import itertools

import pytest
import torch

import xtk
from xtk import backends
from xtk.bias import Alibi, Dense, DistanceTable, T5, alibi_slopes
from xtk.ops import attention_chunked
from xtk.qk import QKNorm, Rotary, rotary_inv_freq, xpos_scale

from tolerance import check_against_oracle

H, D = 4, 16


def set_core(monkeypatch, name):
    """Many chunks per call (16 query rows) so that chunk seams and key cutting are exercised;
    'math-core' runs the plain chunk core used off CPU instead of the fused kernel."""
    monkeypatch.setattr(attention_chunked, "CAUSAL_CHUNK", 16)
    monkeypatch.setattr(attention_chunked, "MATERIALIZED_ELEMS", 1)
    monkeypatch.setattr(attention_chunked, "FORCE_MATH", name == "math-core")


@pytest.fixture(params=["small-chunks", "math-core"])
def core(request, monkeypatch):
    set_core(monkeypatch, request.param)
    return request.param


def make_bias(kind, b, nq, nk, g):
    """(descriptor factory taking the learned tensor, the tensor or None)."""
    if kind == "none":
        return (lambda t: None), None
    if kind == "alibi":  # 3 of 4 heads (non power of two count), learned slopes
        return Alibi, torch.tensor(alibi_slopes(3))
    if kind == "t5":
        return (lambda t: T5(t, num_buckets=32, max_distance=128, causal=False, scale=D ** 0.5)), torch.randn(32, H, generator=g)
    if kind == "t5c":
        return (lambda t: T5(t, num_buckets=16, max_distance=20, causal=True)), torch.randn(16, H, generator=g)
    if kind == "dt":
        return DistanceTable, torch.randn(2 * 300 - 1, H, generator=g)
    if kind == "dense":
        return Dense, torch.randn(H, nq, nk, generator=g)
    if kind == "dense_bool":
        keep = torch.rand(b, 1, nq, nk, generator=g) > 0.3
        keep[0, 0, nq // 2] = False  # a fully masked row
        return (lambda t: Dense(keep)), None
    raise ValueError(kind)


SHAPES = [  # nq, nk, q_offset, k_prefix
    (17, 17, 0, 0),
    (65, 130, 65, 0),     # bottom-right alignment (KV cache / models)
    (130, 65, 0, 0),      # nq > nk, top-left: causal rows past the keys
    (1, 17, 16, 0),       # one query (generation)
    (17, 65, 45, 3),      # memory key/values
    (17, 9, -2, 0),       # negative offset: causal rows with no key at all
]
KINDS = ["none", "alibi", "t5", "t5c", "dt", "dense", "dense_bool"]
CASES = [(kind, causal, shape) for kind, causal, shape in itertools.product(KINDS, [False, True], SHAPES)]


def run_case(kind, causal, shape, dtype, hk, pad, g):
    nq, nk, off, prefix = shape
    b = 2
    factory, table = make_bias(kind, b, nq, nk, g)
    inputs = dict(q=torch.randn(b, H, nq, D, generator=g), k=torch.randn(b, hk, nk, D, generator=g),
                  v=torch.randn(b, hk, nk, D, generator=g))
    grads = ["q", "k", "v"]
    if table is not None:
        inputs["table"] = table
        grads.append("table")
    mask = None
    if pad:
        mask = torch.ones(b, 1, 1, nk, dtype=torch.bool)
        mask[1, ..., nk // 2:] = False
        if nk > 1:
            mask[1, ..., 0] = False
        inputs["mask"] = mask

    def fn(backend):
        def call(q, k, v, table=None, mask=None):
            return xtk.attention(q, k, v, mask, is_causal=causal, enable_gqa=hk != H, bias=factory(table),
                                 q_offset=off, k_prefix=prefix, backend=backend)
        return call

    check_against_oracle(fn("chunked"), fn("eager"), inputs, dtype, grad_names=grads)


def _case_id(i):
    kind, causal, s = CASES[i]
    return f"{kind}-{'causal' if causal else 'full'}-{s[0]}x{s[1]}o{s[2]}p{s[3]}"


# every case in fp32 on the fused kernel; bf16 and the math core each on a different third
# (the case index also varies GQA and key padding, so each feature meets each in some dtype)
SWEEP = ([(i, torch.float32, "small-chunks") for i in range(len(CASES))]
         + [(i, torch.bfloat16, "small-chunks") for i in range(0, len(CASES), 3)]
         + [(i, torch.float32 if i % 2 else torch.bfloat16, "math-core") for i in range(1, len(CASES), 3)])


@pytest.mark.parametrize("case,dtype,core_name", SWEEP,
                         ids=[f"{c}-{_case_id(i)}-{str(d)[6:]}" for i, d, c in SWEEP])
def test_sweep(case, dtype, core_name, monkeypatch):
    set_core(monkeypatch, core_name)
    kind, causal, shape = CASES[case]
    g = torch.Generator().manual_seed(case)
    run_case(kind, causal, shape, dtype, hk=2 if case % 3 else H, pad=case % 4 == 1, g=g)


def test_float_attn_mask_gets_gradient_and_fully_masked_batch(core):
    g = torch.Generator().manual_seed(1)
    b, nq, nk = 2, 33, 40
    mask = torch.randn(b, 1, nq, nk, generator=g)
    mask[1, :, 5] = float("-inf")  # one row with no key
    inputs = dict(q=torch.randn(b, H, nq, D, generator=g), k=torch.randn(b, H, nk, D, generator=g),
                  v=torch.randn(b, H, nk, D, generator=g), mask=mask, slopes=torch.tensor(alibi_slopes(H)))

    def fn(backend):
        return lambda q, k, v, mask, slopes: xtk.attention(q, k, v, mask, is_causal=True, bias=Alibi(slopes),
                                                           q_offset=nk - nq, backend=backend)
    check_against_oracle(fn("chunked"), fn("eager"), inputs, torch.float32, grad_names=["q", "k", "v", "slopes"])
    # the float mask's own gradient (-inf entries excluded: both sides give 0 there)
    m1 = mask.clone().requires_grad_()
    m2 = mask.clone().requires_grad_()
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    xtk.attention(q, k, v, m1, backend="chunked").sum().backward()
    xtk.attention(q, k, v, m2, backend="eager").sum().backward()
    torch.testing.assert_close(m1.grad, m2.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups,dim_scales", [(1, False), (2, True)])
@pytest.mark.parametrize("xpos", [False, True])
def test_qk_norm_and_rotary(dtype, groups, dim_scales, xpos, core):
    g = torch.Generator().manual_seed(2)
    b, nq, nk, hk, prefix = 2, 65, 70, 2, 2
    rd = 8
    inputs = dict(q=torch.randn(b, H, nq, D, generator=g), k=torch.randn(b, hk, nk, D, generator=g),
                  v=torch.randn(b, hk, nk, D, generator=g),
                  table=torch.randn(32, H, generator=g))
    grads = ["q", "k", "v", "table"]
    if dim_scales:
        inputs["qs"] = torch.rand(H, 1, D, generator=g) + 0.5
        inputs["ks"] = torch.rand(hk, 1, D, generator=g) + 0.5
        grads += ["qs", "ks"]

    def fn(backend):
        def call(q, k, v, table, qs=None, ks=None):
            norm = QKNorm(groups=groups, scale=D ** -0.5 if dim_scales else 10.0, q_dim_scale=qs, k_dim_scale=ks)
            rot = Rotary(rd, rotary_inv_freq(rd), xpos_scale=xpos_scale(rd) if xpos else None, xpos_scale_base=64)
            return xtk.attention(q, k, v, is_causal=True, enable_gqa=True, bias=T5(table, causal=True),
                                 qk_norm=norm, rotary=rot, q_offset=nk - prefix - nq, k_prefix=prefix,
                                 backend=backend)
        return call
    check_against_oracle(fn("chunked"), fn("eager"), inputs, dtype, grad_names=grads)


def test_learned_qk_norm_scale_gets_gradient():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, H, 20, D, generator=g) for _ in range(3))
    out = []
    for backend in ("chunked", "eager"):
        s = torch.tensor(7.0, requires_grad=True)
        xtk.attention(q, k, v, is_causal=True, qk_norm=QKNorm(scale=s), backend=backend).square().sum().backward()
        out.append(s.grad)
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("topk", [1, 3, 8, 40])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["none", "alibi", "dense_bool"])
def test_topk_exact_logits(topk, causal, kind, core):
    """Small-integer q/k and a power-of-two scale make every logit exact, with many ties."""
    g = torch.Generator().manual_seed(topk)
    b, nq, nk = 2, 33, 37
    q = torch.randint(-2, 3, (b, H, nq, D), generator=g).float()
    k = torch.randint(-2, 3, (b, 2, nk, D), generator=g).float()
    v = torch.randn(b, 2, nk, D, generator=g)
    factory, table = make_bias(kind, b, nq, nk, g)
    if kind == "alibi":
        table = torch.tensor([0.5, 0.25, 0.125])
    outs, grads = [], []
    for backend in ("chunked", "eager"):
        qq, kk, vv = (t.clone().double().requires_grad_() for t in (q, k, v))
        o = xtk.attention(qq, kk, vv, is_causal=causal, scale=0.25, enable_gqa=True, bias=factory(table),
                          topk=topk, q_offset=nk - nq, backend=backend)
        o.backward(torch.ones_like(o))
        outs.append(o)
        grads.append((qq.grad, kk.grad, vv.grad))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-10)
    for a, e in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


def test_auto_picks_chunked_on_cpu_and_reasons():
    q = torch.randn(1, 2, 4, 8)
    inputs = xtk.ops.attention._validate(q, q, q, None, 0.0, True, None, False, None, None, None, None, None, 0, None)
    assert attention_chunked.reasons(inputs, False) == []
    drop = xtk.ops.attention._validate(q, q, q, None, 0.1, True, None, False, None, None, None, None, None, 0, None)
    why = attention_chunked.reasons(drop, False)
    assert why and "dropout" in why[0]
    with pytest.raises(RuntimeError, match="dropout"):
        xtk.attention(q, q, q, dropout_p=0.1, backend="chunked")
    if backends.load("attention", "triton") is not None and backends.reasons("attention", "triton", inputs, False):
        assert backends.pick("attention", inputs).name == "chunked"


def test_backward_keeps_no_quadratic_state():
    """What autograd keeps between forward and backward is O(n d), not the (h, n, n) bias."""
    n, h, d = 512, 4, 16
    q, k, v = (torch.randn(1, h, n, d, requires_grad=True) for _ in range(3))
    slopes = torch.tensor(alibi_slopes(h), requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = xtk.attention(q, k, v, is_causal=True, bias=Alibi(slopes), backend="chunked")
    assert max(saved) <= h * n * d, f"a saved tensor has {max(saved)} elements (quadratic: {h * n * n})"
    out.sum().backward()
    assert slopes.grad is not None and torch.isfinite(slopes.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nq,nk,hk", [(17, 17, 4), (130, 65, 2), (65, 130, 1), (1, 1, 4)])
@pytest.mark.parametrize("kind", ["none"])
def test_native_causal_path(dtype, nq, nk, hk, kind):
    """Top-left causal with no bias runs one kernel call with the kernel's own causal flag."""
    g = torch.Generator().manual_seed(nq + nk)
    slopes = torch.tensor(alibi_slopes(H)) * 4  # steep: the dropped row constant is large
    inputs = dict(q=torch.randn(2, H, nq, D, generator=g), k=torch.randn(2, hk, nk, D, generator=g),
                  v=torch.randn(2, hk, nk, D, generator=g))

    def fn(backend):
        return lambda q, k, v: xtk.attention(q, k, v, is_causal=True, enable_gqa=hk != H,
                                             bias=Alibi(slopes) if kind == "alibi" else None, backend=backend)
    q = torch.zeros(2, H, nq, D)
    plan = attention_chunked._make_plan(xtk.ops.attention._validate(
        q, inputs["k"], inputs["v"], None, 0.0, True, None, hk != H, Alibi(slopes) if kind == "alibi" else None,
        None, None, None, None, 0, None), q, D ** -0.5)
    assert plan.native_causal and not plan.toeplitz and plan.chunk == nq
    check_against_oracle(fn("chunked"), fn("eager"), inputs, dtype, grad_names=["q", "k", "v"])


def test_learned_bias_backward_chunks_are_bounded(monkeypatch):
    """Non-causal T5 with a learned table: the forward is one kernel call over all rows, the
    backward's math core still works chunk by chunk (here 16 rows), and gives the same gradients."""
    monkeypatch.setattr(attention_chunked, "MATERIALIZED_ELEMS", 1)
    seen = []
    original = attention_chunked._math_bwd

    def spy(plan, go, qc, *rest):
        seen.append(qc.shape[2])
        return original(plan, go, qc, *rest)
    monkeypatch.setattr(attention_chunked, "_math_bwd", spy)
    g = torch.Generator().manual_seed(5)
    inputs = dict(q=torch.randn(1, H, 70, D, generator=g), k=torch.randn(1, H, 70, D, generator=g),
                  v=torch.randn(1, H, 70, D, generator=g), table=torch.randn(32, H, generator=g))

    def fn(backend):
        return lambda q, k, v, table: xtk.attention(q, k, v, bias=T5(table), backend=backend)
    check_against_oracle(fn("chunked"), fn("eager"), inputs, torch.float32, grad_names=["q", "k", "v", "table"])
    assert seen and max(seen) == 16
