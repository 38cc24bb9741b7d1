"""The sum-aware part of the 2x rule (``xtk.reference.tolerance.sum_floor``, issue 12 item 10):
``attention_term_sums`` against sums written out by hand, the floor's value, that it widens only
the gradients named as sums over the score matrix, and the margins report's arithmetic."""
import pytest
import torch

from xtk.bias import Alibi, DistanceTable, T5, alibi_slopes, t5_bucket
from xtk.qk import QKNorm
from xtk.reference.attention import attention as reference
from xtk.reference.tolerance import FLOOR, SUM_FACTOR, attention_term_sums, sum_floor

import report_margins
from tolerance import attention_sums, check_against_oracle

B, H, NQ, NK, D = 2, 3, 5, 9, 8


def _logit_grads(q, k, v, g, **kw):
    """dS (b, h, nq, nk) by a different route than the hook: the gradient of a zero float mask."""
    zero = torch.zeros(B, H, NQ, NK, dtype=torch.float64, requires_grad=True)
    mask = kw.pop("attn_mask", None)
    if mask is not None:
        zero_mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        out = reference(q, k, v, attn_mask=zero + zero_mask, **kw)
    else:
        out = reference(q, k, v, attn_mask=zero, **kw)
    return torch.autograd.grad(out, zero, g)[0]


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64, generator=g) for n in (NQ, NK, NK))
    return q, k, v, torch.randn(B, H, NQ, D, dtype=torch.float64, generator=g)


def test_term_sums_alibi_by_hand():
    q, k, v, g = _inputs(0)
    slopes = torch.tensor(alibi_slopes(2), dtype=torch.float64)  # 2 of 3 heads
    kw = dict(is_causal=True, q_offset=NK - 1 - NQ, k_prefix=1, bias=Alibi(slopes))
    ds = _logit_grads(q, k, v, g, **kw).abs()
    pi = torch.arange(NQ) + kw["q_offset"]
    pj = torch.arange(NK) - 1
    dist = (pi[:, None] - pj[None, :]).abs().double()
    dist[:, 0] = 0  # the prefix key carries no position
    want = (ds * dist).sum((0, 2, 3))[:2]
    got = attention_term_sums(q, k, v, g, **kw)["bias"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert set(attention_term_sums(q, k, v, g, **kw)) == {"bias"}


def test_term_sums_t5_and_table_by_hand():
    q, k, v, g = _inputs(1)
    table = torch.randn(8, H, dtype=torch.float64)
    keep = torch.rand(B, 1, 1, NK) > 0.3
    kw = dict(bias=T5(table, num_buckets=8, max_distance=16, scale=-1.5), attn_mask=keep)
    ds = _logit_grads(q, k, v, g, **kw).abs().sum(0)  # (h, nq, nk)
    bucket = t5_bucket(torch.arange(NK)[None, :] - torch.arange(NQ)[:, None], 8, 16, False)
    want = torch.zeros(8, H, dtype=torch.float64)
    for t in range(8):
        want[t] = 1.5 * (ds * (bucket == t)).sum((1, 2))
    torch.testing.assert_close(attention_term_sums(q, k, v, g, **kw)["bias"], want, rtol=1e-12, atol=1e-12)
    L = NQ + NK
    dt = torch.randn(2 * L - 1, H, dtype=torch.float64)
    kw = dict(bias=DistanceTable(dt), q_offset=3)
    ds = _logit_grads(q, k, v, g, **kw).abs().sum(0)
    idx = (torch.arange(NQ)[:, None] + 3 - torch.arange(NK)[None, :]) + (L - 1)
    want = torch.zeros(2 * L - 1, H, dtype=torch.float64)
    for r in range(2 * L - 1):
        want[r] = (ds * (idx == r)).sum((1, 2))
    torch.testing.assert_close(attention_term_sums(q, k, v, g, **kw)["bias"], want, rtol=1e-12, atol=1e-12)


def test_term_sums_learned_scale_by_hand():
    q, k, v, g = _inputs(2)
    lam = torch.tensor(4.0, dtype=torch.float64)
    kw = dict(qk_norm=QKNorm(groups=2, scale=lam), is_causal=True)
    ds = _logit_grads(q, k, v, g, **kw)
    qn, kn = (torch.nn.functional.normalize(t.reshape(*t.shape[:-1], 2, D // 2), dim=-1).reshape(t.shape)
              for t in (q, k))
    want = (ds * (qn @ kn.transpose(-1, -2))).abs().sum()
    got = attention_term_sums(q, k, v, g, **kw)
    torch.testing.assert_close(got["scale"], want, rtol=1e-12, atol=1e-12)
    assert "bias" not in got
    assert attention_term_sums(q, k, v, g, qk_norm=QKNorm(scale=10.0)) == {}  # a float scale: no sum


@pytest.mark.parametrize("dtype,eps", [(torch.float32, 2.0 ** -23), (torch.bfloat16, 2.0 ** -23),
                                       (torch.float16, 2.0 ** -23), (torch.float64, 2.0 ** -52)])
def test_sum_floor_value(dtype, eps):
    sums = torch.tensor([3.0, -250.0, 7.0])
    assert sum_floor(sums, dtype) == SUM_FACTOR * eps * 250.0
    assert sum_floor(torch.zeros(0), dtype) == 0.0


def _slopes_case(seed=3):
    g = torch.Generator().manual_seed(seed)
    inputs = dict(q=torch.randn(1, H, 33, 16, generator=g), k=torch.randn(1, H, 40, 16, generator=g),
                  v=torch.randn(1, H, 40, 16, generator=g), slopes=torch.tensor(alibi_slopes(H)))

    def kwargs(slopes):
        return dict(is_causal=True, q_offset=7, bias=Alibi(slopes))

    def eager(q, k, v, slopes):
        return reference(q, k, v, **kwargs(slopes))
    return inputs, kwargs, eager


def _perturbed(fn, name, delta):
    """``fn`` whose gradient to input ``name`` is off by ``delta`` (in its first element)."""
    def call(**args):
        t = args[name]
        t.register_hook(lambda grad: grad + delta * (torch.arange(grad.numel()) == 0).reshape(grad.shape))
        return fn(**args)
    return call


def test_sum_floor_widens_only_the_named_gradients():
    """A slope-gradient error inside the sum floor passes, the same error in dq does not, and an
    error beyond the floor fails dslopes too: the rule is not loosened anywhere else."""
    inputs, kwargs, eager = _slopes_case()
    sums = attention_sums(lambda slopes: kwargs(slopes), bias="slopes")
    g = torch.Generator().manual_seed(0)
    probe = {n: t.double() for n, t in inputs.items()}
    grad_out = torch.randn(1, H, 33, 16, dtype=torch.float64, generator=g)
    floor = sum_floor(sums(grad_out, **probe)["slopes"], torch.float32)
    assert floor > 10 * FLOOR[torch.float32]  # the case is one where the floor matters
    names = ["q", "k", "v", "slopes"]
    check_against_oracle(_perturbed(eager, "slopes", 0.8 * floor), eager, inputs, torch.float32, names,
                         term_sums=sums)
    with pytest.raises(AssertionError, match="dslopes"):
        check_against_oracle(_perturbed(eager, "slopes", 3 * floor), eager, inputs, torch.float32, names,
                             term_sums=sums)
    with pytest.raises(AssertionError, match="dq"):
        check_against_oracle(_perturbed(eager, "q", 0.8 * floor), eager, inputs, torch.float32, names,
                             term_sums=sums)
    with pytest.raises(AssertionError, match="dslopes"):  # without term_sums: the plain rule
        check_against_oracle(_perturbed(eager, "slopes", 0.8 * floor), eager, inputs, torch.float32, names)


def test_margins_report(capsys):
    rows = [dict(test="t::a", name="dq", ok=True, kernel_err=1.0, eager_err=1.0, limit=3.0, floor=1.0,
                 dtype_floor=1.0, why=""),
            dict(test="t::b", name="dslopes", ok=True, kernel_err=4.0, eager_err=1.0, limit=6.0, floor=4.0,
                 dtype_floor=1.0, why="")]
    assert report_margins.ratio(rows[0]) == pytest.approx(1 / 3)
    assert report_margins.ratio(rows[1]) == pytest.approx(4 / 6)
    assert report_margins.ratio(rows[1], rows[1]["dtype_floor"]) == pytest.approx(4 / 3)
    report_margins.report(rows, top=5)
    text = capsys.readouterr().out
    assert text.index("t::b") < text.index("t::a")  # worst first
    assert "1 verdicts with the sum floor" in text and "1.333" in text
