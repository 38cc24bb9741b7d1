"""The attention-related seed README examples, unchanged, under ``XTK_BACKEND=triton``.

Each test runs one example of tests/test_seed_examples.py (the README's own statements, sizes
shrunk; its checks: shapes, finite values, a loss that backpropagates) with every attention call
sent to the Triton kernels -- compiled on CUDA (the example built under ``torch.device("cuda")``),
through the interpreter on CPU (conftest sets ``TRITON_INTERPRET=1``) -- and asserts the kernels ran (forward and backward launches counted).
Layers that need the whole score matrix (talking heads, residual attention) are left out: they run
eager by design.
"""
import os

import pytest
import torch

import test_seed_examples as seeds

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it unless overridden)",
                allow_module_level=True)

from xtk.kernels import attention_op  # noqa: E402  (after the interpreter switch)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

EXAMPLES = [
    "s002_01_full_encoder_decoder", "s002_02_decoder_only_gpt_like", "s002_04_encoder_only_bert_like",
    "s002_05_image_classification", "s002_09_memory_key_values", "s002_19_sparse_topk", "s002_21_one_kv_head",
    "s002_26_t5_rel_pos_bias", "s002_30_transformer_xl_recurrence", "s002_33_rotary", "s002_34_rotary_xpos",
    "s002_35_dynamic_pos_bias", "s002_36_alibi", "s002_43_qk_norm_groups", "s002_44_qk_norm_scale",
    "s002_45_qk_norm_dim_scale", "s002_48_cross_attention", "s002_49_continuous_values",
    "s002_50_continuous_autoregressive", "s000_30_alibi_old_name", "s000_01_full_encoder_decoder_src_tgt_masks",
]

TRAINS = {"s002_01_full_encoder_decoder", "s002_19_sparse_topk", "s002_21_one_kv_head", "s002_26_t5_rel_pos_bias",
          "s002_33_rotary", "s002_34_rotary_xpos", "s002_35_dynamic_pos_bias", "s002_36_alibi",
          "s002_50_continuous_autoregressive", "s000_30_alibi_old_name", "s000_01_full_encoder_decoder_src_tgt_masks"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_seed_example_runs_on_triton(name, monkeypatch, one_thread):
    calls = {"fwd": 0, "bwd": 0}
    real_fwd, real_bwd = attention_op._forward, attention_op._backward

    def fwd(*a, **k):
        calls["fwd"] += 1
        return real_fwd(*a, **k)

    def bwd(*a, **k):
        calls["bwd"] += 1
        return real_bwd(*a, **k)

    monkeypatch.setattr(attention_op, "_forward", fwd)
    monkeypatch.setattr(attention_op, "_backward", bwd)
    monkeypatch.setenv("XTK_BACKEND", "triton")
    with torch.device(DEVICE):  # the example's modules and tensors: the compiled kernels take CUDA tensors only
        getattr(seeds, "test_" + name)()
    assert calls["fwd"] > 0, "no attention call reached the Triton kernels"
    if name in TRAINS:  # the example backpropagates a loss: the gradients came from the kernels too
        assert calls["bwd"] > 0, "no attention gradient came from the Triton kernels"
