"""Issue 12's accepted-bad-input and crash items for ``xtk.attention`` and its bias descriptors:
fp16 logits that overflow only before scaling (eager), double backward through the chunked backend's
learned biases, DistanceTable with no queries, T5's ``max_distance`` bound (checked against
x-transformers), and SDPA's ``query``/``key``/``value`` keyword names."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import xtk
from xtk.bias import Alibi, Dense, DistanceTable, T5, t5_bucket, t5_min_max_distance
from xtk.reference.attention import attention as reference, split_scale


# ----------------------------------------------------------------------------- eager fp16 overflow
def test_eager_fp16_logits_that_fit_after_scaling_do_not_overflow():
    """q . k = 64 * 40 * 60 ~ 1.5e5 > fp16's 65504, the scaled logit ~ 2e4 fits (the issue's repro)."""
    torch.manual_seed(0)
    q = torch.full((1, 1, 4, 64), 40.).half()
    k = (torch.rand(1, 1, 6, 64) * 40 + 20).half()
    v = torch.randn(1, 1, 6, 64).half()
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    for backend in ("eager", "chunked"):
        out = xtk.attention(q, k, v, backend=backend)
        assert torch.isfinite(out).all(), backend
        assert (out.double() - want).abs().max() < 1e-2, backend
    # with a mask and top-k (the chunked backend's top-k threshold uses the reference's logits)
    keep = torch.tensor([True, True, False, True, True, True])
    for backend in ("eager", "chunked"):
        out = xtk.attention(q, k, v, keep, topk=3, backend=backend)
        assert torch.isfinite(out).all(), backend


@pytest.mark.parametrize("scale", [None, 0.3, 1 / 3, 2.0 ** -3, 7.0])
@pytest.mark.parametrize("d", [16, 24, 32])
def test_eager_fp64_oracle_is_the_plain_formula_bit_for_bit(scale, d):
    """The overflow fix moves only a power of two of the scale before the product: the fp64 oracle
    (and every other dtype, barring subnormals) gives exactly softmax((q @ k^T) * scale) @ v."""
    torch.manual_seed(d)
    q, k, v = (torch.randn(2, 3, n, d, dtype=torch.float64) for n in (5, 7, 7))
    s = scale if scale is not None else d ** -0.5
    want = torch.softmax((q @ k.transpose(-1, -2)) * s, -1) @ v
    assert torch.equal(reference(q, k, v, scale=scale), want)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        qq, kk, vv = q.to(dtype), k.to(dtype), v.to(dtype)
        logits = (qq @ kk.transpose(-1, -2)).float() * s
        want = (torch.softmax(logits, -1).to(dtype) @ vv)
        assert torch.equal(reference(qq, kk, vv, scale=scale), want), dtype


def test_eager_learned_scale_gradient_unchanged():
    """A learned logit scale (QK-norm) keeps its gradient through the split, exactly."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    lam = torch.tensor(3.7, dtype=torch.float64, requires_grad=True)
    reference(q, k, v, scale=lam).square().sum().backward()
    lam2 = lam.detach().clone().requires_grad_()
    (torch.softmax((q @ k.transpose(-1, -2)) * lam2, -1) @ v).square().sum().backward()
    assert torch.equal(lam.grad, lam2.grad)


@pytest.mark.parametrize("scale", [1.0, 0.75, 2.0 ** -7, 3e-5, 1e4, -0.3, 0.0])
def test_split_scale(scale):
    two, rest = split_scale(scale)
    assert two * rest == scale
    if scale:
        assert math.log2(two).is_integer() and two <= abs(scale) < 2 * two
    t_two, t_rest = split_scale(torch.tensor(scale, dtype=torch.float64))
    assert float(t_two) == two and float(t_rest) == rest


# ----------------------------------------------------------------------------- double backward (chunked)
def _bias(kind, h, nq, nk, g):
    if kind == "none":
        return None, None
    if kind == "alibi":
        t = torch.rand(h, dtype=torch.float64, generator=g)
        return t, Alibi
    if kind == "t5":
        t = torch.randn(8, h, dtype=torch.float64, generator=g)
        return t, lambda x: T5(x, num_buckets=8, max_distance=16, causal=True)
    if kind == "dt":
        t = torch.randn(2 * (nq + nk) - 1, h, dtype=torch.float64, generator=g)
        return t, DistanceTable
    if kind == "dense":
        t = torch.randn(1, h, nq, nk, dtype=torch.float64, generator=g)
        return t, Dense
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["alibi", "t5", "dt", "dense", "none"])
def test_chunked_double_backward(kind):
    """create_graph=True through the chunked backend with a learned bias (the issue: a RuntimeError from
    inside xtk): the first-order gradients equal the ordinary backward's, the second-order ones
    the eager backend's, and gradgradcheck passes."""
    g = torch.Generator().manual_seed(3)
    b, h, hk, nq, nk, d = 1, 2, 1, 4, 6, 4
    q = torch.randn(b, h, nq, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(b, hk, nk, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(b, hk, nk, d, dtype=torch.float64, generator=g, requires_grad=True)
    table, make = _bias(kind, h, nq, nk, g)
    leaves = [q, k, v] + ([table.requires_grad_()] if table is not None else [])

    def f(backend):
        def call(q, k, v, *t):
            return xtk.attention(q, k, v, is_causal=True, enable_gqa=True, q_offset=nk - nq, backend=backend,
                                 bias=make(t[0]) if t else None)
        return call

    plain = torch.autograd.grad(f("chunked")(*leaves).square().sum(), leaves)
    results = {}
    for backend in ("chunked", "eager"):
        first = torch.autograd.grad(f(backend)(*leaves).square().sum(), leaves, create_graph=True)
        penalty = sum(x.square().sum() for x in first)
        results[backend] = (first, torch.autograd.grad(penalty, leaves))
    for a, p in zip(results["chunked"][0], plain):
        torch.testing.assert_close(a, p, rtol=1e-10, atol=1e-12)
    for a, e in zip(results["chunked"][1], results["eager"][1]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)
    assert torch.autograd.gradgradcheck(f("chunked"), tuple(leaves))


def test_chunked_double_backward_through_the_t5_module():
    """A gradient penalty through a model's T5 module (its embedding table a Parameter) on the
    default CPU backend, bottom-right aligned as the models call it (what the issue hit)."""
    from xtk.modules.positional import RelativePositionBias
    torch.manual_seed(0)
    rel = RelativePositionBias(scale=8 ** 0.5, causal=True, num_buckets=16, max_distance=32, heads=2)
    x = torch.randn(2, 2, 9, 8, requires_grad=True)
    out = xtk.attention(x, x, x, is_causal=True, bias=rel.descriptor(), q_offset=0)
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    grad.square().sum().backward()
    table = rel.relative_attention_bias.weight
    assert table.grad is not None and torch.isfinite(table.grad).all() and table.grad.abs().sum() > 0
    eager = table.grad.clone()
    table.grad = None
    out = xtk.attention(x, x, x, is_causal=True, bias=rel.descriptor(), q_offset=0, backend="eager")
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    grad.square().sum().backward()
    torch.testing.assert_close(table.grad, eager, rtol=1e-4, atol=1e-4)  # fp32: the forwards differ in rounding


# ----------------------------------------------------------------------------- DistanceTable, no queries
@pytest.mark.parametrize("backend", ["eager", "chunked", "triton"])
@pytest.mark.parametrize("rows,q_offset,nk", [(1, 0, 1), (3, 5, 4), (9, 0, 5)])
def test_distance_table_with_no_queries(backend, rows, q_offset, nk):
    """nq = 0 forms no distance: no coverage error, an empty output and zero table gradient."""
    device = "cpu"
    if backend == "triton":
        from test_attention_strides import triton_device
        device = triton_device()
        if device is None:
            pytest.skip("triton cannot run here")
    table = torch.randn(rows, 2, device=device, requires_grad=True)
    q = torch.randn(1, 2, 0, 16, device=device, requires_grad=True)
    k, v = torch.randn(1, 2, nk, 16, device=device), torch.randn(1, 2, nk, 16, device=device)
    out = xtk.attention(q, k, v, bias=DistanceTable(table), q_offset=q_offset, backend=backend)
    assert out.shape == (1, 2, 0, 16)
    out.sum().backward()
    assert table.grad is None or not table.grad.any()


def test_distance_table_coverage_still_checked():
    table = torch.randn(3, 2)  # distances -1..1
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="bias.table: covers distances up to 1, the call needs 2"):
        xtk.attention(q, k, k, bias=DistanceTable(table))


# ----------------------------------------------------------------------------- T5 max_distance
@pytest.mark.parametrize("num_buckets,max_distance,causal,smallest", [
    (16, 4, True, 9), (16, 8, True, 9), (32, 8, False, 9), (32, 7, False, 9), (32, 16, True, 17), (8, 1, False, 3)])
def test_t5_max_distance_at_or_below_exact_range_is_refused(num_buckets, max_distance, causal, smallest):
    assert t5_min_max_distance(num_buckets, causal) == smallest
    table = torch.randn(num_buckets, 2)
    with pytest.raises(ValueError, match=rf"max_distance: expected at least {smallest} .* got {max_distance}"):
        T5(table, num_buckets=num_buckets, max_distance=max_distance, causal=causal)
    with pytest.raises(ValueError, match="max_distance"):
        t5_bucket(torch.arange(-5, 5), num_buckets, max_distance, causal)
    T5(table, num_buckets=num_buckets, max_distance=smallest, causal=causal)  # the bound itself is valid


@pytest.mark.parametrize("num_buckets,causal,error", [(1, True, "at least 2"), (3, False, "at least 4"),
                                                      (2.0, True, "expected an int")])
def test_t5_num_buckets_too_small(num_buckets, causal, error):
    with pytest.raises((ValueError, TypeError), match=f"num_buckets: (expected )?{error}"):
        T5(torch.randn(4, 2), num_buckets=num_buckets, max_distance=100, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_buckets", [2, 4, 5, 8, 16, 32])
def test_t5_bound_matches_x_transformers(num_buckets, causal):
    """x-transformers' own bucket function fails (IndexError in its embedding, or a division by
    zero) at max_distance = bound - 1 and works at the bound, with the same buckets as xtk."""
    xt = pytest.importorskip("x_transformers.x_transformers")
    if not causal and num_buckets < 4:
        pytest.skip("no valid max_distance: the bidirectional formula needs num_buckets >= 4")
    bound = t5_min_max_distance(num_buckets, causal)
    rel = torch.arange(-300, 301)
    heads = 2
    for md, valid in ((bound - 1, False), (bound, True), (bound + 3, True)):
        module = xt.RelativePositionBias(scale=1.0, causal=causal, num_buckets=num_buckets, max_distance=md,
                                         heads=heads)
        if not valid:
            with pytest.raises((IndexError, ZeroDivisionError, RuntimeError)):
                module(40, 40)
            continue
        module(40, 40)
        theirs = xt.RelativePositionBias._relative_position_bucket(rel, causal=causal, num_buckets=num_buckets,
                                                                    max_distance=md)
        assert torch.equal(t5_bucket(rel, num_buckets, md, causal), theirs)


# ----------------------------------------------------------------------------- SDPA's keyword names
def test_chunked_keyword_names():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for backend in ("eager", "chunked"):
        got = [xtk.attention(query=q, key=k, value=v, is_causal=True, backend=backend),
               xtk.attention(q=q, k=k, v=v, is_causal=True, backend=backend),
               xtk.attention(q, key=k, value=v, is_causal=True, backend=backend),
               xtk.attention(q, k, v, None, 0.0, True, backend=backend)]
        for out in got:
            torch.testing.assert_close(out, want)
    # SDPA's 3-D (N, L, E) form with keywords
    torch.testing.assert_close(xtk.attention(query=q[0], key=k[0], value=v[0]),
                               F.scaled_dot_product_attention(q[0], k[0], v[0]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=0, query=0, k=0, v=0), "got both q and query"),
    (dict(q=0, k=0, key=0, value=0), "got both k and key"),
    (dict(query=0, key=0, v=0, value=0), "got both v and value"),
    (dict(query=0, key=0), "missing the value tensor"),
    (dict(), "missing the query tensor"),
])
def test_both_spellings_or_none_is_a_type_error(kwargs, match):
    t = torch.randn(1, 1, 3, 4)
    with pytest.raises(TypeError, match=match):
        xtk.attention(**{name: t for name in kwargs})


def test_positional_and_keyword_spelling_of_one_argument():
    t = torch.randn(1, 1, 3, 4)
    with pytest.raises(TypeError, match="got both q and query"):
        xtk.attention(t, t, t, query=t)


# ----------------------------------------------------------------------------- a causal mask that hides nothing
@pytest.mark.parametrize("backend", ["eager", "chunked", "triton"])
@pytest.mark.parametrize("nq,nk,k_prefix,q_offset", [(1, 9, 0, 8), (3, 9, 2, 6), (2, 5, 5, 0), (1, 7, 0, 20)])
def test_causal_that_hides_nothing_is_dropped(backend, nq, nk, k_prefix, q_offset, monkeypatch):
    """Decode steps over a whole cache (the first query at or past the last key's position) take the
    unmasked path: is_causal is dropped in validation, with the same values and gradients; one
    position earlier the mask hides a key and stays."""
    if backend == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs CUDA or the Triton interpreter")
    from xtk.ops import attention as attention_op
    seen = []
    real = attention_op._validate
    monkeypatch.setattr(attention_op, "_validate", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
    q, k, v = (torch.randn(1, 2, n, 16, device=dev, requires_grad=True) for n in (nq, nk, nk))
    bias = Alibi(torch.tensor([0.5, 0.25], device=dev))
    kw = dict(q_offset=q_offset, k_prefix=k_prefix, bias=bias, backend=backend)
    causal = xtk.attention(q, k, v, is_causal=True, **kw)
    assert seen[-1].is_causal is False
    grads = torch.autograd.grad(causal.sum(), (q, k, v))
    plain = xtk.attention(q, k, v, is_causal=False, **kw)
    assert torch.equal(causal, plain)
    for a, b in zip(grads, torch.autograd.grad(plain.sum(), (q, k, v))):
        assert torch.equal(a, b)
    if nk - k_prefix > 0 and q_offset > -1:  # one position earlier: the last key is hidden from query 0
        xtk.attention(q, k, v, is_causal=True, **dict(kw, q_offset=nk - 2 - k_prefix))
        assert seen[-1].is_causal is True


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_buckets,extra", [(4, 0), (8, 1), (16, 0), (32, 0), (32, 100), (5, 7)])
def test_t5_buckets_saturate_at_max_distance(num_buckets, extra, causal):
    """The kernels' T5 table stops at |p_i - p_j| = max_distance and clamps farther distances to its
    edge rows (``T5.kernel_args``): every farther distance must have the edge's bucket."""
    md = t5_min_max_distance(num_buckets, causal) + extra
    far = torch.arange(md, 20 * md + 1000)
    for sign in (1, -1):  # rel = p_j - p_i
        buckets = t5_bucket(sign * far, num_buckets, md, causal)
        assert torch.equal(buckets, buckets[:1].expand_as(buckets)), (sign, buckets.unique())
    table = torch.randn(num_buckets, 3)
    bias = T5(table, num_buckets=num_buckets, max_distance=md, causal=causal)
    kt = bias.kernel_args(3, 7, 5000, 0, 0).table
    assert kt.shape == (2 * md + 1, 3)
    dist = torch.arange(-4000, 4001)
    clamped = dist.clamp(-md, md) + md
    assert torch.equal(kt[clamped], bias.at_distance(dist, 3, torch.float32).t())
