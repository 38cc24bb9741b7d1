"""The xtk model stack on its own: KV cache == full forward, the features today's x-transformers
dropped (checked against their formulas), every seed AttentionLayers kwarg runs, error messages."""
import math

import pytest
import torch

import xtk
from model_helpers import perturb as _perturb
from xtk.models.intermediates import LayerIntermediates
from xtk.modules.attention import Attention, entmax15
from xtk.modules.positional import FixedSinusoidalEmbedding

BASE = dict(dim=16, depth=2, heads=4, attn_dim_head=8)


pytestmark = pytest.mark.usefixtures("one_thread")



def _lm(layers_cls="Decoder", wrap_kw=None, **kw):
    torch.manual_seed(0)
    m = xtk.TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=getattr(xtk, layers_cls)(**{**BASE, **kw}),
                               **(wrap_kw or {}))
    return _perturb(m).eval()


# ---------------------------------------------------------------- KV cache
CACHE_CASES = {
    "plain": {}, "rotary": dict(rotary_pos_emb=True), "xpos": dict(rotary_xpos=True),
    "alibi_gqa": dict(alibi_pos_bias=True, alibi_num_heads=2, attn_kv_heads=2), "t5": dict(rel_pos_bias=True),
    "dynamic_pos_bias": dict(dynamic_pos_bias=True), "mem_kv_qk_norm": dict(attn_num_mem_kv=2, attn_qk_norm=True, attn_qk_norm_dim_scale=True),
    "residual_talking": dict(residual_attn=True, attn_talking_heads=True), "cross": dict(cross_attend=True, cross_residual_attn=True),
    "position_infused": dict(position_infused_attn=True), "topk": dict(attn_sparse_topk=2), "entmax15": dict(attn_use_entmax15=True),
    "collab": dict(attn_collab_heads=True, attn_collab_compression=0.5), "rezero": dict(use_rezero=True), "deepnorm": dict(deepnorm=True),
    "rmsnorm_sandwich_macaron": dict(use_rmsnorm=True, sandwich_norm=True, macaron=True),
}


@pytest.mark.parametrize("name", list(CACHE_CASES))
def test_kv_cache_equals_full_forward(name):
    m = _lm(**CACHE_CASES[name])
    x = torch.randint(0, 20, (2, 9))
    ctx = {"context": torch.randn(2, 4, 16)} if CACHE_CASES[name].get("cross_attend") else {}
    full = m(x, **ctx)
    logits, cache = m(x[:, :4], return_intermediates=True, **ctx)
    assert isinstance(cache, LayerIntermediates) and cache.cache_length == 4
    outs = [logits]
    for t in range(5, 10):
        step, cache = m(x[:, :t], return_intermediates=True, cache=cache, **ctx)
        assert step.shape == (2, 1, 20)  # only the new token is computed
        outs.append(step)
    assert cache.cache_length == 9 and cache.attn_intermediates[0].cached_kv[0].shape[-2] == 9
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-5


def test_kv_cache_sliding_window_and_beam_expand():
    # what generate() does past max_seq_len (relative positions) and for beams; one layer, so the
    # cached keys of the window do not depend on the tokens that fell out of it
    m = _lm(rotary_pos_emb=True, depth=1)
    x = torch.randint(0, 20, (1, 8))
    _, cache = m(x[:, :6], return_intermediates=True)
    for inter in cache.attn_intermediates:
        inter.cached_kv = tuple(t[..., -4:, :].repeat(3, 1, 1, 1) for t in inter.cached_kv)
    step, cache = m(x[:, 2:7].repeat(3, 1), return_intermediates=True, cache=cache)
    ref = m(x[:, 2:7])[:, -1:]
    assert step.shape == (3, 1, 20) and (step - ref).abs().max() < 1e-5


def test_kv_cache_with_mask_and_left_padding():
    m = _lm(alibi_pos_bias=True)
    x = torch.randint(0, 20, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False
    full = m(x, mask=mask)
    _, cache = m(x[:, :5], mask=mask[:, :5], return_intermediates=True)
    outs = []
    for t in range(6, 9):
        step, cache = m(x[:, :t], mask=mask[:, :t], return_intermediates=True, cache=cache)
        outs.append(step)
    assert (torch.cat(outs, 1) - full[:, 5:]).abs().max() < 1e-5


def test_cache_errors():
    m = _lm(wrap_kw=dict(num_memory_tokens=2))
    _, cache = m(torch.randint(0, 20, (1, 4)), return_intermediates=True)
    with pytest.raises(ValueError, match="cache"):
        m(torch.randint(0, 20, (1, 5)), cache=cache)
    m = _lm()
    _, cache = m(torch.randint(0, 20, (1, 4)), return_intermediates=True)
    with pytest.raises(ValueError, match="x: with a cache of 4"):
        m(torch.randint(0, 20, (1, 4)), cache=cache)


# ---------------------------------------------------------------- dropped features, against their formulas
def _entmax15_bisect(z, iters=80):
    z = z / 2
    lo, hi = z.max(-1, keepdim=True).values - 1, z.max(-1, keepdim=True).values
    for _ in range(iters):
        tau = (lo + hi) / 2
        s = ((z - tau).clamp(min=0) ** 2).sum(-1, keepdim=True)
        lo, hi = torch.where(s > 1, tau, lo), torch.where(s > 1, hi, tau)
    return (z - (lo + hi) / 2).clamp(min=0) ** 2


def test_entmax15_against_bisection_and_gradcheck():
    torch.manual_seed(0)
    z = torch.randn(3, 5, 17, dtype=torch.float64) * 3
    p = entmax15(z)
    assert torch.allclose(p.sum(-1), torch.ones(3, 5, dtype=torch.float64), atol=1e-12)
    assert (p == 0).any()  # sparse
    assert torch.allclose(p, _entmax15_bisect(z), atol=1e-9)
    z2 = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(entmax15, (z2,))
    masked = torch.tensor([[1.0, 2.0, -torch.finfo(torch.float32).max]])
    assert entmax15(masked)[0, 2] == 0 and torch.isfinite(entmax15(masked)).all()


def _manual_attention(q, k, v, causal, scale):
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if causal:
        i, j = s.shape[-2:]
        s = s.masked_fill(torch.ones(i, j, dtype=torch.bool).triu(j - i + 1), float("-inf"))
    return s


def _split(t, h):
    b, n, _ = t.shape
    return t.view(b, n, h, -1).transpose(1, 2)


def test_old_talking_heads_formula():
    torch.manual_seed(0)
    a = _perturb(Attention(16, dim_head=8, heads=4, causal=True, talking_heads=True)).eval()
    assert a.full_matrix_reason == "talking heads"
    x = torch.randn(2, 6, 16)
    q, k, v = (_split(f(x), 4) for f in (a.to_q, a.to_k, a.to_v))
    s = _manual_attention(q, k, v, True, 8 ** -0.5)
    pre = a.attend.pre_softmax_talking_heads.weight[:, :, 0, 0]
    post = a.attend.post_softmax_talking_heads.weight[:, :, 0, 0]
    s = torch.einsum("bhij,gh->bgij", s.masked_fill(torch.isinf(s), -1e30), pre)  # the paper: mix logits (no residual)
    s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.einsum("bhij,gh->bgij", s.softmax(-1), post)
    out = a.to_out((p @ v).transpose(1, 2).reshape(2, 6, 32))
    assert (a(x) - out).abs().max() < 1e-5


def test_entmax15_attention_formula():
    torch.manual_seed(0)
    a = _perturb(Attention(16, dim_head=8, heads=2, causal=False, use_entmax15=True)).eval()
    x = torch.randn(2, 5, 16)
    q, k, v = (_split(f(x), 2) for f in (a.to_q, a.to_k, a.to_v))
    p = _entmax15_bisect(_manual_attention(q, k, v, False, 8 ** -0.5))
    out = a.to_out((p @ v).transpose(1, 2).reshape(2, 5, 16))
    assert (a(x) - out).abs().max() < 1e-5


def test_collab_heads_formula():
    torch.manual_seed(0)
    a = _perturb(Attention(16, dim_head=8, heads=4, causal=True, collab_heads=True, collab_compression=0.5)).eval()
    assert a.to_q.weight.shape == (16, 16) and a.collab_mixing.shape == (4, 16) and a.full_matrix_reason is None
    x = torch.randn(2, 6, 16)
    q, k = a.to_q(x), a.to_k(x)
    v = _split(a.to_v(x), 4)
    s = torch.einsum("bid,hd,bjd->bhij", q, a.collab_mixing, k) * 8 ** -0.5
    s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    out = a.to_out((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32))
    assert (a(x) - out).abs().max() < 1e-5


def test_position_infused_attention_formula():
    torch.manual_seed(0)
    layers = _perturb(xtk.Decoder(dim=16, depth=1, heads=2, attn_dim_head=8, position_infused_attn=True)).eval()
    wrapper = xtk.TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=layers)
    assert wrapper.pos_emb is None  # Shortformer: positions only inside attention
    a = layers.layers[0][1]
    x = torch.randn(2, 6, 16)
    norm = layers.layers[0][0][0]
    h = norm(x)
    e = FixedSinusoidalEmbedding(16)(6)
    q, k = _split(a.to_q(h + e), 2), _split(a.to_k(h + e), 2)
    v = _split(a.to_v(h), 2)  # values get no position
    p = _manual_attention(q, k, v, True, 8 ** -0.5).softmax(-1)
    y = x + a.to_out((p @ v).transpose(1, 2).reshape(2, 6, 16))
    y = y + layers.layers[1][1](layers.layers[1][0][0](y))
    assert (layers(x) - layers.final_norm(y)).abs().max() < 1e-5


def test_rezero():
    m = xtk.TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=xtk.Decoder(**BASE, use_rezero=True)).eval()
    blocks = [blk for _, blk, _ in m.attn_layers.layers]
    assert all(b.g.item() == 0 for b in blocks)  # ReZero: every branch starts as the identity
    assert all(n is None for norms, _, _ in m.attn_layers.layers for n in norms)
    x = torch.randint(0, 20, (2, 5))
    emb = m(x, return_embeddings=True)
    assert torch.allclose(emb, m.token_emb(x) + m.pos_emb(5))
    m(x).sum().backward()
    assert all(b.g.grad is not None and b.g.grad.abs().sum() > 0 for b in blocks)


def test_deepnorm_matches_post_norm_scaled_residual_in_x_transformers():
    import x_transformers as X
    depth = 3
    ref = X.Decoder(dim=16, depth=depth, heads=2, attn_dim_head=8, pre_norm=False, scale_residual=True,
                    scale_residual_constant=(2 * depth) ** 0.25).eval()
    _perturb(ref)
    mine = xtk.Decoder(dim=16, depth=depth, heads=2, attn_dim_head=8, deepnorm=True).eval()
    assert not mine.pre_norm and mine.layers[0][2].scale_residual_constant == (2 * depth) ** 0.25
    # DeepNet init: xavier normal, gain (8N)^-1/4 on values / output / feed-forward, 1 on q/k
    torch.manual_seed(0)
    big = xtk.Decoder(dim=256, depth=depth, heads=4, attn_dim_head=64, deepnorm=True)
    beta = (8 * depth) ** -0.25
    att = big.layers[0][1]
    assert abs(att.to_q.weight.std().item() - math.sqrt(2 / (256 + 256))) < 0.01
    assert abs(att.to_v.weight.std().item() - beta * math.sqrt(2 / (256 + 256))) < 0.01
    xtk.load_x_transformers_weights(mine, ref.state_dict())
    x = torch.randn(2, 6, 16)
    assert (ref(x) - mine(x)).abs().max() < 1e-4


def test_old_names_and_aliases():
    a = xtk.Encoder(dim=16, depth=1, heads=2, attn_dim_head=8, alibi_pos_emb=True, gate_values=True)
    assert a.rel_pos is not None and a.layers[0][1].to_v_gate is not None
    b = xtk.Decoder(dim=16, depth=1, heads=2, attn_dim_head=8, attn_qk_norm=True, qk_norm_dim_scale=True)
    assert b.layers[0][1].qk_norm_dim_scale


def test_full_matrix_introspection():
    layers = xtk.Decoder(**BASE, residual_attn=True, attn_use_entmax15=True)
    reasons = layers.full_matrix_layers()
    assert [i for i, _ in reasons] == [0, 2] and "entmax15" in reasons[0][1] and "residual attention" in reasons[0][1]
    assert xtk.Decoder(**BASE, rotary_pos_emb=True, attn_sparse_topk=2).full_matrix_layers() == []


def test_return_attn_and_training_modes():
    m = _lm(attn_dropout=0.1, ff_dropout=0.1, layer_dropout=0.1, wrap_kw=dict(emb_dropout=0.1))
    x = torch.randint(0, 20, (2, 7))
    m.train()
    m(x).sum().backward()
    m.eval()
    logits, attn = m(x, return_attn=True)
    assert len(attn) == 2 and attn[0].shape == (2, 4, 7, 7)
    assert torch.allclose(attn[0].sum(-1), torch.ones(2, 4, 7))
    assert torch.allclose(logits, m(x), atol=1e-5)


# ---------------------------------------------------------------- every seed AttentionLayers / wrapper kwarg runs
SEED_KWARGS = [
    dict(rel_pos_bias=True), dict(alibi_pos_bias=True, alibi_num_heads=2), dict(alibi_pos_emb=True), dict(dynamic_pos_bias=True, dynamic_pos_bias_log_distance=False),
    dict(rotary_pos_emb=True), dict(rotary_xpos=True), dict(position_infused_attn=True), dict(attn_sparse_topk=3),
    dict(attn_qk_norm=True, attn_qk_norm_groups=2, attn_qk_norm_scale=10), dict(attn_qk_norm=True, attn_qk_norm_dim_scale=True),
    dict(attn_num_mem_kv=2), dict(attn_one_kv_head=True), dict(attn_kv_heads=2), dict(attn_talking_heads=True), dict(attn_on_attn=True),
    dict(attn_gate_values=True), dict(gate_values=True), dict(attn_head_scale=True), dict(attn_dropout=0.1), dict(attn_use_entmax15=True),
    dict(attn_collab_heads=True, attn_collab_compression=0.3), dict(residual_attn=True), dict(ff_glu=True), dict(ff_swish=True),
    dict(ff_relu_squared=True), dict(ff_post_act_ln=True), dict(ff_no_bias=True), dict(ff_dropout=0.1), dict(ff_mult=2),
    dict(use_scalenorm=True), dict(use_rmsnorm=True), dict(use_rezero=True), dict(sandwich_norm=True), dict(pre_norm=False),
    dict(macaron=True), dict(gate_residual=True), dict(scale_residual=True), dict(shift_tokens=1), dict(shift_tokens=(1, 0)),
    dict(depth=3, sandwich_coef=1), dict(depth=3, par_ratio=2), dict(depth=None, custom_layers=("a", "f", "a", "f")),
    dict(layer_dropout=0.1), dict(deepnorm=True), dict(attn_dim_head=4), dict(attn_flash=True),
]


@pytest.mark.parametrize("kw", SEED_KWARGS, ids=lambda kw: ",".join(kw))
def test_seed_kwarg_runs(kw):
    kw = {k: v for k, v in {**BASE, **kw}.items() if v is not None}
    m = xtk.TransformerWrapper(num_tokens=20, max_seq_len=12, attn_layers=xtk.Decoder(**kw), post_emb_norm=True,
                               emb_dropout=0.1, l2norm_embed=True)
    x = torch.randint(0, 20, (2, 7))
    out = m(x)
    assert out.shape == (2, 7, 20) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_wrapper_kwargs_run():
    m = xtk.TransformerWrapper(num_tokens=20, max_seq_len=12, max_mem_len=4, shift_mem_down=1, num_memory_tokens=2,
                               tie_embedding=True, scaled_sinu_pos_emb=True, attn_layers=xtk.Decoder(**BASE, rel_pos_bias=True))
    x = torch.randint(0, 20, (2, 5))
    out, mems = m(x, return_mems=True)
    out2, mems2 = m(x, mems=mems, return_mems=True)
    assert out2.shape == (2, 5, 20) and [t.shape[1] for t in mems2] == [4, 4]
    prepend = torch.randn(2, 3, 16)
    assert m(x, prepend_embeds=prepend).shape == (2, 8, 20)
    enc = xtk.TransformerWrapper(num_tokens=20, max_seq_len=12, return_only_embed=True, attn_layers=xtk.Encoder(**BASE))
    assert enc(x).shape == (2, 5, 16)


# ---------------------------------------------------------------- errors name the argument, expected and got
def test_unknown_kwargs():
    with pytest.raises(TypeError, match="attn_bogus"):
        xtk.Decoder(**BASE, attn_bogus=1)
    with pytest.raises(TypeError, match="ff_bogus"):
        xtk.Decoder(**BASE, ff_bogus=1)
    with pytest.raises(TypeError, match="totally_unknown"):
        xtk.Encoder(**BASE, totally_unknown=True)
    with pytest.raises(TypeError, match="causal"):
        xtk.Decoder(**BASE, causal=False)
    with pytest.raises(TypeError):
        xtk.TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=xtk.Decoder(**BASE), bogus=1)


@pytest.mark.parametrize("kw,match", [
    (dict(attn_kv_heads=3), r"attn_kv_heads: expected a divisor of heads \(4\), got 3"),
    (dict(alibi_pos_bias=True, alibi_num_heads=5), r"alibi_num_heads: expected 1 <= alibi_num_heads <= heads \(4\), got 5"),
    (dict(attn_sparse_topk=0), "attn_sparse_topk: expected an int >= 1, got 0"),
    (dict(attn_qk_norm=True, attn_qk_norm_groups=3), r"attn_qk_norm_groups: expected a divisor of dim_head \(8\), got 3"),
    (dict(alibi_pos_bias=True, rel_pos_bias=True), "choose at most one"),
    (dict(rotary_pos_emb=True, rotary_emb_dim=10), r"rotary_emb_dim: expected <= attn_dim_head \(8\), got 10"),
    (dict(depth=0), "depth: expected a positive int, got 0"),
    (dict(heads=0), "heads: expected a positive int, got 0"),
    (dict(attn_dropout=1.5), r"attn_dropout: expected a float in \[0, 1\), got 1.5"),
    (dict(sandwich_norm=True, pre_norm=False), "sandwich_norm"),
])
def test_invalid_config(kw, match):
    with pytest.raises(ValueError, match=match):
        xtk.Decoder(**{**BASE, **kw})


def test_xpos_needs_causal():
    with pytest.raises(ValueError, match="rotary_xpos"):
        xtk.Encoder(**BASE, rotary_xpos=True)


def test_bad_inputs():
    m = xtk.TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=xtk.Decoder(**BASE))
    with pytest.raises(ValueError, match=r"x: token ids must be in \[0, 20\).*got values in \[0, 20\]"):
        m(torch.tensor([[0, 20]]))
    with pytest.raises(ValueError, match="x: token ids"):
        m(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="x: expected integer token ids, got dtype torch.float32"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="x: sequence length 9 exceeds max_seq_len 8"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x: expected a \(batch, seq\) tensor"):
        m(torch.zeros(3, dtype=torch.long))
    x = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 5\) \(x's\), got \(2, 4\)"):
        m(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask: expected a bool tensor.*got torch.float32"):
        m(x, mask=torch.ones(2, 5))
    rel = xtk.TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=xtk.Decoder(**BASE, rotary_pos_emb=True))
    assert rel(torch.zeros(1, 12, dtype=torch.long)).shape == (1, 12, 20)  # no absolute positions: any length


def test_bad_context():
    layers = xtk.CrossAttender(dim=16, depth=1, heads=2, attn_dim_head=8)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"context: expected last dim 16, got shape \(2, 3, 12\)"):
        layers(x, context=torch.randn(2, 3, 12))
    with pytest.raises(ValueError, match="context: expected a"):
        layers(x)
    with pytest.raises(ValueError, match=r"context_mask: expected shape \(2, 3\), got \(2, 4\)"):
        layers(x, context=torch.randn(2, 3, 16), context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="context_mask: expected a bool tensor"):
        layers(x, context=torch.randn(2, 3, 16), context_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="context: this stack has no cross attention"):
        xtk.Encoder(dim=16, depth=1, heads=2, attn_dim_head=8)(x, context=torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"x: expected a \(batch, seq, 16\) tensor, got \(2, 5, 8\)"):
        layers(torch.randn(2, 5, 8), context=torch.randn(2, 3, 16))


def test_rows_fully_masked_give_zeros_not_nan():
    m = _lm(layers_cls="Encoder")
    x = torch.randint(0, 20, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0] = True
    out = m(x, mask=mask)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_backward_cache(dtype):
    for kw in (dict(alibi_pos_bias=True, attn_kv_heads=2), dict(rel_pos_bias=True), dict(dynamic_pos_bias=True),
               dict(rotary_xpos=True, attn_qk_norm=True, attn_qk_norm_dim_scale=True, attn_num_mem_kv=2),
               dict(position_infused_attn=True, use_rmsnorm=True), dict(attn_talking_heads=True, residual_attn=True)):
        m = _lm(**kw).to(dtype)
        x = torch.randint(0, 20, (2, 7))
        out = m(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        out.float().square().mean().backward()
        _, cache = m(x[:, :5], return_intermediates=True)
        step, _ = m(x[:, :6], return_intermediates=True, cache=cache)
        assert (step[:, -1].float() - out[:, 5].float()).abs().max() < 0.1


def test_ops_routing_and_fused_residual(monkeypatch):
    """Every attention goes through xtk.attention with descriptors, every RMSNorm through
    xtk.rms_norm (residual adds fused), every activation through xtk.glu / activation."""
    import xtk.modules.attention as attn_mod
    import xtk.modules.feedforward as ff_mod
    import xtk.modules.norms as norm_mod
    calls = {"attention": [], "rms_norm": [], "glu": 0, "activation": 0}
    orig_attn, orig_rms, orig_glu, orig_act = attn_mod.xattention, norm_mod.rms_norm, ff_mod.glu_fn, ff_mod.act_fn

    def attention(*a, **kw):
        calls["attention"].append(kw)
        return orig_attn(*a, **kw)

    def rms_norm(x, w, residual=None, **kw):
        calls["rms_norm"].append(residual is not None)
        return orig_rms(x, w, residual=residual, **kw)

    def glu(*a, **kw):
        calls["glu"] += 1
        return orig_glu(*a, **kw)

    def activation(*a, **kw):
        calls["activation"] += 1
        return orig_act(*a, **kw)

    monkeypatch.setattr(attn_mod, "xattention", attention)
    monkeypatch.setattr(norm_mod, "rms_norm", rms_norm)
    monkeypatch.setattr(ff_mod, "glu_fn", glu)
    monkeypatch.setattr(ff_mod, "act_fn", activation)
    m = _lm(depth=3, use_rmsnorm=True, alibi_pos_bias=True, attn_kv_heads=2, rotary_pos_emb=True, attn_qk_norm=True,
            attn_sparse_topk=3, attn_num_mem_kv=2, ff_glu=True, macaron=True)
    m(torch.randint(0, 20, (2, 6)))
    assert len(calls["attention"]) == 3
    kw = calls["attention"][0]
    assert isinstance(kw["bias"], xtk.bias.Alibi) and isinstance(kw["rotary"], xtk.Rotary)
    assert isinstance(kw["qk_norm"], xtk.QKNorm) and kw["topk"] == 3 and kw["k_prefix"] == 2 and kw["enable_gqa"]
    assert kw["q_offset"] == 0 and kw.get("hooks") is None and kw["is_causal"]
    # 9 layers: each pre-norm after the first and the final norm take the previous residual add
    assert calls["rms_norm"] == [False] + [True] * 9
    assert calls["glu"] == 6 and calls["activation"] == 0


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"dim: expected a multiple of heads \(4\), got 30"):
        xtk.Decoder(dim=30, depth=1, heads=4)
    xtk.Decoder(dim=30, depth=1, heads=4, attn_dim_head=8)  # explicit head size: allowed, as in x-transformers
