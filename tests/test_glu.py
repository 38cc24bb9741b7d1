"""GLU family (GEGLU exact/tanh, SwiGLU, ReGLU, relu_squared-gated) and plain activations through
the C++/CUDA extension (backend="ext") against the eager reference, by the 2x rule of
tests/tolerance.py, values and gradients; CPU always (the C++ path), CUDA when a GPU is present."""
import pytest
import torch

from xtk.ops.glu import activation, glu
from xtk.reference import glu as ref
from xtk.reference.glu import ACTIVATIONS
from tolerance import check_against_oracle

from xtk import _ext
try:
    _ext.load()
    HAVE_EXT = True
except ImportError:
    HAVE_EXT = False
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="xtk._C not built (tests/test_rms_norm.py::test_extension_is_built fails)")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, inner): inner sizes from 1 to 4096 incl. odd ones (unaligned gate half), rows up to 4096
SHAPES = [(4096, 1), (1000, 7), (257, 64), (3, 1000), (2, 4096), (1, 4099)]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_glu_matches_reference(device, dtype, act):
    for rows, inner in SHAPES:
        x = torch.randn(rows, 2 * inner, device=device) * 2.0
        check_against_oracle(lambda x: glu(x, act, backend="ext"), lambda x: ref.glu(x, act), {"x": x}, dtype,
                             grad_names=["x"], name=f"glu[{act}] {rows}x{inner}")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_matches_reference(device, dtype, act):
    for shape in [(4096, 1), (7, 1000), (3, 5, 8192), (4099,)]:
        x = torch.randn(*shape, device=device) * 2.0
        x.view(-1)[:3] = 0.0  # relu's kink: derivative 0 at 0, as torch
        check_against_oracle(lambda x: activation(x, act, backend="ext"), lambda x: ref.activation(x, act),
                             {"x": x}, dtype, grad_names=["x"], name=f"{act} {shape}")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_wide_input_range(device, act):
    """The CPU exp/erf/tanh are polynomial (vectorizable): check them far into the tails and at 0."""
    x = torch.cat([torch.linspace(-95.0, 95.0, 3801), torch.linspace(-1e-3, 1e-3, 201)]).to(device)
    check_against_oracle(lambda x: activation(x, act, backend="ext"), lambda x: ref.activation(x, act), {"x": x},
                         torch.float32, grad_names=["x"], name=f"{act} wide")
    g = torch.cat([x.view(1, -1), x.flip(0).view(1, -1)], -1)
    check_against_oracle(lambda x: glu(x, act, backend="ext"), lambda x: ref.glu(x, act), {"x": g},
                         torch.float32, grad_names=["x"], name=f"glu[{act}] wide")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_empty_inputs(device):
    base = torch.randn(6, 2 * 48 + 5, device=device)
    x = base[:, 5:]  # rows start at an unaligned offset: scalar path
    check_against_oracle(lambda x: glu(x, "gelu", backend="ext"), lambda x: ref.glu(x, "gelu"), {"x": x},
                         torch.float32, grad_names=["x"])
    xt = torch.randn(8, 3, 16, device=device).transpose(0, 1)  # non-contiguous
    check_against_oracle(lambda x: glu(x, "silu", backend="ext"), lambda x: ref.glu(x, "silu"), {"x": xt},
                         torch.float16, grad_names=["x"])
    assert glu(torch.zeros(0, 8, device=device), "relu", backend="ext").shape == (0, 4)
    assert activation(torch.zeros(3, 0, device=device), "relu", backend="ext").shape == (3, 0)


@needs_ext
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_opcheck_glu_ops(act):
    """Schema, fake implementation and autograd registration of every GLU / activation op."""
    x = torch.randn(3, 4, 2 * 17, requires_grad=True)
    torch.library.opcheck(torch.ops.xtk.glu_fwd, (x, act))
    torch.library.opcheck(torch.ops.xtk.activation_fwd, (x, act))
    torch.library.opcheck(torch.ops.xtk.glu_bwd, (torch.randn(3, 4, 17), x.detach(), act))
    torch.library.opcheck(torch.ops.xtk.activation_bwd, (torch.randn(3, 4, 34), x.detach(), act))


@needs_ext
def test_dispatch_and_errors():
    from xtk import backends
    from xtk.ops import glu as glu_ops
    x = torch.randn(2, 8)
    assert backends.pick("glu", glu_ops._validate(x, "gelu", gated=True)).name == "ext"
    assert backends.pick("activation", glu_ops._validate(x.double(), "gelu", gated=False)).name == "eager"
    with pytest.raises(RuntimeError, match="x: dtype torch.float64 not supported"):
        glu(x.double(), "gelu", backend="ext")
    with pytest.raises(RuntimeError, match="activation: expected one of .* got 'swish'"):
        torch.ops.xtk.glu_fwd(x, "swish")
    with pytest.raises(RuntimeError, match="x: expected an even last dim"):
        torch.ops.xtk.glu_fwd(torch.randn(2, 7), "gelu")
    with pytest.raises(RuntimeError, match=r"dy: expected shape \[2, 4\]"):
        torch.ops.xtk.glu_bwd(torch.randn(2, 5), x, "gelu")


@needs_ext
def test_double_backward_raises():
    """Higher-order gradients are not implemented by the ext ops: a clear error, not missing grads."""
    x = torch.randn(3, 8, requires_grad=True)
    for y in (glu(x, "gelu", backend="ext"), activation(x, "silu", backend="ext"),
              __import__("xtk").rms_norm(x, torch.ones(8), backend="ext")):
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            g.pow(2).sum().backward()
