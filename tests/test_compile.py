"""torch.compile(fullgraph=True) on CPU: a whole model through the dispatch points, forward and backward."""
import pytest
import torch

import xtk


@pytest.mark.parametrize("pos", ["alibi_pos_bias", "rel_pos_bias", "rotary_pos_emb"])
def test_compiled_model_matches_eager(pos):
    torch.manual_seed(0)
    model = xtk.TransformerWrapper(
        num_tokens=32, max_seq_len=16, use_abs_pos_emb=False,
        attn_layers=xtk.Decoder(dim=32, depth=1, heads=2, attn_dim_head=16, ff_glu=True, use_rmsnorm=True, **{pos: True}))
    x = torch.randint(0, 32, (2, 12))
    want = model(x)
    want.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)
