"""Property test: every attention backend against the eager reference under the NaN rule.

Hypothesis draws shapes (odd sizes, nq != nk, GQA), layouts of q/k/v (a (b, n, h, d) view, a
``[..., ::2]`` slice, a transposed last dim, a batch expanded with stride 0) and of the masks, a
dtype, a mask (bool, float with -inf, key padding, causal with q_offset and k_prefix), a bias
(xtk.bias.Alibi, T5, DistanceTable, Dense float or bool), top-k (on small-integer inputs with
power-of-two scales, SPEC §4) and NaN/inf placed in q, k or v. The expected pattern comes from
the rule itself (README "NaN, inf and masking"), restated here independently of the reference:
which output rows are NaN/inf, which are 0 (no unmasked key) and which are unspecified (a NaN v
outside a row's causal window). Every finite row of the output and of each gradient must equal
the reference computed on clean inputs (poison zeroed, pairs with a -inf logit masked) by the 2x
rule (tests/tolerance.py); the gradients' NaN/inf rows must be the eager reference's.

CI-sized by default (derandomized, no deadline); ``XTK_LONG_PROPERTY=1`` runs a long search.
The Triton kernels (the interpreter on CPU, slow) get a few examples, fp32 only, gradients included
(their NaN-rule guard twins, kernels/attention_op.py ``fwd_guard`` / ``bwd_guard``).
"""
import os
from dataclasses import dataclass
from typing import Optional
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import xtk
from xtk.bias import Alibi, Dense, DistanceTable, T5, alibi_slopes, positions, t5_min_max_distance
from xtk.ops import attention_chunked
from xtk.reference.attention import attention as reference
from xtk.reference.tolerance import attention_term_sums

from tolerance import FLOOR, assert_close_2x, sum_floor

LONG = os.environ.get("XTK_LONG_PROPERTY") == "1"
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TRITON = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
LAYOUTS = ["contiguous", "bnhd", "sliced", "lastdim", "expanded"]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")  # numpy on NaN in the interpreter


def _settings(examples: int, long_examples: int):
    return settings(max_examples=long_examples if LONG else examples, deadline=None, derandomize=not LONG,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Cfg:
    b: int
    h: int
    hk: int
    nq: int
    nk: int
    d: int
    dtype: torch.dtype
    layouts: tuple            # of q, k, v
    mask: Optional[str]       # None | "bool" | "float" | "keypad"
    mask_t: bool              # mask stored transposed
    causal: bool
    q_offset: int
    k_prefix: int
    bias: Optional[str]       # None | "alibi" | "t5" | "dt" | "dense" | "densebool"
    topk: Optional[int]
    poison: tuple             # of (name, (b, head, row), feature or None, value)
    seed: int
    chunked: bool = False     # chunked: chunks of 16 query rows (its smallest), NaN fallback included


@st.composite
def configs(draw, triton=False):
    hk = draw(st.integers(1, 2))
    h = hk * draw(st.sampled_from([1, 2, 3]))
    b = draw(st.integers(1, 2))
    nq, nk = draw(st.integers(1, 20)), draw(st.integers(1, 13))
    d = draw(st.sampled_from([3, 8, 12]))
    dtype = torch.float32 if triton else draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3))
    mask = draw(st.sampled_from([None, "bool", "float", "keypad"]))
    causal = draw(st.booleans())
    q_offset = draw(st.integers(-3, 3)) if causal or draw(st.booleans()) else 0
    k_prefix = draw(st.integers(0, min(2, nk)))
    bias = draw(st.sampled_from([None, "alibi", "t5", "dt", "dense", "densebool"]))
    topk = draw(st.one_of(st.none(), st.integers(1, nk)))
    poison = []
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(["q", "k", "v"]))
        heads, rows = (h, nq) if name == "q" else (hk, nk)
        at = (draw(st.integers(0, b - 1)), draw(st.integers(0, heads - 1)), draw(st.integers(0, rows - 1)))
        feature = draw(st.one_of(st.none(), st.integers(0, d - 1)))  # None: the whole row
        value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        poison.append((name, at, feature, value))
    cfg = Cfg(b, h, hk, nq, nk, d, dtype, layouts, mask, draw(st.booleans()), causal, q_offset, k_prefix, bias,
              topk, tuple(poison), draw(st.integers(0, 2 ** 16)), draw(st.booleans()))
    return cfg


# ----------------------------------------------------------------------------- inputs
def _data(cfg):
    """q, k, v (float64 holding values of cfg.dtype, poisoned) and the mask / bias tensors."""
    g = torch.Generator().manual_seed(cfg.seed)

    def values(*shape, ints=False):
        if ints:  # exact: small integers (top-k, SPEC §4)
            return torch.randint(-2, 3, shape, generator=g).double()
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(cfg.dtype).double()

    b, h, hk, nq, nk, d = cfg.b, cfg.h, cfg.hk, cfg.nq, cfg.nk, cfg.d
    exact = cfg.topk is not None
    ts = {"q": values(b, h, nq, d, ints=exact), "k": values(b, hk, nk, d, ints=exact), "v": values(b, hk, nk, d)}
    for name, layout in zip("qkv", cfg.layouts):
        if layout == "expanded":  # one batch entry seen b times (stride 0): batch-constant values
            ts[name] = ts[name][:1].expand_as(ts[name]).clone()
    for name, at, feature, value in cfg.poison:
        index = at if feature is None else (*at, feature)
        ts[name][index] = value
        if cfg.layouts["qkv".index(name)] == "expanded":
            ts[name] = ts[name][:1].expand_as(ts[name]).clone()
    mask = None
    if cfg.mask == "bool":
        mask = torch.rand(b, 1, nq, nk, generator=g) > 0.3
    elif cfg.mask == "float":
        mask = values(b, 1, nq, nk, ints=exact) / 2
        mask[torch.rand(b, 1, nq, nk, generator=g) < 0.25] = float("-inf")
    elif cfg.mask == "keypad":
        mask = torch.rand(b, 1, 1, nk, generator=g) > 0.3
    bias = None
    if cfg.bias == "alibi":
        n = int(torch.randint(1, h + 1, (1,), generator=g))
        bias = torch.tensor([2.0 ** -(i + 1) for i in range(n)] if exact else alibi_slopes(n), dtype=torch.float64)
    elif cfg.bias == "t5":
        bias = values(16, h, ints=exact) / 2
    elif cfg.bias == "dt":
        far = max(abs(cfg.q_offset + nq - 1), abs(cfg.q_offset - (nk - cfg.k_prefix - 1)), 0)
        bias = values(2 * (far + 2) - 1, h, ints=exact) / 2
    elif cfg.bias == "dense":
        bias = values(1, h, nq, nk, ints=exact) / 2
        bias[torch.rand(1, h, nq, nk, generator=g) < 0.1] = float("-inf")
    elif cfg.bias == "densebool":
        bias = torch.rand(b, 1, nq, nk, generator=g) > 0.2
    return ts, mask, bias


def _bias_object(cfg, t):
    if cfg.bias == "alibi":
        return Alibi(t)
    if cfg.bias == "t5":
        return T5(t, num_buckets=16, max_distance=t5_min_max_distance(16, cfg.causal) + 3, causal=cfg.causal,
                  scale=0.5)
    if cfg.bias == "dt":
        return DistanceTable(t)
    return None if t is None else Dense(t)


def _keep(cfg, mask, bias):
    """The pairs no mask hides, (b, h, nq, nk), from the masks alone (SPEC §2.6, README)."""
    keep = torch.ones(cfg.b, cfg.h, cfg.nq, cfg.nk, dtype=torch.bool)
    for t in (mask, bias if cfg.bias in ("dense", "densebool") else None):
        if t is not None:
            keep = keep & (t if t.dtype == torch.bool else ~torch.isneginf(t))
    if cfg.causal:
        pi, pj = positions(cfg.nq, cfg.nk, cfg.q_offset, cfg.k_prefix, "cpu")
        keep = keep & ~((pj[None, :] > pi[:, None]) & (torch.arange(cfg.nk) >= cfg.k_prefix))
    return keep


def _logits(cfg, q, k, mask, bias):
    """fp64 logits of every pair, NaN/inf as IEEE gives them (one product per pair)."""
    scale = 0.25 if cfg.topk is not None else cfg.d ** -0.5
    kk = k.repeat_interleave(cfg.h // cfg.hk, 1)
    s = (q[..., :, None, :] * kk[..., None, :, :]).sum(-1) * scale
    for t in (mask, _bias_object(cfg, bias)):
        if t is None:
            continue
        t = t.materialize(cfg.h, cfg.nq, cfg.nk, cfg.q_offset, cfg.k_prefix) if not isinstance(t, torch.Tensor) else t
        if t.dtype != torch.bool:
            s = s + t.double()
    return s, scale


def expected(cfg, ts, mask, bias):
    """-> (non-finite output rows, unspecified rows, extra keep-mask for the clean reference)."""
    keep = _keep(cfg, mask, bias)
    s, _ = _logits(cfg, ts["q"], ts["k"], mask, bias)
    kept = keep & ~torch.isneginf(s)           # a -inf logit is masked
    if cfg.topk is not None and cfg.topk < cfg.nk:
        kth = s.masked_fill(~kept, float("-inf")).topk(cfg.topk, dim=-1).values[..., -1:]
        kept = kept & ~(s < kth)                # NaN logits are never dropped
    empty = ~kept.any(-1)
    bad_logit = (kept & (torch.isnan(s) | torch.isposinf(s))).any(-1)
    bad_v = ~torch.isfinite(ts["v"]).all(-1).repeat_interleave(cfg.h // cfg.hk, 1)[:, :, None, :]  # (b, h, 1, nk)
    if cfg.causal:
        pi, pj = positions(cfg.nq, cfg.nk, cfg.q_offset, cfg.k_prefix, "cpu")
        window = ~((pj[None, :] > pi[:, None]) & (torch.arange(cfg.nk) >= cfg.k_prefix))
    else:
        window = torch.ones(cfg.nq, cfg.nk, dtype=torch.bool)
    v_read = (bad_v & window).any(-1)           # every backend reads these keys' v
    v_maybe = (bad_v & ~window).any(-1)         # blocks past a row's causal window: may be read
    nonfinite = ~empty & (bad_logit | v_read)
    free = ~empty & ~nonfinite & v_maybe
    # the clean reference masks the pairs masked by their own -inf logit and, in rows that are
    # NaN, the keys top-k dropped there (their gradients get nothing from those rows)
    extra = ~(keep & torch.isneginf(s)) & (kept | ~nonfinite[..., None])
    return nonfinite, free, extra


def _with_extra(cfg, mask, extra):
    """The mask of the clean reference: ``mask`` and ``extra`` (b, h, nq, nk) both."""
    if extra.all():
        return mask
    if mask is None:
        return extra
    if mask.dtype == torch.bool:
        return mask & extra
    return mask.expand(extra.shape).masked_fill(~extra, float("-inf"))


# ----------------------------------------------------------------------------- runs
def _lay(x, layout):
    """-> (leaf, view): ``view`` holds ``x``'s values in the given layout, a differentiable view of ``leaf``."""
    if layout == "bnhd":
        leaf = x.transpose(1, 2).contiguous().requires_grad_()
        return leaf, leaf.transpose(1, 2)
    if layout == "sliced":
        buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        buf[..., ::2] = x
        leaf = buf.requires_grad_()
        return leaf, leaf[..., ::2]
    if layout == "lastdim":
        leaf = x.transpose(-1, -2).contiguous().requires_grad_()
        return leaf, leaf.transpose(-1, -2)
    if layout == "expanded":
        leaf = x[:1].clone().requires_grad_()
        return leaf, leaf.expand_as(x)
    leaf = x.clone().requires_grad_()
    return leaf, leaf


def run(cfg, backend, ts, mask, bias, dtype, g, layouts=None, learned=True):
    """-> {"out", "q", "k", "v"[, "bias"]}: output and gradients (for upstream ``g``), on DEV."""
    views = []
    for name, layout in zip("qkv", layouts or ("contiguous",) * 3):
        views.append(_lay(ts[name].to(dtype).to(DEV), layout)[1])
    m = None
    if mask is not None:
        m = mask.to(DEV) if mask.dtype == torch.bool else mask.to(dtype).to(DEV)
        if cfg.mask_t and layouts is not None:  # stored transposed
            m = m.transpose(-1, -2).contiguous().transpose(-1, -2)
    bt = None
    if bias is not None:
        bt = bias.to(DEV) if bias.dtype == torch.bool else bias.to(dtype).to(DEV).requires_grad_(learned)
    kw = dict(attn_mask=m, is_causal=cfg.causal, q_offset=cfg.q_offset, k_prefix=cfg.k_prefix,
              bias=_bias_object(cfg, bt), topk=cfg.topk, scale=0.25 if cfg.topk is not None else None)
    if backend == "reference":
        out = reference(*views, **kw)
    else:
        out = xtk.attention(*views, enable_gqa=cfg.h != cfg.hk, backend=backend, **kw)
    wrt = views + ([bt] if bt is not None and bt.requires_grad else [])
    grads = torch.autograd.grad(out, wrt, g.to(dtype).to(DEV))
    res = {"out": out.detach().cpu(), "q": grads[0].cpu(), "k": grads[1].cpu(), "v": grads[2].cpu()}
    if len(grads) > 3:
        res["bias"] = grads[3].cpu()
    return res


def _rows_bad(t):
    return ~torch.isfinite(t).reshape(*t.shape[:3], -1).all(-1) if t.dim() >= 3 else ~torch.isfinite(t)


def check(cfg, backends, grads=True):
    ts, mask, bias = _data(cfg)
    nonfinite, free, extra = expected(cfg, ts, mask, bias)
    poisoned = bool(cfg.poison)
    clean = {n: t.nan_to_num(0.0, 0.0, 0.0) for n, t in ts.items()}
    clean_mask = _with_extra(cfg, mask, extra)
    g = torch.randn(cfg.b, cfg.h, cfg.nq, cfg.d, generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float64)
    learned = not poisoned and cfg.bias in ("alibi", "t5", "dt", "dense")
    eager = run(cfg, "reference", clean, clean_mask, bias, cfg.dtype, g, learned=learned)
    oracle = run(cfg, "reference", clean, clean_mask, bias, torch.float64, g, learned=learned)
    rule = run(cfg, "eager", ts, mask, bias, cfg.dtype, g, learned=learned)  # the reference on the poisoned inputs
    # free output rows: their dq, and the dk, dv of their kv head group, are unspecified too
    group = free.reshape(cfg.b, cfg.hk, -1).any(-1)
    free_rows = {"out": free, "q": free, "k": group[..., None].expand(-1, -1, cfg.nk),
                 "v": group[..., None].expand(-1, -1, cfg.nk)}
    failures = []
    for backend in backends:
        got = run(cfg, backend, ts, mask, bias, cfg.dtype, g, layouts=cfg.layouts, learned=learned)
        for name in (["out", "q", "k", "v", "bias"] if grads else ["out"]):
            if name not in got:
                continue
            label = f"{backend} {'d' + name if name != 'out' else name}"
            t = got[name]
            if name == "bias":
                sums = attention_term_sums(*(clean[n] for n in "qkv"), g, attn_mask=clean_mask,
                                           is_causal=cfg.causal, q_offset=cfg.q_offset, k_prefix=cfg.k_prefix,
                                           bias=_bias_object(cfg, bias.double()), topk=cfg.topk,
                                           scale=0.25 if cfg.topk is not None else None)
                floor = FLOOR[cfg.dtype] + (sum_floor(sums["bias"], cfg.dtype) if "bias" in sums else 0.0)
                try:
                    assert_close_2x(t, eager[name], oracle[name], label, floor=floor)
                except AssertionError as e:
                    failures.append(str(e))
                continue
            bad = _rows_bad(t)
            want = nonfinite if name == "out" else _rows_bad(rule[name])
            wrong = (bad != want) & ~free_rows[name]
            if wrong.any():
                failures.append(f"{label}: NaN/inf rows {wrong.nonzero().tolist()} differ from the rule's")
                continue
            exact = ~bad & ~free_rows[name]
            try:
                assert_close_2x(t[exact], eager[name][exact], oracle[name][exact], label)
            except AssertionError as e:
                failures.append(str(e))
    # the rule's own promise on gradients: a finite output row has a finite dq
    if (_rows_bad(rule["q"]) & ~nonfinite & ~free).any():
        failures.append("eager: dq NaN/inf in rows whose output is finite")
    assert not failures, f"{cfg}\n" + "\n".join(failures)


@_settings(examples=100, long_examples=2000)
@given(cfg=configs())
def test_backends_follow_the_nan_rule(cfg):
    budget = 1 if cfg.chunked else attention_chunked.MATERIALIZED_ELEMS
    with mock.patch.object(attention_chunked, "MATERIALIZED_ELEMS", budget):
        check(cfg, ["eager", "chunked"])


@pytest.mark.skipif(not TRITON, reason="no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")
@_settings(examples=10, long_examples=200)
@given(cfg=configs(triton=True))
def test_triton_follows_the_nan_rule(cfg):
    check(cfg, ["triton"])
