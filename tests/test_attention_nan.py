"""The NaN rule (README "NaN, inf and masking") on every attention backend, values and gradients.

A masked pair (bool mask False, causal, key padding, -inf float mask, top-k drop) contributes
nothing, whatever its q or k row holds; NaN/inf in an unmasked q or k row propagates; NaN/inf in
a masked key's v reaches the rows whose weighted sum reads that key (0 x NaN = NaN, as SDPA);
a fully masked row gives zeros. Each case poisons some rows of q, k or v (GQA, 4 query
heads on 2 kv heads: query heads 0 and 1 read kv head 0) and states, for the output and each
gradient, the rows that must hold NaN/inf and the rows left unspecified; every other row must be
finite and equal the reference computed with the poisoned entries zeroed (the 2x rule,
tests/tolerance.py). One test per case runs every backend (eager, chunked, triton: compiled on CUDA,
the interpreter on CPU, see tests/conftest.py) and reports each backend's failures. The Triton
kernels follow the rule through their guard twins (kernels/attention_op.py: without them ten of
these cases fail). ``test_learned_gradients_ignore_masked_poison``: the learned biases' and QK-norm
scales' gradients under masked poison, on every backend.
"""
import os
from dataclasses import dataclass, field

import pytest
import torch

import xtk
from xtk.bias import Alibi, Dense, DistanceTable, T5, alibi_slopes
from xtk.ops import attention_chunked
from xtk.qk import QKNorm, Rotary, rotary_inv_freq
from xtk.reference.attention import attention as reference
from xtk.reference.tolerance import attention_term_sums

from tolerance import FLOOR, assert_close_2x, sum_floor

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TRITON = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
NAN, INF = float("nan"), float("inf")
B, H, HK, NQ, NK, D = 2, 4, 2, 5, 7, 8
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")  # numpy on NaN in the interpreter


def rows(shape, *where):
    """A bool (b, heads, n) tensor, True at each ``where`` index tuple (ints, lists or slices)."""
    t = torch.zeros(shape, dtype=torch.bool)
    for w in where:
        t[w] = True
    return t


QROWS, KROWS = (B, H, NQ), (B, HK, NK)
KV0 = [0, 1]  # the query heads of kv head 0


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kw: dict
    poison: dict                      # name -> list of (index, value) put into q / k / v
    nan: dict = field(default_factory=dict)   # "out"/"q"/"k"/"v" -> rows that must hold NaN/inf
    free: dict = field(default_factory=dict)  # rows left unspecified


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64).float()


def qkv():
    return randn(B, H, NQ, D), randn(B, HK, NK, D), randn(B, HK, NK, D)


def bool_mask():
    """keys 3 and 5 masked in every row of batch 0, row 4 fully masked there, a few random holes."""
    m = torch.rand(B, 1, NQ, NK) > 0.2
    m[0, :, :, [3, 5]] = False
    m[0, :, 4] = False
    m[:, :, :4, 0] = True  # every other row keeps a key
    return m


def case_q_nan_row():
    """NaN in one q row, no mask: that row is NaN; its dq and the dk, dv of every key it reads."""
    q, k, v = qkv()
    return Case(q, k, v, dict(enable_gqa=True), {"q": [((0, 0, 2), NAN)]},
                nan={"out": rows(QROWS, (0, 0, 2)), "q": rows(QROWS, (0, 0, 2)),
                     "k": rows(KROWS, (0, 0)), "v": rows(KROWS, (0, 0))})


def case_q_inf_row_masked():
    """+inf in one q feature (every logit of the row +inf: NaN), keys 3 and 5 masked: the row is
    NaN and so are the dk, dv of the keys it reads; the masked keys' dk, dv stay exact."""
    q, k, v = qkv()
    k[..., 0] = k[..., 0].abs() + 0.5
    m = bool_mask()
    m[0, :, 2] = True
    m[0, :, 2, [3, 5]] = False
    read = rows(KROWS, (0, 0, [0, 1, 2, 4, 6]))
    return Case(q, k, v, dict(attn_mask=m, enable_gqa=True), {"q": [((0, 0, 2, 0), INF)]},
                nan={"out": rows(QROWS, (0, 0, 2)), "q": rows(QROWS, (0, 0, 2)), "k": read, "v": read})


def case_k_nan_causal():
    """NaN in key 3 under causal, bottom-right (q_offset 2: query i at position i + 2): rows 1-4
    read it and are NaN; row 0 does not and stays exact, dq included."""
    q, k, v = qkv()
    nan_rows = rows(QROWS, (0, KV0, slice(1, None)))
    return Case(q, k, v, dict(is_causal=True, q_offset=2, enable_gqa=True), {"k": [((0, 0, 3), NAN)]},
                nan={"out": nan_rows, "q": nan_rows, "k": rows(KROWS, (0, 0)), "v": rows(KROWS, (0, 0))})


def case_k_bool_masked():
    """NaN and inf in keys hidden by a bool mask (row 4 fully masked): nothing changes."""
    q, k, v = qkv()
    return Case(q, k, v, dict(attn_mask=bool_mask(), enable_gqa=True),
                {"k": [((0, 0, 3), NAN), ((0, 1, 5, 2), INF)]})


def case_k_causal_masked():
    """NaN / inf in the last key, after every query's position (q_offset 1): nothing changes."""
    q, k, v = qkv()
    return Case(q, k, v, dict(is_causal=True, q_offset=1, enable_gqa=True),
                {"k": [((0, 0, 6), NAN), ((1, 1, 6, 0), -INF)]})


def case_k_keypad():
    """NaN / inf in padded keys (key padding mask (b, 1, 1, nk)): nothing changes."""
    q, k, v = qkv()
    pad = torch.ones(B, 1, 1, NK, dtype=torch.bool)
    pad[0, ..., 5:] = False
    pad[1, ..., 0] = False
    return Case(q, k, v, dict(attn_mask=pad, enable_gqa=True),
                {"k": [((0, 0, 5), NAN), ((0, 1, 6, 3), INF), ((1, 0, 0), NAN)]})


def case_k_float_masked():
    """NaN in a key hidden by -inf in an additive float mask: nothing changes."""
    q, k, v = qkv()
    m = randn(B, 1, NQ, NK)
    m[0, :, :, 3] = -INF
    return Case(q, k, v, dict(attn_mask=m, enable_gqa=True), {"k": [((0, 0, 3), NAN)]})


def case_q_nan_fully_masked_row():
    """NaN in the q row that the bool mask hides entirely: that row is 0, nothing else changes."""
    q, k, v = qkv()
    return Case(q, k, v, dict(attn_mask=bool_mask(), enable_gqa=True), {"q": [((0, 1, 4), NAN)]})


def case_v_nan_masked():
    """NaN in a masked key's v. Bool mask: every row whose sum reads it is NaN (0 x NaN), the fully
    masked row 4 stays 0, and the gradients follow the masked formula (nothing flows through a
    masked pair: all exact). Causal (q_offset 2, key 3): rows 1-4 attend to it and are NaN, with
    their dq and the dk they reach; row 0 is unspecified (a backend may or may not read keys past a
    row's causal window); dv stays exact."""
    q, k, v = qkv()
    nan_rows = rows(QROWS, (0, KV0, slice(1, None)))
    return [Case(q, k, v, dict(attn_mask=bool_mask(), enable_gqa=True), {"v": [((0, 0, 3, 1), NAN)]},
                 nan={"out": rows(QROWS, (0, KV0, slice(0, 4)))}),
            Case(q, k, v, dict(is_causal=True, q_offset=2, enable_gqa=True), {"v": [((0, 0, 3, 1), NAN)]},
                 nan={"out": nan_rows, "q": nan_rows, "k": rows(KROWS, (0, 0))},
                 free={"out": rows(QROWS, (0, KV0, 0)), "q": rows(QROWS, (0, KV0, 0))})]


def case_q_nan_rows_chunked():
    """Longer rows, split in chunks by the chunked backend (its budget cut to 16 query rows, see
    test_nan_rule), causal bottom-right with a dense bias and key padding: NaN q rows 3 (head 0)
    and 30 (head 1) are NaN, with their dq and the dk, dv of keys 0-34 they read; the NaN padded
    key 40 changes nothing."""
    b, h, nq, nk = 1, 2, 37, 41
    q, k, v = randn(b, h, nq, D), randn(b, 1, nk, D), randn(b, 1, nk, D)
    pad = torch.ones(b, 1, 1, nk, dtype=torch.bool)
    pad[..., 40] = False
    kw = dict(attn_mask=pad, is_causal=True, q_offset=nk - nq, bias=xtk.bias.Dense(randn(1, h, nq, nk)),
              enable_gqa=True)
    nan_rows, read = rows((b, h, nq), (0, 0, 3), (0, 1, 30)), rows((b, 1, nk), (0, 0, slice(0, 35)))
    return Case(q, k, v, kw, {"q": [((0, 0, 3), NAN), ((0, 1, 30), NAN)], "k": [((0, 0, 40), NAN)]},
                nan={"out": nan_rows, "q": nan_rows, "k": read, "v": read})


def case_topk_nan():
    """Top-k never drops a NaN logit: a NaN key makes every row of its heads NaN, a NaN q row is
    NaN. (Exact small-integer inputs, SPEC §4.)"""
    q = torch.randint(-2, 3, (B, H, NQ, D)).float()
    k = torch.randint(-2, 3, (B, HK, NK, D)).float()
    v = randn(B, HK, NK, D)
    nan_rows = rows(QROWS, (0, KV0), (1, 2, 2))
    groups = rows(KROWS, (0, 0), (1, 1))
    return Case(q, k, v, dict(topk=2, scale=0.25, enable_gqa=True),
                {"k": [((0, 0, 3), NAN)], "q": [((1, 2, 2), NAN)]},
                nan={"out": nan_rows, "q": nan_rows}, free={"k": groups, "v": groups})


def case_k_float_masked_topk():
    """Top-k (2 of 7) under an additive float mask whose -inf hides a NaN key and an inf key:
    the kept set is the clean one's, nothing changes (exact small-integer inputs, SPEC §4)."""
    q = torch.randint(-2, 3, (B, H, NQ, D)).float()
    k = torch.randint(-2, 3, (B, HK, NK, D)).float()
    v = randn(B, HK, NK, D)
    m = torch.randint(-1, 2, (B, 1, NQ, NK)).float()
    m[0, :, :, [3, 5]] = -INF
    return Case(q, k, v, dict(attn_mask=m, topk=2, scale=0.25, enable_gqa=True),
                {"k": [((0, 0, 3), NAN), ((0, 1, 5, 2), INF)]})


def case_qknorm_masked_poison():
    """QK-norm (with rotary): NaN in the q row the bool mask hides and NaN / inf in masked keys --
    nothing changes, dq of that row 0 (the norm's chain rule would meet 0 x NaN)."""
    q, k, v = qkv()
    kw = dict(attn_mask=bool_mask(), enable_gqa=True, qk_norm=QKNorm(groups=2, scale=3.0),
              rotary=Rotary(D, rotary_inv_freq(D, device=DEV)))
    return Case(q, k, v, kw, {"q": [((0, 1, 4), NAN)], "k": [((0, 0, 3), NAN), ((0, 1, 5, 2), INF)]})


def case_qknorm_q_nan_row():
    """QK-norm: a NaN q row that attends is NaN, with its dq and the dk, dv of every key it reads."""
    q, k, v = qkv()
    kw = dict(enable_gqa=True, qk_norm=QKNorm(groups=2, scale=3.0))
    return Case(q, k, v, kw, {"q": [((1, 3, 0, 5), NAN)]},
                nan={"out": rows(QROWS, (1, 3, 0)), "q": rows(QROWS, (1, 3, 0)),
                     "k": rows(KROWS, (1, 1)), "v": rows(KROWS, (1, 1))})


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


def _run(backend, q, k, v, kw, g):
    q, k, v = (t.to(DEV).requires_grad_() for t in (q, k, v))
    kw = {n: (t.to(DEV) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    if isinstance(kw.get("bias"), xtk.bias.Dense):
        kw["bias"] = xtk.bias.Dense(kw["bias"].tensor.to(DEV))
    if backend == "reference":
        kw = {n: t for n, t in kw.items() if n != "enable_gqa"}
        out = reference(q, k, v, **kw)
    else:
        out = xtk.attention(q, k, v, backend=backend, **kw)
    out.backward(g.to(out.dtype).to(DEV))
    return {"out": out, "q": q.grad, "k": k.grad, "v": v.grad}


def _poisoned(case):
    ts = {"q": case.q.clone(), "k": case.k.clone(), "v": case.v.clone()}
    for name, puts in case.poison.items():
        for index, value in puts:
            ts[name][index] = value
    return ts


def _clean(case, dtype):
    ts = {"q": case.q.clone(), "k": case.k.clone(), "v": case.v.clone()}
    for name, puts in case.poison.items():
        for index, _ in puts:
            ts[name][index] = 0.0
    kw = {n: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
          for n, t in case.kw.items()}
    if isinstance(kw.get("bias"), xtk.bias.Dense):
        kw["bias"] = xtk.bias.Dense(kw["bias"].tensor.to(dtype))
    return {n: t.to(dtype) for n, t in ts.items()}, kw


def check_case(case, backend):
    """-> list of failures of one backend on one case."""
    g = randn(*case.q.shape[:3], case.v.shape[-1])
    p = _poisoned(case)
    got = _run(backend, p["q"], p["k"], p["v"], case.kw, g)
    refs = []
    for dtype in (torch.float32, torch.float64):
        c, kw = _clean(case, dtype)
        refs.append(_run("reference", c["q"], c["k"], c["v"], kw, g))
    (eager, oracle) = refs
    errors = []
    for name in ("out", "q", "k", "v"):
        shape = case.q.shape[:3] if name in ("out", "q") else case.k.shape[:3]
        nan = case.nan.get(name, torch.zeros(shape, dtype=torch.bool))
        free = case.free.get(name, torch.zeros(shape, dtype=torch.bool))
        label = name if name == "out" else "d" + name
        t = got[name].detach().cpu()
        bad = ~torch.isfinite(t).all(-1)
        wrong = (bad != nan) & ~free
        if wrong.any():
            idx = [tuple(i) for i in wrong.nonzero().tolist()]
            errors.append(f"{backend} {label}: NaN/inf status wrong at rows {idx} (expected NaN/inf at "
                          f"{[tuple(i) for i in nan.nonzero().tolist()]})")
            continue
        exact = ~nan & ~free
        try:
            assert_close_2x(t[exact], eager[name].detach().cpu()[exact], oracle[name].detach().cpu()[exact],
                            f"{backend} {label}")
        except AssertionError as e:
            errors.append(str(e))
    return errors


BACKENDS = ["eager", "chunked"] + (["triton"] if TRITON else [])


@pytest.mark.parametrize("name", list(CASES))
def test_nan_rule(name, monkeypatch):
    monkeypatch.setattr(attention_chunked, "MATERIALIZED_ELEMS", 1)  # chunked: chunks of 16 query rows
    torch.manual_seed(0)
    cases = CASES[name]()
    errors = []
    for case in cases if isinstance(cases, list) else [cases]:
        for backend in BACKENDS:
            errors += check_case(case, backend)
    assert not errors, "\n".join(errors)


# ----------------------------------------------------------------------------- learned inputs under a masked poison

def _learned(kind):
    """({name: learned fp64 tensor}, params -> attention kwargs) of one learned-input kind."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "alibi":
        return {"slopes": torch.tensor(alibi_slopes(H), dtype=torch.float64)}, lambda p: dict(bias=Alibi(p["slopes"]))
    if kind == "t5":
        return {"table": r(8, H)}, lambda p: dict(bias=T5(p["table"], num_buckets=8, max_distance=16))
    if kind in ("table", "table_deterministic"):
        return {"table": r(2 * NK - 1, H)}, lambda p: dict(bias=DistanceTable(p["table"]))
    if kind == "dense":
        return {"bias": r(1, H, NQ, NK)}, lambda p: dict(bias=Dense(p["bias"]))
    assert kind == "qknorm"
    params = {"scale": torch.tensor(3.0, dtype=torch.float64), "qs": 1 + 0.1 * r(H, 1, D), "ks": 1 + 0.1 * r(HK, 1, D)}
    return params, lambda p: dict(qk_norm=QKNorm(groups=2, scale=p["scale"], q_dim_scale=p["qs"], k_dim_scale=p["ks"]),
                                  rotary=Rotary(D, rotary_inv_freq(D, device=p["scale"].device)))


def _run_learned(backend, ts, params, make_kw, mask, dtype, g):
    ts = {n: t.detach().to(DEV, dtype).clone().requires_grad_() for n, t in ts.items()}
    params = {n: t.detach().to(DEV, dtype).clone().requires_grad_() for n, t in params.items()}
    kw = dict(attn_mask=mask.to(DEV), enable_gqa=True, **make_kw(params))
    if backend == "reference":
        kw.pop("enable_gqa")
        out = reference(ts["q"], ts["k"], ts["v"], **kw)
    else:
        out = xtk.attention(ts["q"], ts["k"], ts["v"], backend=backend, **kw)
    out.backward(g.to(dtype).to(DEV))
    return {n: t.grad.detach().cpu() for n, t in params.items()}


@pytest.mark.parametrize("kind", ["alibi", "t5", "table", "table_deterministic", "dense", "qknorm"])
def test_learned_gradients_ignore_masked_poison(kind, monkeypatch):
    """The gradients of learned biases and QK-norm scales are the clean inputs' when NaN/inf sit
    in masked keys (k and v), in a fully masked q row: every backend, the Triton guard twins'
    bias-gradient paths included (the table's atomics go to a buffer of their own; in
    deterministic mode dS whole)."""
    if kind == "table_deterministic":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    torch.manual_seed(0)
    q, k, v = qkv()
    clean = {"q": q, "k": k, "v": v}
    poisoned = {n: t.clone() for n, t in clean.items()}
    poisoned["k"][0, 0, 3] = NAN
    poisoned["k"][0, 1, 5, 2] = INF
    poisoned["q"][0, 1, 4] = NAN
    poisoned["v"][0, 0, 5, 1] = NAN
    params, make_kw = _learned(kind)
    g, mask = randn(B, H, NQ, D), bool_mask()
    eager = _run_learned("reference", clean, params, make_kw, mask, torch.float32, g)
    oracle = _run_learned("reference", clean, params, make_kw, mask, torch.float64, g)
    sums = attention_term_sums(*clean.values(), g, attn_mask=mask, **make_kw(params))
    sums = {"slopes": sums.get("bias"), "table": sums.get("bias"), "scale": sums.get("scale")}
    errors = []
    for backend in BACKENDS:
        got = _run_learned(backend, poisoned, params, make_kw, mask, torch.float32, g)
        for n in params:
            if not torch.isfinite(got[n]).all():
                errors.append(f"{backend} d{n}: NaN/inf {got[n]}")
                continue
            floor = FLOOR[torch.float32]  # + a whole-score-matrix sum's floor (tests/tolerance.py)
            if sums.get(n) is not None:
                floor += sum_floor(sums[n], torch.float32)
            try:
                assert_close_2x(got[n], eager[n], oracle[n], f"{backend} d{n}", floor=floor)
            except AssertionError as e:
                errors.append(str(e))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("topk", [1, 2])
def test_topk_keeps_only_inf_logits(topk):
    """A row with at least topk +inf logits keeps only those (the reference's threshold is +inf):
    the row is NaN, but the keys top-k drops get no gradient from it. Keys 3 and 5 of kv head 0
    hold +inf in feature 0, the query rows' feature 0 is +-1 (a +inf or a -inf logit, never 0 x inf).
    Every backend against the eager reference on the same inputs: NaN/inf rows equal, the rest by
    the 2x rule (exact small-integer inputs, SPEC §4)."""
    torch.manual_seed(0)
    q = torch.randint(-2, 3, (B, H, NQ, D)).double()
    k = torch.randint(-2, 3, (B, HK, NK, D)).double()
    v = randn(B, HK, NK, D).double()
    q[..., 0] = torch.where(torch.rand(B, H, NQ) < 0.6, 1.0, -1.0)
    k[0, 0, [3, 5], 0] = INF
    g = randn(B, H, NQ, D)
    kw = dict(topk=topk, scale=0.25, enable_gqa=True)
    eager, oracle = (_run("reference", *(x.detach().to(t) for x in (q, k, v)), kw, g)
                     for t in (torch.float32, torch.float64))
    errors = []
    for backend in BACKENDS:
        got = _run(backend, *(x.detach().float() for x in (q, k, v)), kw, g)
        for name in ("out", "q", "k", "v"):
            t, e, o = (r[name].detach().cpu() for r in (got, eager, oracle))
            bad, want = ~torch.isfinite(t).all(-1), ~torch.isfinite(o).all(-1)
            if (bad != want).any():
                errors.append(f"{backend} {name}: NaN/inf rows {bad.nonzero().tolist()}, the reference's {want.nonzero().tolist()}")
                continue
            try:
                assert_close_2x(t[~want], e[~want], o[~want], f"{backend} {name}")
            except AssertionError as err:
                errors.append(str(err))
    assert want.any() and not errors, "\n".join(errors)
