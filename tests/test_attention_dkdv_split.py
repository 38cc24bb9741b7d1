"""The dK/dV kernel's split of the GQA group over programs (``attention_op.dkdv_split``).

One dK/dV program walks every query head of its GQA group; where that grid leaves SMs idle (MQA or
GQA at a small batch) the launcher splits the group into slices, each program writes its slice's
fp32 partial dK/dV, and the launcher sums them. Off a GPU the split never happens by itself (no
SMs: ``sm_count`` is 0), so these tests force it (``dkdv_split`` patched to return ``want``, cut to
the group: uneven slices, and an empty last slice where ``want`` does not divide the group well)
and judge the gradients by the 2x rule against fp64 (tests/tolerance.py), as the sweeps do unsplit:
GQA 8->1 and 8->2 with each bias kind, masks, causal with offsets and prefix keys, bf16, both head
orders, a packed (varlen) batch and the NaN rule's guard twins. A spy checks each dK/dV launch got
the forced split, so a test cannot pass on the unsplit path.
"""
import os

import pytest
import torch

from xtk.kernels import attention_op

import test_attention_gqa_order as gqa_order
import test_attention_nan as nan_rule
import test_attention_varlen_kernel as varlen_kernel
from launch_spy import spy_launches
from test_attention_sweep import run_check
from tolerance import check_against_oracle

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("programs,group,sms,want", [
    (64, 16, 132, 2),     # MQA at batch 1, n 4096, 64-key blocks: two slices fill one wave
    (10, 8, 132, 8),      # a tiny grid: every head its own program
    (100, 16, 132, 1),    # two slices would take two waves of half the work: no gain, no split
    (64, 3, 132, 2),      # one slice of 2 heads, one of 1
    (132, 16, 132, 1),    # the grid already fills the GPU
    (64, 1, 132, 1),      # no group to split
    (4, 8, 0, 1),         # no GPU (the interpreter)
])
def test_dkdv_split_choice(programs, group, sms, want):
    assert attention_op.dkdv_split(programs, group, sms) == want


@pytest.mark.parametrize("group", range(1, 17))
@pytest.mark.parametrize("programs", [1, 7, 40, 131])
def test_dkdv_split_never_leaves_a_slice_empty(programs, group):
    s = attention_op.dkdv_split(programs, group, 132)
    per = -(-group // s)
    assert 1 <= s <= group and (s - 1) * per < group


@pytest.fixture
def split(monkeypatch):
    """``split(want)``: force ``min(group, want)`` slices from now on; -> the list of n_split each
    dK/dV launch received (its last positional argument)."""
    seen = []
    spy_launches(monkeypatch, attention_op, ["_attn_bwd_dkdv"], lambda name, args, kwargs: seen.append(args[-1]))

    def force(want):
        monkeypatch.setattr(attention_op, "dkdv_split", lambda programs, group, sms: min(group, want))
        return seen
    return force


FEATURES = ["gqa8to1", "gqa8to1+causal+prefix+offset+alibi", "gqa8to2+t5", "gqa8to1+table+causal",
            "gqa8to2+dense+keypad", "gqa8to2+maskbool+strided"]


@pytest.mark.parametrize("want", [3, 8])
@pytest.mark.parametrize("feature", FEATURES)
def test_split_group_gradients(feature, want, split):
    seen = split(want)
    run_check("triton", feature, torch.float32, nq=17, nk=40)
    assert seen and set(seen) == {min(want, 8 if "gqa8to1" in feature else 4)}, seen


def test_split_group_bf16(split):
    seen = split(3)
    run_check("triton", "gqa8to2+causal+alibi", torch.bfloat16, nq=33, nk=65)
    assert seen and set(seen) == {3}


@pytest.mark.parametrize("feature", ["alibi", "dtable", "qknorm"])
def test_split_group_repeat_order(feature, split):
    """x-transformers' head order (query head i reads kv head i % hk): 6 heads on 2, slices of 2 and 1."""
    seen = split(2)
    inputs = gqa_order._inputs(feature)
    check_against_oracle(gqa_order._repeat_order("triton", feature), gqa_order._oracle(feature), inputs,
                         torch.float32, grad_names=list(inputs))
    assert seen and set(seen) == {2}


@pytest.mark.parametrize("case,want", [("mqa4to1", 4), ("everything", 3)])
def test_split_group_varlen(case, want, split):
    seen = split(want)
    inputs = varlen_kernel._inputs(case)
    learned = [n for n in inputs if n not in ("q", "k", "v")]
    check_against_oracle(varlen_kernel._one_launch(case), varlen_kernel._per_sequence(case), inputs,
                         torch.float32, grad_names=list(inputs), term_sums=varlen_kernel._term_sums(case, learned))
    assert seen and set(seen) == {min(want, varlen_kernel.CASES[case][0] // varlen_kernel.CASES[case][1])}


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")
@pytest.mark.parametrize("name", ["case_q_nan_row", "case_k_nan_causal", "case_v_nan_masked"])
def test_split_group_nan_rule(name, split):
    """The guard twin of dK/dV rewrites its slice's partials (GQA 4 -> 2: one head a slice)."""
    seen = split(2)
    torch.manual_seed(0)
    cases = getattr(nan_rule, name)()
    errors = [e for case in (cases if isinstance(cases, list) else [cases]) for e in nan_rule.check_case(case, "triton")]
    assert not errors, "\n".join(errors)
    assert seen and set(seen) == {2}
