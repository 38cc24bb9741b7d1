"""The TF32 eager reference (xtk.reference.tf32): rounding and the dispatch mode that applies it."""
import pytest
import torch

from xtk.reference.tf32 import round_tf32, tf32_matmuls


def test_round_tf32_keeps_ten_mantissa_bits_nearest_even():
    ulp = 2.0 ** -10  # TF32 spacing in [1, 2)
    x = torch.tensor([1.0, 1 + ulp / 4, 1 + ulp / 2, 1 + 3 * ulp / 2, 1 + 0.75 * ulp, -(1 + 0.75 * ulp),
                      float("inf"), float("nan"), 0.0, 3.0e38])
    want = torch.tensor([1.0, 1.0, 1.0, 1 + 2 * ulp, 1 + ulp, -(1 + ulp), float("inf"), float("nan"), 0.0])
    got = round_tf32(x, "rne")
    torch.testing.assert_close(got[:9], want, equal_nan=True, rtol=0, atol=0)
    assert torch.isfinite(got[9]) and abs(got[9].item() / 3.0e38 - 1) < 2 ** -10
    trunc = round_tf32(x[:6], "trunc")
    torch.testing.assert_close(trunc, torch.tensor([1.0, 1.0, 1.0, 1 + ulp, 1.0, -1.0]), rtol=0, atol=0)
    assert round_tf32(x, "exact") is x and round_tf32(x.double()).dtype == torch.float64


def test_round_tf32_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode: expected one of"):
        round_tf32(torch.ones(2), "nearest")
    with pytest.raises(ValueError, match="mode: expected one of"):
        tf32_matmuls("fast")


@pytest.mark.parametrize("mode", ["rne", "trunc"])
def test_every_fp32_product_forward_and_backward_sees_tf32_operands(mode):
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 5, 7, generator=g), torch.randn(3, 7, 4, generator=g), torch.randn(5, 7, generator=g))
    a.requires_grad_(), b.requires_grad_()
    go = torch.randn(3, 5, 4, generator=g)
    with tf32_matmuls(mode):
        out = a @ b
        lin = torch.nn.functional.linear(c, torch.randn(6, 7, generator=g), torch.ones(6))
        out.backward(go)

    def r(t):
        return round_tf32(t.detach(), mode).double()
    torch.testing.assert_close(out.double(), r(a) @ r(b), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad.double(), r(go) @ r(b).transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), r(a).transpose(1, 2) @ r(go), rtol=1e-6, atol=1e-6)
    plain = (a.detach() @ b.detach()).double()
    assert (out.double() - plain).abs().max() > 1e-5  # the rounding took effect
    assert lin.shape == (5, 6)
    half = a.detach().half()
    with tf32_matmuls(mode):
        torch.testing.assert_close(half @ half.transpose(1, 2), half @ half.transpose(1, 2))  # fp16 untouched
