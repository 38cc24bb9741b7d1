"""RMSNorm / ScaleNorm / fused residual through the C++/CUDA extension (backend="ext") against the
eager reference, by the 2x rule of tests/tolerance.py, values and gradients; on CPU always
(the C++ path) and on CUDA when a GPU is present. Also: custom-op checks (opcheck), torch.compile,
dispatch and errors."""
import pytest
import torch

import xtk
from xtk.reference.rms_norm import rms_norm as ref_rms_norm
from tolerance import check_against_oracle

from xtk import _ext
try:
    _ext.load()
    HAVE_EXT = True
except ImportError as e:  # pragma: no cover - reported by test_extension_is_built
    HAVE_EXT, EXT_ERROR = False, str(e)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, dim): every dim of the sweep; rows from 1 to 4096, none a multiple of a block size only
SHAPES = [(4096, 1), (1000, 7), (4096, 64), (33, 1000), (5, 4096), (1, 8192), (129, 8192), (3, 4097)]
WEIGHTS = ["vector", "scalar1", "scalar0", "none"]

needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="xtk._C not built (test_extension_is_built fails instead)")


def test_extension_is_built():
    """CI installs with a compiler: the extension must be there (else every other test here skips)."""
    assert HAVE_EXT, EXT_ERROR


def _weight(kind, dim, device):
    if kind == "vector":
        return torch.randn(dim, device=device) * 0.5 + 1.0
    if kind == "scalar1":
        return torch.tensor([1.3], device=device)
    if kind == "scalar0":
        return torch.tensor(0.7, device=device)
    return None


def _fns(residual):
    def kernel(x, weight=None, residual=None):
        out = xtk.rms_norm(x, weight, residual=residual, backend="ext")
        return torch.cat(out, -1) if residual is not None else out

    def eager(x, weight=None, residual=None):
        out = ref_rms_norm(x, weight, residual=residual)
        return torch.cat(out, -1) if residual is not None else out
    return kernel, eager


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim", SHAPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(device, dtype, rows, dim, residual):
    kind = WEIGHTS[(SHAPES.index((rows, dim)) + DTYPES.index(dtype) + residual) % len(WEIGHTS)]
    inputs = {"x": torch.randn(rows, dim, device=device) * 2.0, "weight": _weight(kind, dim, device)}
    grads = ["x"] + (["weight"] if inputs["weight"] is not None else [])
    if residual:
        inputs["residual"] = torch.randn(rows, dim, device=device)
        grads.append("residual")
    if inputs["weight"] is None:
        del inputs["weight"]
    kernel, eager = _fns(residual)
    check_against_oracle(kernel, eager, inputs, dtype, grad_names=grads, name=f"y[{kind}]", term_sums=_gain_sums)


def _gain_sums(g, x, weight=None, residual=None):
    """The gain gradient is one sum over every row (a scalar gain's: over every element) of
    ``g * s / ||s|| * sqrt(dim)``: -> {"weight": sum |terms|} for ``sum_floor``. Its order of
    summation is the kernel's own (the CUDA kernel sums per block, then the blocks), so kernel and
    eager differ there by rounding luck, as in attention's learned-bias gradients (H200,
    2026-11-28: a scalar gain over 1 x 8192 elements, error 1.4e-5 against eager's 1.2e-6, both a
    few ulps of sum |terms|)."""
    if weight is None:
        return {}
    s = x + residual if residual is not None else x
    dim = s.shape[-1]
    terms = (g[..., :dim] * s / s.norm(dim=-1, keepdim=True) * dim ** 0.5).abs()
    sums = terms.reshape(-1, dim).sum(0)
    return {"weight": (sums if weight.numel() == dim else sums.sum()).reshape(weight.shape)}


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", WEIGHTS)
def test_weight_kinds_and_leading_dims(device, kind):
    """RMSNorm (dim,), ScaleNorm (1,) and 0-d, no gain; 3-D input; fp32 weight with bf16 x."""
    x = torch.randn(2, 5, 96, device=device)
    inputs = {"x": x}
    w = _weight(kind, 96, device)
    if w is not None:
        inputs["weight"] = w
    kernel, eager = _fns(False)
    check_against_oracle(kernel, eager, inputs, torch.float32, grad_names=list(inputs))
    # mixed: bf16 activations, fp32 gain (x-transformers keeps parameters in fp32)
    xb = x.to(torch.bfloat16).requires_grad_()
    wf = None if w is None else w.clone().requires_grad_()
    y = xtk.rms_norm(xb, wf, backend="ext")
    y_ref = ref_rms_norm(xb.detach().double(), None if w is None else w.double())
    assert y.dtype == torch.bfloat16
    assert (y.double() - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()
    if wf is not None:
        y.float().sum().backward()
        assert wf.grad is not None and wf.grad.dtype == torch.float32 and wf.grad.shape == w.shape


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_long_rows_and_unaligned_gain(device, dtype, residual):
    """The CUDA forward keeps a row in registers up to 4 16-byte vectors per thread of a
    1024-thread row: a bf16 row of 40,000 (5,000 vectors) and an fp32 one (10,000) pass that and
    read s again; a gain that is a view 4 bytes past an aligned start makes every access scalar
    (a vector gain is read in 16-byte loads only when its address allows)."""
    rows, dim = 3, 40000
    x = torch.randn(rows, dim, device=device) * 2.0
    inputs = {"x": x, "weight": torch.randn(dim, device=device) * 0.5 + 1.0}
    if residual:
        inputs["residual"] = torch.randn(rows, dim, device=device)
    kernel, eager = _fns(residual)
    check_against_oracle(kernel, eager, inputs, dtype, grad_names=list(inputs))
    base = torch.randn(65, device=device) * 0.5 + 1.0
    inputs = {"x": torch.randn(7, 64, device=device), "weight": base[1:]}
    assert inputs["weight"].data_ptr() % 16
    if residual:
        inputs["residual"] = torch.randn(7, 64, device=device)
    check_against_oracle(kernel, eager, inputs, dtype, grad_names=list(inputs))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows_and_clamped_norm(device):
    """A zero row hits the eps clamp (y = 0, gradient through the clamp's constant branch);
    strided (non-contiguous) input; the new residual's own gradient adds to dx."""
    x = torch.randn(4, 7, 48, device=device)[:, ::2]  # non-contiguous
    x[1] = 0.0
    w = torch.randn(48, device=device)
    r = torch.randn_like(x)
    r[1] = 0.0
    inputs = {"x": x, "weight": w, "residual": r}
    kernel, eager = _fns(True)
    check_against_oracle(kernel, eager, inputs, torch.float32, grad_names=["x", "weight", "residual"])
    y = xtk.rms_norm(torch.zeros(2, 8, device=device), None, backend="ext")
    assert torch.equal(y, torch.zeros_like(y))
    empty = xtk.rms_norm(torch.zeros(0, 8, device=device), torch.ones(8, device=device), backend="ext")
    assert empty.shape == (0, 8)


@needs_ext
def test_opcheck_rms_norm_ops():
    """Schema, fake implementation and autograd registration of xtk::rms_norm_fwd / _bwd."""
    for residual in (None, torch.randn(3, 5, 40)):
        x = torch.randn(3, 5, 40, requires_grad=True)
        w = torch.randn(40, requires_grad=True)
        r = None if residual is None else residual.requires_grad_()
        torch.library.opcheck(torch.ops.xtk.rms_norm_fwd, (x, w, r, 1e-12))
    torch.library.opcheck(torch.ops.xtk.rms_norm_fwd, (torch.randn(6, 9, dtype=torch.bfloat16), torch.ones(()), None, 1e-6))
    s = torch.randn(6, 33)
    _, _, rinv = torch.ops.xtk.rms_norm_fwd(s, None, None, 1e-12)
    torch.library.opcheck(torch.ops.xtk.rms_norm_bwd, (torch.randn(6, 33), torch.randn(6, 33), s, torch.randn(33), rinv, True))


@needs_ext
def test_torch_compile_fullgraph():
    """Fused add + RMSNorm feeding a GLU compiles as one graph (inductor, CPU), forward and backward.
    Only the custom ops are in the graph, so inductor has no C++ of its own to compile (CI time)."""
    w = torch.randn(64, requires_grad=True)

    def block(x, res):
        y, s = xtk.rms_norm(x, w, residual=res, backend="ext")
        return xtk.glu(y, "silu", backend="ext"), s

    x, res = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64, requires_grad=True)
    gy, gs = torch.randn(4, 32), torch.randn(4, 64)
    ref = block(x, res)  # eager first: backends.load's first import_module cannot be traced by dynamo
    ref_grads = torch.autograd.grad(ref, (x, res, w), (gy, gs))
    out = torch.compile(block, fullgraph=True)(x, res)
    grads = torch.autograd.grad(out, (x, res, w), (gy, gs))
    for a, b in zip(out + grads, ref + ref_grads):
        torch.testing.assert_close(a, b)


@needs_ext
def test_dispatch_and_errors():
    from xtk import backends
    from xtk.ops import rms_norm as norm
    x = torch.randn(2, 8)
    assert backends.pick("rms_norm", norm._validate(x, None, 1e-12, None)).name == "ext"
    xd = x.double()
    assert backends.pick("rms_norm", norm._validate(xd, None, 1e-12, None)).name == "eager"
    with pytest.raises(RuntimeError, match="x: dtype torch.float64 not supported"):
        xtk.rms_norm(xd, None, backend="ext")
    with pytest.raises(RuntimeError, match=r"weight: expected shape \(8,\)"):
        torch.ops.xtk.rms_norm_fwd(x, torch.ones(3), None, 1e-12)
    with pytest.raises(RuntimeError, match="residual: expected dtype"):
        torch.ops.xtk.rms_norm_fwd(x, None, x.half(), 1e-12)
