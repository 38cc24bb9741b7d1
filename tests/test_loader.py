"""Parity with the PyPI package x-transformers==2.31.10 (the oracle): build both with the same
kwargs, load the x-transformers state_dict with ``xtk.load_x_transformers_weights``, and check
outputs (fp32, eval) within 1e-4 and every parameter gradient within 1e-4."""
import pytest
import torch

import xtk
from model_helpers import perturb as _perturb

import x_transformers as X  # the oracle: a test dependency, never skipped

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")



def _max_grad_err(ref, mine):
    ref_params = dict(ref.named_parameters())
    err = 0.0
    for name, p in mine.named_parameters():
        g1, g2 = ref_params[name].grad, p.grad
        if g1 is None and g2 is None:
            continue
        g1 = torch.zeros_like(p) if g1 is None else g1
        g2 = torch.zeros_like(p) if g2 is None else g2
        err = max(err, (g1 - g2).abs().max().item())
    return err


def _pair(layers_cls, wrap_kw, layer_kw, seed=0):
    torch.manual_seed(seed)
    ref = X.TransformerWrapper(attn_layers=getattr(X, layers_cls)(**layer_kw), **wrap_kw).eval()
    _perturb(ref, seed)
    mine = xtk.TransformerWrapper(attn_layers=getattr(xtk, layers_cls)(**layer_kw), **wrap_kw).eval()
    assert xtk.load_x_transformers_weights(mine, ref.state_dict()) is mine
    return ref, mine


BASE = dict(dim=16, depth=2, heads=4, attn_dim_head=8)

CASES = {
    "basic": dict(),
    "encoder": dict(layers_cls="Encoder"),
    "gqa": dict(attn_kv_heads=2),
    "one_kv_head": dict(attn_one_kv_head=True),
    "alibi": dict(alibi_pos_bias=True),
    "alibi_num_heads": dict(alibi_pos_bias=True, alibi_num_heads=2),
    "alibi_gqa_3_heads": dict(alibi_pos_bias=True, alibi_num_heads=3, attn_kv_heads=2),
    "t5": dict(rel_pos_bias=True),
    "t5_encoder": dict(layers_cls="Encoder", rel_pos_bias=True),
    "dynamic_pos_bias": dict(dynamic_pos_bias=True),
    "dynamic_pos_bias_log_norm": dict(dynamic_pos_bias=True, dynamic_pos_bias_log_distance=True,
                                      dynamic_pos_bias_norm=True, dynamic_pos_bias_mlp_depth=3),
    "rotary": dict(rotary_pos_emb=True),
    "rotary_emb_dim": dict(rotary_pos_emb=True, rotary_emb_dim=6),
    "rotary_xpos": dict(rotary_xpos=True, rotary_xpos_scale_base=64),
    "qk_norm": dict(attn_qk_norm=True),
    "qk_norm_dim_scale": dict(attn_qk_norm=True, attn_qk_norm_dim_scale=True),
    "qk_norm_groups_scale": dict(attn_qk_norm=True, attn_qk_norm_groups=2, attn_qk_norm_scale=5),
    "qk_norm_gqa_dim_scale": dict(attn_qk_norm=True, attn_qk_norm_dim_scale=True, attn_kv_heads=2),
    "sparse_topk": dict(attn_sparse_topk=3),
    "num_mem_kv": dict(attn_num_mem_kv=3),
    "num_mem_kv_alibi": dict(attn_num_mem_kv=3, alibi_pos_bias=True),
    "gqa_t5_mem_kv": dict(attn_kv_heads=2, rel_pos_bias=True, attn_num_mem_kv=2),
    "gqa_t5_topk_mem_kv": dict(attn_kv_heads=2, rel_pos_bias=True, attn_sparse_topk=4, attn_num_mem_kv=2),
    "t5_topk_mem_kv": dict(rel_pos_bias=True, attn_sparse_topk=4, attn_num_mem_kv=2),
    "topk_alibi": dict(alibi_pos_bias=True, attn_sparse_topk=4),
    "memory_tokens": dict(layers_cls="Encoder", wrap_kw=dict(num_memory_tokens=3)),
    "sandwich_norm": dict(sandwich_norm=True),
    "post_norm": dict(pre_norm=False),
    "post_norm_rmsnorm": dict(pre_norm=False, use_rmsnorm=True),
    "post_norm_scalenorm_gqa": dict(pre_norm=False, use_scalenorm=True, attn_kv_heads=2),
    "scalenorm": dict(use_scalenorm=True),
    "rmsnorm": dict(use_rmsnorm=True),
    "macaron": dict(macaron=True),
    "ff_glu": dict(ff_glu=True),
    "ff_swish_glu": dict(ff_glu=True, ff_swish=True),
    "ff_relu_squared": dict(ff_relu_squared=True),
    "ff_relu_squared_glu": dict(ff_relu_squared=True, ff_glu=True),
    "ff_post_act_ln_no_bias": dict(ff_post_act_ln=True, ff_no_bias=True, ff_mult=2),
    "residual_attn": dict(residual_attn=True),
    "talking_heads_pre_post": dict(attn_pre_talking_heads=True, attn_post_talking_heads=True),
    "gqa_talking_residual_alibi": dict(attn_kv_heads=2, residual_attn=True, attn_pre_talking_heads=True,
                                       attn_post_talking_heads=True, alibi_pos_bias=True, alibi_num_heads=3),
    "gate_values": dict(attn_gate_values=True),
    "head_scale": dict(attn_head_scale=True),
    "gqa_dpb_head_scale_gate": dict(attn_kv_heads=2, dynamic_pos_bias=True, attn_head_scale=True, attn_gate_values=True),
    "on_attn": dict(attn_on_attn=True),
    "gate_residual": dict(gate_residual=True),
    "scale_residual": dict(scale_residual=True),
    "shift_tokens": dict(shift_tokens=1),
    "shift_tokens_encoder_tuple": dict(layers_cls="Encoder", shift_tokens=(1, 0, 2, 0)),
    "sandwich_coef": dict(depth=3, sandwich_coef=1),
    "par_ratio": dict(depth=4, par_ratio=2),
    "custom_layers": dict(depth=None, custom_layers=("a", "f", "a", "a", "f")),
    "tie_embedding": dict(wrap_kw=dict(tie_embedding=True)),
    "l2norm_embed_post_emb_norm": dict(wrap_kw=dict(l2norm_embed=True, post_emb_norm=True)),
    "scaled_sinu_pos_emb": dict(wrap_kw=dict(scaled_sinu_pos_emb=True)),
    "no_abs_pos_emb": dict(wrap_kw=dict(use_abs_pos_emb=False)),
    "emb_dim": dict(wrap_kw=dict(emb_dim=12)),
    "value_dim_head": dict(attn_value_dim_head=6),
    "one_head": dict(heads=1, attn_dim_head=16),
    "norm_add_unit_offset_false": dict(norm_add_unit_offset=False, use_rmsnorm=True),
    "memory_tokens_decoder": dict(wrap_kw=dict(num_memory_tokens=2)),
    "rotary_interpolation_rescale": dict(rotary_pos_emb=True, rotary_interpolation_factor=2.0, rotary_base_rescale_factor=2.0),
    "emb_frac_gradient_avg_pool": dict(layers_cls="Encoder", wrap_kw=dict(emb_frac_gradient=0.5, average_pool_embed=True)),
    "rel_pos_buckets": dict(rel_pos_bias=True, rel_pos_num_buckets=8, rel_pos_max_distance=16),
    "cross_attn_kwargs_decoder": dict(attn_kv_heads=2, ff_mult=2.5, attn_qk_norm=True, attn_qk_norm_groups=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity(name):
    case = dict(CASES[name])
    layers_cls = case.pop("layers_cls", "Decoder")
    wrap_kw = dict(num_tokens=23, max_seq_len=16, **case.pop("wrap_kw", {}))
    layer_kw = {k: v for k, v in {**BASE, **case}.items() if v is not None}
    ref, mine = _pair(layers_cls, wrap_kw, layer_kw)
    x = torch.randint(0, 23, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, -3:] = False
    for kw in ({}, {"mask": mask}):
        ref.zero_grad(), mine.zero_grad()
        a, b = ref(x, **kw), mine(x, **kw)
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < TOL, f"{name} {kw.keys()}: output differs"
        (a.square().mean() + a[:, :3].mean()).backward()
        (b.square().mean() + b[:, :3].mean()).backward()
        assert _max_grad_err(ref, mine) < TOL, f"{name} {kw.keys()}: gradients differ"


@pytest.mark.parametrize("cls,extra", [
    ("CrossAttender", {}),
    ("Encoder", dict(cross_attend=True)),
    ("Decoder", dict(cross_attend=True, rotary_pos_emb=True, cross_residual_attn=True, attn_kv_heads=2)),
    ("Decoder", dict(cross_attend=True, only_cross=True, cross_attn_dim_context=12, cross_attn_dim_head=4)),
])
def test_cross_attention_parity(cls, extra):
    kw = dict(dim=16, depth=2, heads=4, attn_dim_head=8, **extra)
    torch.manual_seed(0)
    ref = getattr(X, cls)(**kw).eval()
    _perturb(ref)
    mine = xtk.load_x_transformers_weights(getattr(xtk, cls)(**kw).eval(), ref.state_dict())
    x = torch.randn(2, 7, 16, requires_grad=True)
    ctx = torch.randn(2, 5, extra.get("cross_attn_dim_context", 16), requires_grad=True)
    cm = torch.ones(2, 5, dtype=torch.bool)
    cm[1, 3:] = False
    m = torch.ones(2, 7, dtype=torch.bool)
    m[0, 5:] = False
    a = ref(x, context=ctx, context_mask=cm, mask=m)
    ga = torch.autograd.grad(a.square().sum(), (x, ctx))
    b = mine(x, context=ctx, context_mask=cm, mask=m)
    gb = torch.autograd.grad(b.square().sum(), (x, ctx))
    assert (a - b).abs().max() < TOL
    for u, v in zip(ga, gb):
        assert (u - v).abs().max() < TOL


def test_encoder_context_decoder_parity():
    """Encoder output as the context of a cross-attending decoder (the XTransformer layout)."""
    torch.manual_seed(0)
    enc_r = X.TransformerWrapper(num_tokens=20, max_seq_len=12, attn_layers=X.Encoder(dim=16, depth=1, heads=2, attn_dim_head=8)).eval()
    dec_r = X.TransformerWrapper(num_tokens=20, max_seq_len=12, attn_layers=X.Decoder(dim=16, depth=1, heads=2, attn_dim_head=8, cross_attend=True)).eval()
    _perturb(enc_r, 1), _perturb(dec_r, 2)
    enc = xtk.load_x_transformers_weights(xtk.TransformerWrapper(num_tokens=20, max_seq_len=12, attn_layers=xtk.Encoder(dim=16, depth=1, heads=2, attn_dim_head=8)).eval(), enc_r.state_dict())
    dec = xtk.load_x_transformers_weights(xtk.TransformerWrapper(num_tokens=20, max_seq_len=12, attn_layers=xtk.Decoder(dim=16, depth=1, heads=2, attn_dim_head=8, cross_attend=True)).eval(), dec_r.state_dict())
    src, tgt = torch.randint(0, 20, (2, 9)), torch.randint(0, 20, (2, 6))
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    src_mask[1, 6:] = False
    a = dec_r(tgt, context=enc_r(src, mask=src_mask, return_embeddings=True), context_mask=src_mask)
    b = dec(tgt, context=enc(src, mask=src_mask, return_embeddings=True), context_mask=src_mask)
    assert (a - b).abs().max() < TOL


@pytest.mark.parametrize("shift_mem_down,pos_kw", [(0, dict(rel_pos_bias=True)), (1, dict(rel_pos_bias=True)),
                                                    (0, dict(rotary_xpos=True)), (0, dict(alibi_pos_bias=True, attn_kv_heads=2)),
                                                    (1, dict(dynamic_pos_bias=True, attn_num_mem_kv=2))])
def test_transformer_xl_mems_parity(shift_mem_down, pos_kw):
    kw = dict(dim=16, depth=2, heads=4, attn_dim_head=8, **pos_kw)
    wkw = dict(num_tokens=20, max_seq_len=8, max_mem_len=6, shift_mem_down=shift_mem_down)
    torch.manual_seed(1)
    ref = X.TransformerWrapper(attn_layers=X.Decoder(**kw), **wkw).eval()
    _perturb(ref)
    mine = xtk.load_x_transformers_weights(xtk.TransformerWrapper(attn_layers=xtk.Decoder(**kw), **wkw).eval(), ref.state_dict())
    ma = mb = None
    for seg in torch.randint(0, 20, (3, 2, 5)):
        la, ma = ref(seg, mems=ma, return_mems=True)
        lb, mb = mine(seg, mems=mb, return_mems=True)
        assert (la - lb).abs().max() < TOL
        assert len(ma) == len(mb) and all(p.shape == q.shape and (p - q).abs().max() < TOL for p, q in zip(ma, mb))
    assert mb[0].shape[1] == 6


def test_return_conventions_parity():
    ref, mine = _pair("Decoder", dict(num_tokens=23, max_seq_len=16), dict(BASE))
    x = torch.randint(0, 23, (2, 10))
    assert (ref(x, return_embeddings=True) - mine(x, return_embeddings=True)).abs().max() < TOL
    (la, ea), (lb, eb) = ref(x, return_logits_and_embeddings=True), mine(x, return_logits_and_embeddings=True)
    assert (la - lb).abs().max() < TOL and (ea - eb).abs().max() < TOL
    _, ia = ref(x, return_intermediates=True)
    _, ib = mine(x, return_intermediates=True)
    assert len(ia.hiddens) == len(ib.hiddens) and (ia.last_hidden - ib.last_hidden).abs().max() < TOL
    assert len(ia.attn_intermediates) == len(ib.attn_intermediates)
    for p, q in zip(ia.attn_intermediates, ib.attn_intermediates):
        for s, t in zip(p.cached_kv, q.cached_kv):
            assert s.shape == t.shape and (s - t).abs().max() < TOL   # no qk norm: same cached keys


def test_kv_cache_matches_x_transformers_full_forward():
    ref, mine = _pair("Decoder", dict(num_tokens=23, max_seq_len=16), dict(BASE, rotary_pos_emb=True, attn_kv_heads=2))
    x = torch.randint(0, 23, (2, 9))
    full = ref(x)
    logits, cache = mine(x[:, :5], return_intermediates=True)
    outs = [logits]
    for t in range(6, 10):
        step, cache = mine(x[:, :t], return_intermediates=True, cache=cache)
        outs.append(step)
    assert (torch.cat(outs, 1) - full).abs().max() < TOL


def test_loader_errors_list_keys():
    ref = X.TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=X.Decoder(dim=16, depth=1, heads=2, attn_dim_head=8, attn_gate_values=True))
    mine = xtk.TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=xtk.Decoder(dim=16, depth=1, heads=2, attn_dim_head=8))
    with pytest.raises(KeyError, match="to_v_gate.weight"):
        xtk.load_x_transformers_weights(mine, ref.state_dict())
    sd = {k: v for k, v in X.TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=X.Decoder(dim=16, depth=1, heads=2, attn_dim_head=8)).state_dict().items()
          if "to_q" not in k}
    with pytest.raises(KeyError, match="missing.*to_q.weight"):
        xtk.load_x_transformers_weights(mine, sd)
    bigger = X.TransformerWrapper(num_tokens=21, max_seq_len=8, attn_layers=X.Decoder(dim=16, depth=1, heads=2, attn_dim_head=8))
    with pytest.raises(ValueError, match="token_emb.emb.weight"):
        xtk.load_x_transformers_weights(mine, bigger.state_dict())
    with pytest.raises(TypeError, match="state_dict"):
        xtk.load_x_transformers_weights(mine, [1, 2])


def test_loader_undoes_unit_offset():
    ref = X.TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=X.Decoder(dim=16, depth=1, heads=2, attn_dim_head=8, use_rmsnorm=True))
    mine = xtk.load_x_transformers_weights(xtk.TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=xtk.Decoder(dim=16, depth=1, heads=2, attn_dim_head=8, use_rmsnorm=True)), ref.state_dict())
    assert torch.equal(ref.state_dict()["attn_layers.final_norm.g"], torch.zeros(16))  # x-transformers stores g - 1
    assert torch.equal(mine.attn_layers.final_norm.g.detach(), torch.ones(16))


@pytest.mark.parametrize("case", [dict(), dict(alibi_pos_bias=True, attn_kv_heads=2), dict(rotary_pos_emb=True, attn_num_mem_kv=2)])
def test_seq_start_pos_attn_mask_return_attn_parity(case):
    ref, mine = _pair("Decoder", dict(num_tokens=23, max_seq_len=16), {**BASE, **case})
    x = torch.randint(0, 23, (2, 10))
    ssp = torch.tensor([0, 3])
    a, b = ref(x, seq_start_pos=ssp), mine(x, seq_start_pos=ssp)
    # left-padded positions (no key at all) are zeros in xtk, an average in x-transformers (SPEC §2.8)
    assert (a[0] - b[0]).abs().max() < TOL and (a[1, 3:] - b[1, 3:]).abs().max() < TOL
    g = torch.Generator().manual_seed(0)
    for am in ((torch.rand(10, 10, generator=g) > 0.3) | torch.eye(10, dtype=torch.bool),
               (torch.rand(2, 4, 10, 10, generator=g) > 0.3) | torch.eye(10, dtype=torch.bool)):
        if case.get("attn_num_mem_kv"):
            continue  # x-transformers cannot combine attn_mask with memory key/values
        assert (ref(x, attn_mask=am) - mine(x, attn_mask=am)).abs().max() < TOL
    (la, aa), (lb, ab) = ref(x, return_attn=True), mine(x, return_attn=True)
    assert (la - lb).abs().max() < TOL
    assert len(aa) == len(ab) and all(p.shape == q.shape and (p - q).abs().max() < TOL for p, q in zip(aa, ab))


def test_residual_attention_intermediates_parity_gqa():
    ref, mine = _pair("Decoder", dict(num_tokens=23, max_seq_len=16), {**BASE, "attn_kv_heads": 2, "residual_attn": True})
    x = torch.randint(0, 23, (2, 10))
    (la, ia), (lb, ib) = ref(x, return_intermediates=True), mine(x, return_intermediates=True)
    assert (la - lb).abs().max() < TOL
    for p, q in zip(ia.attn_intermediates, ib.attn_intermediates):   # x-transformers' head order
        assert (p.pre_softmax_attn - q.pre_softmax_attn).abs().max() < TOL
