"""The NaN rule (README "NaN, inf and masking") on every attention backend, values and gradients.

A masked pair (bool mask False, causal, key padding, -inf float mask, top-k drop) contributes
nothing, whatever its q or k row holds; NaN/inf in an unmasked q or k row propagates; NaN/inf in
a masked key's v reaches the rows whose weighted sum reads that key (0 x NaN = NaN, as SDPA);
a fully masked row gives zeros. Each case poisons some rows of q, k or v (GQA, 4 query
heads on 2 kv heads: query heads 0 and 1 read kv head 0) and states, for the output and each
gradient, the rows that must hold NaN/inf and the rows left unspecified; every other row must be
finite and equal the reference computed with the poisoned entries zeroed (the 2x rule,
tests/tolerance.py). One test per case runs every backend (eager, chunked, triton: compiled on CUDA,
the interpreter on CPU, see tests/conftest.py) and reports each backend's failures. Where the Triton
kernels break the rule (issue 12: masked NaN/inf rows of q, k reach dQ, dK as 0 x NaN inside the
dS products, a masked NaN v makes delta = dO . O NaN, and the forward's NaN + -inf and 0 x NaN in an
empty row: each fix spilled shipped tiles, see kernels/attention_bwd.py), a case checks only their
output (``triton="values"``) or leaves them out (``"none"``), with a comment naming what comes out.
"""
import os
from dataclasses import dataclass, field

import pytest
import torch

import xtk
from xtk.ops import attention_chunked
from xtk.reference.attention import attention as reference

from tolerance import assert_close_2x

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
    triton: str = "all"               # "all" | "values" | "none" (see each case)


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
                nan={"out": rows(QROWS, (0, 0, 2)), "q": rows(QROWS, (0, 0, 2)), "k": read, "v": read},
                triton="values")  # Triton breaks the rule: dk of the masked keys 3, 5 NaN (0 x inf in dS^T @ Q)


def case_k_nan_causal():
    """NaN in key 3 under causal, bottom-right (q_offset 2: query i at position i + 2): rows 1-4
    read it and are NaN; row 0 does not and stays exact, dq included."""
    q, k, v = qkv()
    nan_rows = rows(QROWS, (0, KV0, slice(1, None)))
    return Case(q, k, v, dict(is_causal=True, q_offset=2, enable_gqa=True), {"k": [((0, 0, 3), NAN)]},
                nan={"out": nan_rows, "q": nan_rows, "k": rows(KROWS, (0, 0)), "v": rows(KROWS, (0, 0))},
                triton="values")  # Triton breaks the rule: dq of row 0 NaN (0 x NaN in dS @ K)


def case_k_bool_masked():
    """NaN and inf in keys hidden by a bool mask (row 4 fully masked): nothing changes."""
    q, k, v = qkv()
    return Case(q, k, v, dict(attn_mask=bool_mask(), enable_gqa=True),
                {"k": [((0, 0, 3), NAN), ((0, 1, 5, 2), INF)]},
                triton="values")  # Triton breaks the rule: dq NaN in every row of batch 0 (0 x NaN in dS @ K)


def case_k_causal_masked():
    """NaN / inf in the last key, after every query's position (q_offset 1): nothing changes."""
    q, k, v = qkv()
    return Case(q, k, v, dict(is_causal=True, q_offset=1, enable_gqa=True),
                {"k": [((0, 0, 6), NAN), ((1, 1, 6, 0), -INF)]},
                triton="values")  # Triton breaks the rule: dq NaN in every row of the poisoned kv heads


def case_k_keypad():
    """NaN / inf in padded keys (key padding mask (b, 1, 1, nk)): nothing changes."""
    q, k, v = qkv()
    pad = torch.ones(B, 1, 1, NK, dtype=torch.bool)
    pad[0, ..., 5:] = False
    pad[1, ..., 0] = False
    return Case(q, k, v, dict(attn_mask=pad, enable_gqa=True),
                {"k": [((0, 0, 5), NAN), ((0, 1, 6, 3), INF), ((1, 0, 0), NAN)]},
                triton="values")  # Triton breaks the rule: dq NaN in every row of the poisoned kv heads


def case_k_float_masked():
    """NaN in a key hidden by -inf in an additive float mask: nothing changes."""
    q, k, v = qkv()
    m = randn(B, 1, NQ, NK)
    m[0, :, :, 3] = -INF
    return Case(q, k, v, dict(attn_mask=m, enable_gqa=True), {"k": [((0, 0, 3), NAN)]},
                triton="none")  # Triton breaks the rule: out, dq, dk, dv NaN (NaN + -inf is NaN)


def case_q_nan_fully_masked_row():
    """NaN in the q row that the bool mask hides entirely: that row is 0, nothing else changes."""
    q, k, v = qkv()
    return Case(q, k, v, dict(attn_mask=bool_mask(), enable_gqa=True), {"q": [((0, 1, 4), NAN)]},
                triton="values")  # Triton breaks the rule: dk NaN for every key (0 x NaN in dS^T @ Q)


def case_v_nan_masked():
    """NaN in a masked key's v. Bool mask: every row whose sum reads it is NaN (0 x NaN), the fully
    masked row 4 stays 0, and the gradients follow the masked formula (nothing flows through a
    masked pair: all exact). Causal (q_offset 2, key 3): rows 1-4 attend to it and are NaN, with
    their dq and the dk they reach; row 0 is unspecified (a backend may or may not read keys past a
    row's causal window); dv stays exact."""
    q, k, v = qkv()
    nan_rows = rows(QROWS, (0, KV0, slice(1, None)))
    return [Case(q, k, v, dict(attn_mask=bool_mask(), enable_gqa=True), {"v": [((0, 0, 3, 1), NAN)]},
                 nan={"out": rows(QROWS, (0, KV0, slice(0, 4)))},
                 triton="none"),  # Triton breaks the rule: row 4 NaN (0 x NaN), dq and dk NaN
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
                nan={"out": nan_rows, "q": nan_rows, "k": read, "v": read},
                triton="values")  # Triton breaks the rule: dq NaN in every row (0 x NaN in dS @ K)


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


def backends_for(case):
    out = ["eager", "chunked"]
    if TRITON and case.triton != "none":
        out.append("triton")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_nan_rule(name, monkeypatch):
    monkeypatch.setattr(attention_chunked, "MATERIALIZED_ELEMS", 1)  # chunked: chunks of 16 query rows
    torch.manual_seed(0)
    cases = CASES[name]()
    errors = []
    for case in cases if isinstance(cases, list) else [cases]:
        for backend in backends_for(case):
            errs = check_case(case, backend)
            if backend == "triton" and case.triton == "values":
                errs = [e for e in errs if e.startswith("triton out")]
            errors += errs
    assert not errors, "\n".join(errors)
