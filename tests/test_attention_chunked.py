"""What only the ``chunked`` attention backend has: top-k on exact float64 logits (both cores), its
reasons, bounded backward state, the fused kernel's native causal path, bounded learned-bias
chunks, ... The sweep over bias kinds, positions, masks, GQA, dtypes and QK features runs every
backend, chunked's two cores included, in tests/test_attention_sweep.py."""

import pytest
import torch

import xtk
from xtk import backends
from xtk.bias import Alibi, Dense, DistanceTable, T5, alibi_slopes
from xtk.ops import attention_chunked
from xtk.ops.attention import AttentionInputs

from tolerance import check_against_oracle

H, D = 4, 16


def set_core(monkeypatch, name):
    """Many chunks per call (16 query rows) so that chunk seams and key cutting are exercised;
    'math-core' runs the plain chunk core used off CPU instead of the fused kernel."""
    monkeypatch.setattr(attention_chunked, "CAUSAL_CHUNK", 16)
    monkeypatch.setattr(attention_chunked, "MATERIALIZED_ELEMS", 1)
    monkeypatch.setattr(attention_chunked, "EXT_BLOCK_ROWS", 16)
    monkeypatch.setattr(attention_chunked, "EXT_MIN_TASKS", 64)
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
def test_native_causal_path(monkeypatch, dtype, nq, nk, hk, kind):
    """Top-left causal with no bias runs one kernel call with the kernel's own causal flag (without
    the extension, which runs causal calls where it is built)."""
    monkeypatch.setattr(attention_chunked, "USE_EXT", False)
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
    if nk == 1:  # one key at position 0: the mask hides nothing, validation drops it
        assert not plan.causal and not plan.native_causal
    else:
        assert plan.native_causal and not plan.toeplitz and plan.chunk == nq
    check_against_oracle(fn("chunked"), fn("eager"), inputs, dtype, grad_names=["q", "k", "v"])


def test_learned_bias_backward_chunks_are_bounded(monkeypatch):
    """Non-causal T5 with a learned table: the forward is one kernel call over all rows, the
    backward's math core still works chunk by chunk (here 16 rows), and gives the same gradients.
    (The chunk loop, which runs without the extension; the extension's blocks: test_ext_*.)"""
    monkeypatch.setattr(attention_chunked, "MATERIALIZED_ELEMS", 1)
    monkeypatch.setattr(attention_chunked, "USE_EXT", False)
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


# ----------------------------------------------------------------------------- the extension's one-region path
def _ext_or_skip():
    if attention_chunked._ext_ops() is None:
        pytest.skip("xtk._C is not built (CI builds it): the chunk loop runs these cases")


def _distance_grads(kind, causal, hk, k_prefix, q_offset, nq, nk, topk=None):
    """Output and gradients (q, k, v, learned tensor) of one float64 call on the chunked backend."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, H, nq, D, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(2, hk, nk, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    if kind == "t5c":
        t = torch.randn(16, H, generator=g, dtype=torch.float64)
        make = lambda t: T5(t, num_buckets=16, max_distance=40, causal=True)  # noqa: E731
    elif kind == "alibi":
        t, make = torch.tensor(alibi_slopes(3), dtype=torch.float64), Alibi
    else:
        t, make = torch.randn(2 * (nq + nk + 8) - 1, H, generator=g, dtype=torch.float64), DistanceTable
    t.requires_grad_()
    out = xtk.attention(q, k, v, is_causal=causal, bias=make(t), k_prefix=k_prefix, q_offset=q_offset,
                        enable_gqa=hk != H, topk=topk, backend="chunked")
    return (out, *torch.autograd.grad(out, [q, k, v, t], torch.randn(out.shape, generator=g, dtype=out.dtype)))


@pytest.mark.parametrize("kind", ["t5c", "alibi", "dt"])
@pytest.mark.parametrize("causal,hk,k_prefix,q_offset,nq,nk,topk", [
    (True, 4, 0, 0, 70, 70, None), (True, 2, 3, 5, 17, 90, None), (False, 1, 0, -2, 130, 65, None),
    (True, 4, 3, -2, 1, 33, None), (False, 2, 0, 0, 65, 130, None), (True, 2, 0, 0, 70, 70, 5),
    (False, 4, 3, 0, 33, 65, 40)])
def test_ext_equals_chunk_loop(monkeypatch, kind, causal, hk, k_prefix, q_offset, nq, nk, topk):
    """The extension's one-region forward and backward (csrc/attention_cpu.cpp) compute the chunk
    loop's function, learned bias gradient included, within float64 rounding: small blocks, row
    groups (several tasks per head: dK/dV/distance sums per task), GQA, memory keys, offsets, top-k
    (random float64 logits: no ties, so both keep the same set)."""
    _ext_or_skip()
    monkeypatch.setattr(attention_chunked, "EXT_BLOCK_ROWS", 16)
    monkeypatch.setattr(attention_chunked, "EXT_MIN_TASKS", 64)
    ext = _distance_grads(kind, causal, hk, k_prefix, q_offset, nq, nk, topk)
    monkeypatch.setattr(attention_chunked, "USE_EXT", False)
    loop = _distance_grads(kind, causal, hk, k_prefix, q_offset, nq, nk, topk)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], ext, loop):
        assert (a - b).abs().max() <= 1e-12 * max(1.0, b.abs().max().item()), name


def test_ext_plan_and_threads(monkeypatch):
    """Which calls take the extension (a position bias, a causal mask with an offset, top-k; no
    attn_mask or Dense piece), and its results do not depend on the task split or the thread count."""
    _ext_or_skip()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, H, 40, D, generator=g)
    def inputs(attn_mask=None, is_causal=False, bias=None, topk=None, q_offset=0):
        return AttentionInputs(q, q, q, attn_mask, 0.0, is_causal, None, bias, topk, None, None, q_offset, 0, None)
    plan = lambda i: attention_chunked._make_plan(i, q, D ** -0.5)  # noqa: E731
    slopes = torch.tensor(alibi_slopes(H))
    assert plan(inputs(bias=Alibi(slopes))).ext and plan(inputs(is_causal=True, q_offset=3)).ext
    assert plan(inputs(bias=Alibi(slopes), topk=4)).ext and plan(inputs(topk=4)).ext
    assert plan(inputs(is_causal=True)).ext and not plan(inputs()).ext  # no bias, not causal: the fused kernel
    assert not plan(inputs(bias=Alibi(slopes), attn_mask=torch.ones(40, 40, dtype=torch.bool))).ext
    assert not plan(inputs(bias=Dense(torch.randn(40, 40)))).ext
    results = []
    for threads, tasks in ((1, 1), (2, 64)):
        monkeypatch.setattr(attention_chunked, "EXT_MIN_TASKS", tasks)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(_distance_grads("t5c", True, 2, 0, 0, 150, 150))
        finally:
            torch.set_num_threads(before)
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-12 * max(1.0, b.abs().max().item())


def test_ext_op_checks_name_the_argument():
    _ext_or_skip()
    ops = torch.ops.xtk
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 9, 16)
    rvec = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="rvec: expected shape"):
        ops.attention_distance_fwd(q, k, k, torch.randn(4, 15), 1.0, 0, 0, True, 0, 16, 0)
    with pytest.raises(RuntimeError, match="k_prefix: expected"):
        ops.attention_distance_fwd(q, k, k, rvec, 1.0, 10, 0, True, 0, 16, 0)
    with pytest.raises(RuntimeError, match="q: expected dtype float32 or float64"):
        ops.attention_distance_fwd(q.half(), k.half(), k.half(), rvec.half(), 1.0, 0, 0, True, 0, 16, 0)
    with pytest.raises(RuntimeError, match="topk: expected >= 0"):
        ops.attention_distance_fwd(q, k, k, rvec, 1.0, 0, 0, True, -1, 16, 0)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.attention_distance_bwd(q, k, k, torch.randn(1, 4, 7, 16), rvec, 1.0, 0, 0, True, 0, True, 16, 0)
