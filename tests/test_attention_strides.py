"""Stride and layout sweep (SPEC §1: any strides) for the attention backends.

q, k, v, masks and dense biases come as transposed, ``[..., ::2]``-sliced, expanded (stride 0),
``(b, n, h, d)``-permuted and channels-last views of leaf tensors; values and gradients (to the
leaves) are judged by the 2x rule against the eager reference run on contiguous copies of the same
views. ``eager`` and ``chunked`` (its fused-kernel and math cores) run every case; ``triton`` joins on
tiny shapes where it can run (compiled on a GPU; the interpreter on CPU, which tests/conftest.py
switches on with ``TRITON_INTERPRET=1``)."""
import os
from dataclasses import dataclass, field

import pytest
import torch

import xtk
from xtk import backends
from xtk.bias import Alibi, Dense, alibi_slopes
from xtk.ops import attention_chunked

from tolerance import attention_term_sums, check_against_oracle

B, H = 2, 4

# layout -> (leaf shape from the view's shape (b, h, n, d), leaf -> view); "expand_*": leaf.expand
LAYOUTS = {
    "transposed": (lambda s: (s[0], s[1], s[3], s[2]), lambda x: x.transpose(-1, -2)),    # last-dim stride n
    "sliced": (lambda s: (s[0], s[1], s[2], 2 * s[3]), lambda x: x[..., ::2]),              # last-dim stride 2
    "bnhd": (lambda s: (s[0], s[2], s[1], s[3]), lambda x: x.transpose(1, 2)),              # a model's heads split
    "channels_last": (lambda s: s, lambda x: x.contiguous(memory_format=torch.channels_last)),  # last-dim stride h
    "expand_batch": (lambda s: (1, s[1], s[2], s[3]), None),                                # stride 0 on b
    "expand_heads": (lambda s: (s[0], 1, s[2], s[3]), None),                                # stride 0 on h
    "expand_seq": (lambda s: (s[0], s[1], 1, s[3]), None),                                  # stride 0 on n
    "expand_last": (lambda s: (s[0], s[1], s[2], 1), None),                                 # stride 0 on d
}

# non-contiguous masks / dense biases: leaf shape (from nq, nk), leaf -> view, argument, gradient?
MASKS = {
    "bool_mask_transposed": dict(shape=lambda nq, nk: (B, 1, nk, nq), view=lambda t: t.transpose(-1, -2) > -0.8,
                                 arg="attn_mask", grad=False),
    "bool_mask_expanded": dict(shape=lambda nq, nk: (1, 1, 1, nk), view=lambda t: t > -0.8,
                               arg="attn_mask", grad=False, expand=True),
    "float_mask_sliced": dict(shape=lambda nq, nk: (B, 1, nq, 2 * nk), view=lambda t: t[..., ::2],
                              arg="attn_mask", grad=True),
    "dense_bias_transposed": dict(shape=lambda nq, nk: (H, nk, nq), view=lambda t: t.transpose(-1, -2),
                                  arg="bias", grad=True),
    "dense_bias_expanded": dict(shape=lambda nq, nk: (H, 1, nk), view=lambda t: t, arg="bias", grad=True,
                                expand=True),
}


@dataclass
class Case:
    """One call: layouts of q/k/v (name -> layout), kv heads, causal + learned ALiBi, a mask kind."""

    layouts: dict
    hk: int = H
    alibi: bool = False
    causal: bool = False
    mask: str = ""
    nq: int = 19
    nk: int = 23
    d: int = 16
    shapes: dict = field(init=False)

    def __post_init__(self):
        self.shapes = {"q": (B, H, self.nq, self.d), "k": (B, self.hk, self.nk, self.d),
                       "v": (B, self.hk, self.nk, self.d)}


CONFIGS = {
    "plain": dict(),
    "causal_alibi_gqa": dict(hk=2, alibi=True, causal=True),  # chunked: Toeplitz masks, learned-bias backward
    "native_causal": dict(causal=True),                       # chunked: the fused kernel's own causal flag
}


def view(layout: str, leaf: torch.Tensor, shape) -> torch.Tensor:
    """``leaf`` seen with ``shape`` in ``layout`` (differentiable, so gradients reach the leaf)."""
    if layout == "contiguous":
        return leaf
    if layout.startswith("expand"):
        return leaf.expand(shape)
    return LAYOUTS[layout][1](leaf)


def leaves(case: Case, device, g) -> dict:
    """The leaf tensors of one case: q, k, v, the mask's leaf, the ALiBi slopes."""
    out = {}
    for name, shape in case.shapes.items():
        layout = case.layouts.get(name, "contiguous")
        leaf_shape = shape if layout == "contiguous" else LAYOUTS[layout][0](shape)
        out[name] = torch.randn(leaf_shape, generator=g).to(device)
    if case.mask:
        out["mask"] = torch.randn(MASKS[case.mask]["shape"](case.nq, case.nk), generator=g).to(device)
    if case.alibi:
        out["slopes"] = torch.tensor(alibi_slopes(H - 1), device=device)  # the last head gets none
    return out


def qkv_views(case: Case, q, k, v) -> list:
    """The q, k, v views of the case's leaves."""
    return [view(case.layouts.get(n, "contiguous"), t, case.shapes[n]) for n, t in (("q", q), ("k", k), ("v", v))]


def attend(case: Case, backend: str, contiguous: bool):
    """``fn(**leaves)``: attention on the views, or (the oracle side) on contiguous copies of them."""
    def fn(q, k, v, mask=None, slopes=None):
        tensors = qkv_views(case, q, k, v)
        kw = dict(is_causal=case.causal, enable_gqa=case.hk != H, backend=backend)
        if slopes is not None:
            kw["bias"] = Alibi(slopes)
        if mask is not None:
            spec = MASKS[case.mask]
            m = spec["view"](mask)
            if spec.get("expand"):
                m = m.expand(B, H, case.nq, case.nk)
            if contiguous:
                m = m.contiguous()
            kw[spec["arg"]] = Dense(m) if spec["arg"] == "bias" else m
        if contiguous:
            tensors = [t.contiguous() for t in tensors]
        return xtk.attention(*tensors, **kw)
    return fn


def check(case: Case, backend: str, device="cpu", seed=0) -> None:
    """The backend on the views against the eager reference on contiguous copies (2x rule, all grads)."""
    g = torch.Generator().manual_seed(seed)
    inputs = leaves(case, device, g)
    grads = ["q", "k", "v"] + (["slopes"] if case.alibi else [])
    if case.mask and MASKS[case.mask]["grad"]:
        grads.append("mask")
    def term_sums(grad_out, q, k, v, slopes=None, mask=None):
        """The slopes' gradient sums over every logit: its sum floor (tests/tolerance.py)."""
        if slopes is None:
            return {}
        sums = attention_term_sums(*qkv_views(case, q, k, v), grad_out, is_causal=case.causal, bias=Alibi(slopes))
        return {"slopes": sums["bias"]}

    check_against_oracle(attend(case, backend, False), attend(case, "eager", True), inputs, torch.float32,
                         grad_names=grads, term_sums=term_sums)


def triton_device():
    """Where the triton backend runs here, or None (no GPU and no interpreter, or not importable)."""
    if isinstance(backends.load("attention", "triton"), str):
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


WHICH = {"q": ("q",), "k": ("k",), "v": ("v",), "qkv": ("q", "k", "v")}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("which", list(WHICH))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", ["eager", "chunked", "chunked-math-core"])
def test_qkv_layouts(backend, layout, which, config, monkeypatch):
    monkeypatch.setattr(attention_chunked, "FORCE_MATH", backend == "chunked-math-core")
    monkeypatch.setattr(attention_chunked, "CAUSAL_CHUNK", 8)  # several chunks: views sliced by rows
    case = Case({n: layout for n in WHICH[which]}, **CONFIGS[config])
    check(case, backend.split("-")[0])


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("backend", ["eager", "chunked", "chunked-math-core"])
def test_mask_and_bias_layouts(backend, mask, monkeypatch):
    """Non-contiguous masks and dense biases (q, k, v as a model's (b, n, h, d) views), causal."""
    monkeypatch.setattr(attention_chunked, "FORCE_MATH", backend == "chunked-math-core")
    monkeypatch.setattr(attention_chunked, "MATERIALIZED_ELEMS", 1)  # chunked masks: 16 query rows per chunk
    case = Case({n: "bnhd" for n in "qkv"}, hk=2, causal=True, mask=mask, nq=37, nk=41)
    check(case, backend.split("-")[0])


TRITON_CASES = ([("qkv", layout, "") for layout in LAYOUTS] + [("mask", "bnhd", mask) for mask in MASKS])


@pytest.mark.parametrize("kind,layout,mask", TRITON_CASES, ids=[f"{m or l}" for _, l, m in TRITON_CASES])
def test_triton_layouts(kind, layout, mask):
    """The same views through the Triton kernels, tiny shapes (the interpreter on CPU)."""
    device = triton_device()
    if device is None:
        pytest.skip("triton cannot run here (no GPU, TRITON_INTERPRET not 1, or not importable)")
    extra = dict(hk=2, causal=True, nq=5, nk=7)
    if not mask:
        extra["alibi"] = True
    check(Case({n: layout for n in "qkv"}, mask=mask, **extra), "triton", device)


def test_issue_repro_transposed_k_and_sliced():
    """Issue 12's repro: a transposed k, and ``[..., ::2]`` slices, equal SDPA on every backend."""
    F = torch.nn.functional
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 6, 8).unbind(0)
    kT = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    for backend in ("eager", "chunked"):
        torch.testing.assert_close(xtk.attention(q, kT, v, backend=backend), F.scaled_dot_product_attention(q, k, v))
        wide = torch.randn(3, 2, 2, 6, 16).unbind(0)
        sl = [t[..., ::2] for t in wide]
        torch.testing.assert_close(xtk.attention(*sl, backend=backend), F.scaled_dot_product_attention(*sl))


def test_chunked_copies_only_rows_with_a_last_dim_stride():
    """The chunked backend hands the fused kernel q, k, v with unit last-dim stride, copying only those
    that lack it: a (b, n, h, d) view goes through as is."""
    seen = []
    real = attention_chunked._FLASH

    def spy(q, k, v, *args, **kw):
        seen.append((q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(-1), k.stride(-1), v.stride(-1)))
        return real(q, k, v, *args, **kw)
    q, k, v = (torch.randn(1, 7, 2, 8).transpose(1, 2) for _ in range(3))
    kT = torch.randn(1, 2, 8, 7).transpose(-1, -2)
    try:
        attention_chunked._FLASH = spy
        xtk.attention(q, kT, v, backend="chunked")
    finally:
        attention_chunked._FLASH = real
    assert seen, "the fused kernel was not called"
    qp, kp, vp, *strides = seen[0]
    assert strides == [1, 1, 1]
    assert qp == q.data_ptr() and vp == v.data_ptr() and kp != kT.data_ptr()
