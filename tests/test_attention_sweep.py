"""``xtk.attention`` against the eager reference on every fast backend, one case builder, SPEC §4.

One sweep per op, parametrized over backends (the ``backend`` fixture): ``chunked`` (its fused-kernel
core with many small chunks, so chunk seams and key cutting are exercised), ``chunked-math`` (its
plain math core, what it runs off CPU) and ``triton`` (compiled on a CUDA machine, the Triton
interpreter on CPU: tests/conftest.py sets TRITON_INTERPRET=1 when no CUDA is present). Every
forward and every gradient is judged by the 2x rule against an fp64 oracle (tests/tolerance.py).
Backend-specific checks (launch hazards, chunk internals, reasons, dropout, compile) stay in
tests/test_attention_triton.py and tests/test_attention_chunked.py. ``XTK_FULL_TESTS=1`` adds the
heavy sweep.
"""
import itertools
import os

import pytest
import torch

import xtk
from xtk.bias import Alibi, Dense, DistanceTable, T5, alibi_slopes
from xtk.ops import attention_chunked
from xtk.qk import QKNorm, Rotary, rotary_inv_freq, xpos_scale
from xtk.reference.attention import attention as reference

from tolerance import attention_sums, check_against_oracle

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
FULL = os.environ.get("XTK_FULL_TESTS") == "1"
TRITON = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["chunked", "chunked-math"] + (["triton"] if TRITON else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The xtk backend name to pass; the chunked variants set their chunking first."""
    if request.param.startswith("chunked"):
        monkeypatch.setattr(attention_chunked, "CAUSAL_CHUNK", 16)
        monkeypatch.setattr(attention_chunked, "MATERIALIZED_ELEMS", 1)
        monkeypatch.setattr(attention_chunked, "EXT_BLOCK_ROWS", 16)  # the extension's blocks and row groups too
        monkeypatch.setattr(attention_chunked, "EXT_MIN_TASKS", 64)
        monkeypatch.setattr(attention_chunked, "FORCE_MATH", request.param == "chunked-math")
        return "chunked"
    return request.param


# ----------------------------------------------------------------------------- case builder

def make_case(feature, b=2, h=4, hk=2, nq=17, nk=17, d=16, dv=None, dtype=torch.float32, positions=None):
    """inputs dict (tensors + plain values) and the attention kwargs builder for one feature set.

    ``feature``: '+'-joined names; ``positions``: (q_offset, k_prefix) instead of the features'
    ones; returns (inputs, grad_names, kw_fn) with kw_fn(**inputs) -> kwargs."""
    dv = dv or d
    feats = set(feature.split("+")) - {"none"}
    if "gqa8to2" in feats:
        h, hk = 8, 2
    if "gqa8to1" in feats:
        h, hk = 8, 1
    if "mha" in feats:
        hk = h
    inputs = dict(q=torch.randn(b, h, nq, d, device=DEV), k=torch.randn(b, hk, nk, d, device=DEV),
                  v=torch.randn(b, hk, nk, dv, device=DEV))
    grads = ["q", "k", "v"]
    static = dict(is_causal="causal" in feats, enable_gqa=hk != h)
    if "offset" in feats:
        static["q_offset"] = 3
    if "negoffset" in feats:
        static["q_offset"] = -4  # the first rows see no positional key under causal
    if "prefix" in feats:
        static["k_prefix"] = min(2, nk)
    if "alibi" in feats:
        inputs["slopes"] = torch.tensor(alibi_slopes(h - 1), device=DEV)  # the last head gets none
        grads.append("slopes")
    if "t5" in feats or "t5short" in feats:
        inputs["t5table"] = torch.randn(16 if "t5short" in feats else 32, h, device=DEV)
        grads.append("t5table")
    if "table" in feats:
        L = nq + nk + 8
        inputs["dtable"] = torch.randn(2 * L - 1, h, device=DEV)
        grads.append("dtable")
    if "dense" in feats:
        inputs["dense"] = torch.randn(1, h, nq, nk, device=DEV)
        grads.append("dense")
    if "densebool" in feats:
        inputs["densebool"] = torch.rand(b, 1, nq, nk, device=DEV) > 0.3
    if "keypad" in feats:
        m = torch.rand(b, 1, 1, nk, device=DEV) > 0.3
        m[-1] = False  # a fully padded batch: every row of it is empty -> zeros, zero grads
        inputs["keypad"] = m
    if "maskbool" in feats:
        m = torch.rand(b, 1, nq, nk, device=DEV) > 0.4
        m[:, :, nq // 2] = False  # a fully masked row
        inputs["maskbool"] = m
    if "maskfloat" in feats:
        m = torch.randn(b, 1, nq, nk, device=DEV)
        m[0, 0, 0] = float("-inf")  # a row emptied by -inf
        inputs["maskfloat"] = m
    if "strided" in feats:  # q/k/v as views of a (b, n, h, d) layout, as a model's heads split gives
        for name in ("q", "k", "v"):
            t = inputs[name]
            inputs[name] = t.transpose(1, 2).contiguous().transpose(1, 2)
    if "scale" in feats:
        static["scale"] = 0.3
    if positions is not None:
        static["q_offset"], static["k_prefix"] = positions

    def kw_fn(**kw):
        out = dict(static)
        if "slopes" in kw:
            out["bias"] = Alibi(kw["slopes"])
        if "t5table" in kw:
            # t5short: buckets saturated from distance 12 on, so most tiles lie beyond the kernel table's edges
            short = "t5short" in feats
            out["bias"] = T5(kw["t5table"], num_buckets=16 if short else 32, max_distance=12 if short else 64,
                             causal="causal" in feats, scale=0.5)
        if "dtable" in kw:
            out["bias"] = DistanceTable(kw["dtable"])
        if "dense" in kw:
            out["bias"] = Dense(kw["dense"])
        if "densebool" in kw:
            out["bias"] = Dense(kw["densebool"])
        if "keypad" in kw:
            out["attn_mask"] = kw["keypad"]
        if "maskbool" in kw:
            out["attn_mask"] = kw["maskbool"]
        if "maskfloat" in kw:
            out["attn_mask"] = kw["maskfloat"]
        return out

    return inputs, grads, kw_fn


def run_check(backend, feature, dtype=torch.float32, **shape):
    """``backend`` (the ``backend`` fixture's value) against the eager reference on one case, values
    and every gradient, by the 2x rule."""
    inputs, grads, kw_fn = make_case(feature, **shape)

    def kernel(q, k, v, **kw):
        return xtk.attention(q, k, v, backend=backend, **kw_fn(**kw))

    def reference_kwargs(**kw):
        kwargs = kw_fn(**kw)
        kwargs.pop("enable_gqa")
        return kwargs

    def eager(q, k, v, **kw):
        return reference(q, k, v, **reference_kwargs(**kw))

    table = next((n for n in ("slopes", "t5table", "dtable") if n in grads), None)  # sums over all logits
    check_against_oracle(kernel, eager, inputs, dtype, grad_names=grads,
                         term_sums=attention_sums(reference_kwargs, bias=table))




SINGLE = ["none", "causal", "causal+offset", "causal+negoffset", "prefix", "causal+prefix+offset", "alibi",
          "t5", "table", "dense", "densebool", "keypad", "maskbool", "maskfloat", "gqa8to2", "gqa8to1", "mha", "strided",
          "scale"]
SHAPES = [(1, 1), (17, 17), (65, 33)]
LONG = ["none", "causal+prefix+offset", "t5", "table", "keypad", "gqa8to1"]  # also at (17, 130)


@pytest.mark.parametrize("feature,nq,nk", [(f, nq, nk) for f in SINGLE for nq, nk in SHAPES]
                         + [(f, 17, 130) for f in LONG])
def test_switch_alone_fp32(backend, feature, nq, nk):
    run_check(backend, feature, nq=nq, nk=nk, b=1 if nq * nk > 300 else 2)


COMBOS = [
    "causal+offset+prefix+alibi+keypad+gqa8to2",
    "causal+negoffset+t5+maskfloat",
    "causal+offset+prefix+table+gqa8to1+strided",
    "dense+keypad+causal",
    "maskbool+alibi+prefix",
    "densebool+maskfloat+causal",
]


@pytest.mark.parametrize("feature,nq,nk", [(f, 40, 65) for f in COMBOS] + [(f, 33, 130) for f in COMBOS[:3]])
def test_combinations_fp32(backend, feature, nq, nk):
    run_check(backend, feature, nq=nq, nk=nk, b=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feature", ["causal+offset+prefix+alibi+keypad+gqa8to2", "t5+causal", "table+maskfloat",
                                     "dense+keypad", "none"])
def test_half_dtypes(backend, feature, dtype):
    run_check(backend, feature, dtype=dtype, nq=33, nk=65, b=1)


@pytest.mark.parametrize("d,dv", [(32, 32), (64, 64), (24, 40), (96, 96)])
def test_head_dims(backend, d, dv):
    run_check(backend, "causal+alibi", d=d, dv=dv, nq=17, nk=33, b=1, h=2, hk=1)


# query/key positions: (nq, nk, q_offset, k_prefix) x every bias kind x causal
POSITIONS = [
    (17, 17, 0, 0),
    (65, 130, 65, 0),     # bottom-right alignment (KV cache / models)
    (130, 65, 0, 0),      # nq > nk, top-left: causal rows past the keys
    (1, 17, 16, 0),       # one query (generation)
    (17, 65, 45, 3),      # memory key/values
    (17, 9, -2, 0),       # negative offset: causal rows with no key at all
]
KINDS = ["none", "alibi", "t5", "table", "dense", "densebool"]
POSITION_CASES = list(itertools.product(KINDS, [False, True], POSITIONS))


@pytest.mark.parametrize("case", range(len(POSITION_CASES)),
                         ids=[f"{k}-{'causal' if c else 'full'}-{p[0]}x{p[1]}o{p[2]}p{p[3]}" for k, c, p in POSITION_CASES])
def test_positions(backend, case):
    """Every bias kind at every query/key alignment, causal or not; GQA and key padding vary with the
    case index, and so does bf16 (fp32 on Triton: its half-precision cases are test_half_dtypes)."""
    kind, causal, (nq, nk, off, prefix) = POSITION_CASES[case]
    torch.manual_seed(case)
    feature = "+".join([kind] + (["causal"] if causal else []) + (["mha"] if case % 3 == 0 else [])
                       + (["keypad"] if case % 4 == 1 else []))
    dtype = torch.bfloat16 if case % 3 == 1 and backend != "triton" else torch.float32
    run_check(backend, feature, dtype=dtype, nq=nq, nk=nk, positions=(off, min(prefix, nk)))


# T5 whose buckets saturate at distance 12: tiles wholly beyond either edge of the kernels' table
# (one value read per tile; the table gradient's running edge sums) next to tiles across an edge
EDGE_CASES = [("t5short", 130, 130, None), ("t5short+causal", 130, 130, None), ("t5short+gqa8to2", 40, 130, (0, 0)),
              ("t5short+causal+prefix", 17, 130, (110, 3)), ("t5short+keypad", 130, 40, (-60, 0))]


@pytest.mark.parametrize("feature,nq,nk,positions", EDGE_CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in EDGE_CASES])
def test_t5_tiles_beyond_the_table_edges(backend, feature, nq, nk, positions):
    run_check(backend, feature, nq=nq, nk=nk, b=1, positions=positions)


@pytest.mark.parametrize("feature,nq,nk,positions", EDGE_CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in EDGE_CASES])
def test_t5_table_edges_in_deterministic_mode(feature, nq, nk, positions, monkeypatch):
    """Triton's deterministic table gradient (dS whole, its diagonals summed on the host side,
    ``_table_grad_from_ds``) folds the diagonals beyond the table into its edge rows too."""
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    run_check("triton", feature, nq=nq, nk=nk, b=1, positions=positions)


if FULL:  # the heavy sweep exists only with XTK_FULL_TESTS=1 (hours in the interpreter, minutes on a GPU)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("feature", SINGLE + COMBOS)
    @pytest.mark.parametrize("nq,nk", [(1, 1), (17, 17), (65, 33), (130, 130), (1, 130), (130, 1)])
    @pytest.mark.parametrize("d", [16, 64, 128])
    def test_full_sweep(backend, feature, dtype, nq, nk, d):
        run_check(backend, feature, dtype=dtype, nq=nq, nk=nk, d=d, b=1)


def test_empty_rows_give_zero_output_and_grads(backend):
    q, k, v = (torch.randn(2, 2, 9, 16, device=DEV, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool, device=DEV)
    mask[1] = False
    out = xtk.attention(q, k, v, mask, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
    # causal with rows before every positional key
    out = xtk.attention(q, k, v, is_causal=True, q_offset=-3, backend=backend)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert out[:, :, 3:].abs().sum() > 0


H, D = 4, 16  # the cases below


def test_float_attn_mask_gets_gradient_and_fully_masked_batch(backend):
    g = torch.Generator().manual_seed(1)
    b, nq, nk = 2, 33, 40
    mask = torch.randn(b, 1, nq, nk, generator=g).to(DEV)
    mask[1, :, 5] = float("-inf")  # one row with no key
    inputs = dict(q=torch.randn(b, H, nq, D, generator=g).to(DEV), k=torch.randn(b, H, nk, D, generator=g).to(DEV),
                  v=torch.randn(b, H, nk, D, generator=g).to(DEV), mask=mask,
                  slopes=torch.tensor(alibi_slopes(H), device=DEV))

    def reference_kwargs(mask, slopes):
        return dict(attn_mask=mask, is_causal=True, bias=Alibi(slopes), q_offset=nk - nq)

    def fn(name):
        return lambda q, k, v, **kw: xtk.attention(q, k, v, backend=name, **reference_kwargs(**kw))
    # the slopes' gradient is one sum over every logit (sum_floor)
    check_against_oracle(fn(backend), fn("eager"), inputs, torch.float32, grad_names=["q", "k", "v", "slopes"],
                         term_sums=attention_sums(reference_kwargs, bias="slopes"))
    # the float mask's own gradient (-inf entries excluded: both sides give 0 there)
    m1 = mask.clone().requires_grad_()
    m2 = mask.clone().requires_grad_()
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    xtk.attention(q, k, v, m1, backend=backend).sum().backward()
    xtk.attention(q, k, v, m2, backend="eager").sum().backward()
    torch.testing.assert_close(m1.grad, m2.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups,dim_scales", [(1, False), (2, True)])
@pytest.mark.parametrize("xpos", [False, True])
def test_qk_norm_rotary_t5_gqa_prefix(backend, dtype, groups, dim_scales, xpos):
    g = torch.Generator().manual_seed(2)
    b, nq, nk, hk, prefix = 2, 65, 70, 2, 2
    rd = 8
    inputs = dict(q=torch.randn(b, H, nq, D, generator=g).to(DEV), k=torch.randn(b, hk, nk, D, generator=g).to(DEV),
                  v=torch.randn(b, hk, nk, D, generator=g).to(DEV),
                  table=torch.randn(32, H, generator=g).to(DEV))
    grads = ["q", "k", "v", "table"]
    if dim_scales:
        inputs["qs"] = torch.rand(H, 1, D, generator=g).to(DEV) + 0.5
        inputs["ks"] = torch.rand(hk, 1, D, generator=g).to(DEV) + 0.5
        grads += ["qs", "ks"]

    def fn(name):
        def call(q, k, v, table, qs=None, ks=None):
            norm = QKNorm(groups=groups, scale=D ** -0.5 if dim_scales else 10.0, q_dim_scale=qs, k_dim_scale=ks)
            rot = Rotary(rd, rotary_inv_freq(rd, device=DEV), xpos_scale=xpos_scale(rd, device=DEV) if xpos else None,
                         xpos_scale_base=64)
            return xtk.attention(q, k, v, is_causal=True, enable_gqa=True, bias=T5(table, causal=True),
                                 qk_norm=norm, rotary=rot, q_offset=nk - prefix - nq, k_prefix=prefix,
                                 backend=name)
        return call
    check_against_oracle(fn(backend), fn("eager"), inputs, dtype, grad_names=grads)


def test_learned_qk_norm_scale_gets_gradient(backend):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, H, 20, D, generator=g).to(DEV) for _ in range(3))
    out = []
    for name in (backend, "eager"):
        s = torch.tensor(7.0, requires_grad=True, device=DEV)
        xtk.attention(q, k, v, is_causal=True, qk_norm=QKNorm(scale=s), backend=name).square().sum().backward()
        out.append(s.grad)
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- top-k

def exact_inputs(b, h, hk, nq, nk, d):
    """Small integers: every logit (scale 1/4) and its sums are exact in fp32, with many ties."""
    q = torch.randint(-2, 3, (b, h, nq, d), device=DEV).float()
    k = torch.randint(-2, 3, (b, hk, nk, d), device=DEV).float()
    v = torch.randn(b, hk, nk, d, device=DEV)
    return q, k, v


@pytest.mark.parametrize("topk,extra", [(1, {}), (3, dict(is_causal=True, q_offset=2)),
                                        (5, dict(bias="alibi", k_prefix=2)), (8, dict(mask=True))])
def test_topk_exact_kept_set(backend, topk, extra):
    b, h, hk, nq, nk, d = 1, 2, 1, 19, 40, 16
    q, k, v = exact_inputs(b, h, hk, nq, nk, d)
    k[..., 5, :] = k[..., 6, :]  # constructed ties
    k[..., 20, :] = k[..., 6, :]
    kw = dict(scale=0.25, topk=topk)
    extra = dict(extra)
    if extra.pop("bias", None):
        kw["bias"] = Alibi(torch.tensor([0.25, 0.5], device=DEV))
    if extra.pop("mask", None):
        m = torch.rand(b, 1, nq, nk, device=DEV) > 0.5
        m[..., 0, :] = False  # an empty row
        m[..., 1, :] = False
        m[..., 1, :3] = True  # a row with fewer unmasked keys than topk: keep them all
        kw["attn_mask"] = m
    kw.update(extra)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    got = xtk.attention(qs, ks, vs, enable_gqa=True, backend=backend, **kw)
    qo, ko, vo = (t.double().requires_grad_() for t in (q, k, v))
    want = reference(qo, ko, vo, **kw)
    assert (got.double() - want).abs().max().item() < 1e-5
    g = torch.randn_like(want)
    got.backward(g.float())
    want.backward(g)
    for a, w in ((qs, qo), (ks, ko), (vs, vo)):
        assert (a.grad.double() - w.grad).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------- QK-norm, rotary

QK_VARIANTS = ["qknorm", "qknorm_dimscale", "rotary", "xpos", "qknorm+rotary", "qknorm_learnedscale+xpos",
               "qknorm_qdimscale", "qknorm_dimscale_learnedscale+xpos", "qknorm+rotary+alibi+keypad+gqa8to1"]


@pytest.mark.parametrize("variant,dtype,d,nq,nk", [(v, torch.float32, 16, 17, 33) for v in QK_VARIANTS]
                         + [("qknorm_dimscale+xpos", torch.float32, 32, 65, 40),
                            ("qknorm_dimscale+xpos", torch.float32, 24, 9, 70),
                            ("qknorm_dimscale+xpos", torch.bfloat16, 16, 33, 17),
                            ("qknorm_dimscale_learnedscale+xpos", torch.float16, 16, 33, 17),
                            ("qknorm_dimscale_learnedscale+xpos", torch.bfloat16, 16, 33, 17),
                            ("qknorm+rotary", torch.float16, 16, 17, 33)])
def test_qk_norm_and_rotary(backend, variant, dtype, d, nq, nk):
    """QK-norm (groups, dim scales, learned scale) and rotary/xpos (in-kernel on the q/k tiles on
    Triton, up front on chunked), forward and backward (gradients to q, k and the scales)."""
    check_qk(backend, variant, dtype, d, nq, nk)


def check_qk(backend, variant, dtype, d, nq, nk):
    """One QK-norm/rotary case against the eager reference (2x rule); a '+dropout' variant runs the
    Triton op with a fixed seed and the reference with the kernel's own keep-mask."""
    h, hk = (8, 1) if "gqa8to1" in variant else (4, 2)
    inputs = dict(q=torch.randn(1, h, nq, d, device=DEV), k=torch.randn(1, hk, nk, d, device=DEV),
                  v=torch.randn(1, hk, nk, d, device=DEV))
    grads = ["q", "k", "v"]
    if "dimscale" in variant:
        inputs["qs"] = torch.rand(h, 1, d, device=DEV) + 0.5
        grads.append("qs")
        if "qdimscale" not in variant:
            inputs["ks"] = torch.rand(hk, 1, d, device=DEV) + 0.5
            grads.append("ks")
    if "learnedscale" in variant:
        inputs["scale"] = torch.tensor(4.0, device=DEV)
        grads.append("scale")
    if "alibi" in variant:
        inputs["slopes"] = torch.tensor(alibi_slopes(h), device=DEV)
        grads.append("slopes")
    if "keypad" in variant:
        inputs["keypad"] = torch.rand(1, 1, 1, nk, device=DEV) > 0.3
    p = 0.25 if "dropout" in variant else 0.0
    keep = _keep_mask(99, 1, h, nq, nk, p, DEV) if p else None
    rd = 8 if d % 16 == 0 else 12

    def kw(qs=None, ks=None, scale=None, slopes=None, keypad=None):
        out = dict(enable_gqa=True, is_causal=True, q_offset=nk - 2 - nq, k_prefix=2)
        if slopes is not None:
            out["bias"] = Alibi(slopes)
        if keypad is not None:
            out["attn_mask"] = keypad
        if "qknorm" in variant:
            fixed = d ** -0.5 if qs is not None else 10.0
            out["qk_norm"] = QKNorm(groups=2, scale=fixed if scale is None else scale, q_dim_scale=qs, k_dim_scale=ks)
        if "rotary" in variant or "xpos" in variant:
            out["rotary"] = Rotary(rd, rotary_inv_freq(rd, device=DEV),
                                   xpos_scale=xpos_scale(rd, device=DEV) if "xpos" in variant else None)
        return out

    def kernel(q, k, v, **extra):
        a = kw(**extra)
        if not p:
            return xtk.attention(q, k, v, backend=backend, **a)
        # dropout through the op (fixed seed) with the QK arguments the backend builds
        from xtk.ops import attention_triton
        from xtk.ops.attention import _validate
        inp = _validate(q, k, v, attn_mask=None, dropout_p=p, is_causal=True, scale=None, enable_gqa=True,
                        bias=None, topk=None, qk_norm=a.get("qk_norm"), rotary=a.get("rotary"),
                        q_offset=a["q_offset"], k_prefix=2, hooks=None)
        qk, scale = attention_triton._qk_args(inp)
        return torch.ops.xtk.attention_fwd(q, k, v, None, None, None, None, scale, True, a["q_offset"], 2, 0, p, 99,
                                           *qk)[0]

    def reference_kwargs(**extra):
        a = kw(**extra)
        a.pop("enable_gqa")
        if p:
            a.update(dropout_p=p, dropout_mask=keep)
        return a

    def eager(q, k, v, **extra):
        return reference(q, k, v, **reference_kwargs(**extra))

    # the slopes' and the learned scale's gradients are sums over every logit (sum_floor)
    check_against_oracle(kernel, eager, inputs, dtype, grad_names=grads,
                         term_sums=attention_sums(reference_kwargs, bias="slopes", scale="scale"))


def _keep_mask(*args):
    from xtk.kernels import attention_op  # imported here: the module's own cases need no kernels
    return attention_op.dropout_keep_mask(*args)
