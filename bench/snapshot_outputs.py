"""Bit-exact output snapshot of the seed models and of an attention sweep (CPU, fp32).

    python bench/snapshot_outputs.py save PATH      # run every case, torch.save one dict of tensors
    python bench/snapshot_outputs.py compare PATH   # rerun, print max |diff| per entry, exit 1 unless all equal

For behaviour-preserving refactors: save on the old tree, compare on the new one (same machine,
same torch, same ``xtk._C`` availability: the header line prints it, and the snapshot stores
it). Every case seeds torch itself, so cases are independent of their order. Equality is
``torch.equal`` with NaNs at the same places counted equal.
"""
from __future__ import annotations

import os
import random
import sys
from typing import Callable

import torch

CASES: dict[str, Callable[[], dict]] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def flatten(prefix, obj, out):
    """Every tensor in ``obj`` (tensors, tuples/lists/dicts of them, intermediates) under a dotted key."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().clone()
    elif isinstance(obj, (list, tuple)):
        for i, o in enumerate(obj):
            flatten(f"{prefix}.{i}", o, out)
    elif isinstance(obj, dict):
        for k, o in obj.items():
            flatten(f"{prefix}.{k}", o, out)
    elif obj is not None and hasattr(obj, "attn_intermediates"):  # LayerIntermediates: the cache
        for i, inter in enumerate(obj.attn_intermediates or []):
            flatten(f"{prefix}.kv{i}", inter.cached_kv, out)
        out[f"{prefix}.cache_length"] = torch.tensor(obj.cache_length)
    elif isinstance(obj, (int, float, bool)):
        out[prefix] = torch.tensor(obj)


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------ models

V = 29


def lm(seed=0, max_seq_len=16, wrapper_kw=None, **layer_kw):
    from xtk import Decoder, TransformerWrapper
    torch.manual_seed(seed)
    kw = dict(dim=16, depth=2, heads=4)
    kw.update(layer_kw)
    return TransformerWrapper(num_tokens=V, max_seq_len=max_seq_len, attn_layers=Decoder(**kw),
                              **(wrapper_kw or {})).eval()


def perturbed(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


DECODER_CONFIGS = {
    "plain": {}, "alibi": dict(alibi_pos_bias=True, alibi_num_heads=2), "t5": dict(rel_pos_bias=True),
    "dynamic": dict(dynamic_pos_bias=True, dynamic_pos_bias_log_distance=True),
    "rotary_xpos": dict(rotary_pos_emb=True, rotary_xpos=True), "rotary": dict(rotary_pos_emb=True),
    "qk_norm": dict(attn_qk_norm=True, attn_qk_norm_dim_scale=True), "mem_kv": dict(attn_num_mem_kv=2),
    "gqa": dict(attn_kv_heads=2, rotary_pos_emb=True), "residual_attn": dict(residual_attn=True, attn_talking_heads=True),
    "post_norm": dict(pre_norm=False, use_rmsnorm=True), "sandwich_macaron": dict(use_rmsnorm=True, sandwich_norm=True, macaron=True),
    "gate_scale": dict(gate_residual=True, scale_residual=True), "scale_const": dict(scale_residual_constant=0.5),
    "shift": dict(shift_tokens=1), "rezero": dict(use_rezero=True), "deepnorm": dict(deepnorm=True),
    "pia": dict(position_infused_attn=True), "scalenorm_glu": dict(use_scalenorm=True, ff_glu=True),
    "sandwich_coef": dict(sandwich_coef=1, depth=3), "par": dict(par_ratio=2, depth=3),
    "custom": dict(custom_layers=("a", "f", "a", "a", "f")), "topk_entmax": dict(attn_sparse_topk=3),
    "entmax": dict(attn_use_entmax15=True), "collab": dict(attn_collab_heads=True, attn_collab_compression=0.5),
    "old_names": dict(gate_values=True, qk_norm_dim_scale=True, attn_qk_norm=True, zero_init_branch_output=True),
    "rms_post_fused": dict(use_rmsnorm=True, pre_norm=False, gate_residual=True),
}


@case
def decoders():
    out = {}
    for name, kw in DECODER_CONFIGS.items():
        m = perturbed(lm(**kw))
        torch.manual_seed(2)
        x = torch.randint(0, V, (2, 11))
        mask = torch.ones(2, 11, dtype=torch.bool)
        mask[1, :3] = False
        out[name] = m(x)
        out[name + ".masked"] = m(x, mask=mask)
        if m.can_cache_kv:
            logits, cache = m(x[:, :6], return_intermediates=True)
            steps = [logits]
            for t in range(7, 12):
                step, cache = m(x[:, :t], return_intermediates=True, cache=cache)
                steps.append(step)
            out[name + ".cached"] = steps
            out[name + ".cache"] = cache
    return out


@case
def encoders():
    from xtk import Encoder, TransformerWrapper
    out = {}
    for name, kw in {"plain": {}, "t5": dict(rel_pos_bias=True), "alibi": dict(alibi_pos_bias=True),
                     "dynamic": dict(dynamic_pos_bias=True), "rotary": dict(rotary_pos_emb=True),
                     "qk_norm_memkv": dict(attn_qk_norm=True, attn_num_mem_kv=3), "shift": dict(shift_tokens=2),
                     "gqa": dict(attn_kv_heads=1)}.items():
        torch.manual_seed(0)
        m = perturbed(TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Encoder(dim=16, depth=2, heads=4, **kw),
                                         num_memory_tokens=2 if name == "plain" else None)).eval()
        torch.manual_seed(3)
        x = torch.randint(0, V, (3, 9))
        mask = torch.rand(3, 9) > 0.3
        mask[:, 0] = True
        out[name] = m(x, mask=mask)
        out[name + ".embed_attn"] = m(x, return_embeddings=True, return_attn=True)
    return out


@case
def wrapper_features():
    out = {}
    torch.manual_seed(4)
    x = torch.randint(0, V, (2, 8))
    m = perturbed(lm(wrapper_kw=dict(max_mem_len=6, shift_mem_down=1, post_emb_norm=True, tie_embedding=True),
                     rotary_pos_emb=True))
    logits, mems = m(x, return_mems=True)
    logits2, mems2 = m(x, mems=mems, return_mems=True)
    out["mems"] = (logits, mems, logits2, mems2)
    m = perturbed(lm(wrapper_kw=dict(emb_dim=8, scaled_sinu_pos_emb=True, l2norm_embed=True)))
    pre = torch.randn(2, 3, 8)
    out["prepend"] = m(x, prepend_embeds=pre, prepend_mask=torch.tensor([[True, False, True]] * 2))
    out["sum_embeds"] = m(x, sum_embeds=torch.randn(2, 8, 8), return_logits_and_embeddings=True)
    m = perturbed(lm(rotary_pos_emb=True))
    pre = torch.randn(2, 3, 16)
    logits, cache = m(x[:, :4], prepend_embeds=pre, return_intermediates=True)
    step, cache = m(x[:, :6], prepend_embeds=pre, return_intermediates=True, cache=cache)
    se = torch.randn(2, 7, 16)
    step2, cache = m(x[:, :7], prepend_embeds=pre, sum_embeds=se, return_intermediates=True, cache=cache)
    out["prepend_cache"] = (logits, step, step2, cache)
    m = perturbed(lm(wrapper_kw=dict(average_pool_embed=True, logits_dim=5), alibi_pos_bias=True))
    out["pool"] = m(x, mask=torch.tensor([[True] * 8, [False] * 2 + [True] * 6]))
    out["seq_start"] = perturbed(lm(rotary_pos_emb=True))(x, seq_start_pos=torch.tensor([0, 3]))
    return out


def _train_step(model, fn):
    model.train()
    torch.manual_seed(11)
    random.seed(11)   # layer_dropout draws from python's random
    loss = fn()
    loss.backward()
    return {"loss": loss, "grads": grads(model)}


@case
def losses_and_grads():
    from xtk import AutoregressiveWrapper, XTransformer
    out = {}
    torch.manual_seed(5)
    x = torch.randint(0, V, (2, 12))
    for name, kw in {"rotary_t5": dict(rel_pos_bias=True, attn_dropout=0.1, ff_dropout=0.1),
                     "alibi_gqa_layerdrop": dict(alibi_pos_bias=True, attn_kv_heads=2, layer_dropout=0.3, depth=4),
                     "post_norm_rms": dict(pre_norm=False, use_rmsnorm=True, attn_qk_norm=True)}.items():
        w = AutoregressiveWrapper(perturbed(lm(**kw)), mask_prob=0.2 if name == "rotary_t5" else 0.)
        out[name] = _train_step(w, lambda: w(x))
    torch.manual_seed(0)
    xt = perturbed(XTransformer(dim=16, enc_num_tokens=V, enc_depth=2, enc_heads=4, enc_max_seq_len=16,
                                dec_num_tokens=V, dec_depth=2, dec_heads=4, dec_max_seq_len=16,
                                cross_attn_tokens_dropout=0.3, dec_cross_attn_tokens_dropout=0.25,
                                enc_rel_pos_bias=True, dec_rotary_pos_emb=True))
    src = torch.randint(0, V, (3, 10))
    src_mask = torch.rand(3, 10) > 0.3
    src_mask[:, 0] = True
    out["xtransformer"] = _train_step(xt, lambda: xt(src, x[:, :9].repeat(2, 1)[:3], mask=src_mask))
    return out


@case
def cross_attention():
    from xtk import CrossAttender, XTransformer
    out = {}
    torch.manual_seed(0)
    xt = perturbed(XTransformer(dim=16, enc_num_tokens=V, enc_depth=1, enc_heads=4, enc_max_seq_len=16,
                                dec_num_tokens=V, dec_depth=2, dec_heads=4, dec_max_seq_len=16,
                                dec_cross_residual_attn=True, dec_alibi_pos_bias=True, return_tgt_loss=False)).eval()
    torch.manual_seed(6)
    src, tgt = torch.randint(0, V, (2, 7)), torch.randint(0, V, (2, 5))
    src_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out["logits"] = xt(src, tgt, mask=src_mask)
    out["generate"] = xt.generate(src, tgt[:, :2], 6, mask=src_mask, temperature=0.)
    out["generate_nocache"] = xt.generate(src, tgt[:, :2], 6, mask=src_mask, temperature=0., cache_kv=False)
    enc = xt._encode(src, src_mask, None)
    out["beam"] = xt.decoder.beam_search(tgt[:, :2], 5, beams=3, context=enc, context_mask=src_mask,
                                         return_beams_and_scores=True)
    torch.manual_seed(0)
    ca = perturbed(CrossAttender(dim=16, depth=2, heads=4)).eval()
    out["cross_attender"] = ca(torch.randn(2, 5, 16), context=torch.randn(2, 7, 16), context_mask=src_mask)
    return out


@case
def generation():
    from xtk import AutoregressiveWrapper
    out = {}
    torch.manual_seed(7)
    prompts = torch.randint(0, V, (2, 5))
    for name, kw in {"rotary": dict(rotary_pos_emb=True), "abs": {}, "alibi": dict(alibi_pos_bias=True),
                     "t5": dict(rel_pos_bias=True), "dynamic": dict(dynamic_pos_bias=True),
                     "xpos": dict(rotary_xpos=True), "shift": dict(shift_tokens=1)}.items():
        w = AutoregressiveWrapper(perturbed(lm(max_seq_len=10, **kw)))
        for cache_kv in (True, False):
            tag = f"{name}.cache{int(cache_kv)}"
            out[tag + ".greedy"] = w.generate(prompts, 9, temperature=0., cache_kv=cache_kv)  # past max_seq_len
            torch.manual_seed(8)
            out[tag + ".sample"] = w.generate(prompts, 6, temperature=0.9, cache_kv=cache_kv)
            torch.manual_seed(9)
            out[tag + ".top_p"] = w.generate(prompts, 4, filter_logits_fn="top_p", filter_thres=0.8, cache_kv=cache_kv)
            out[tag + ".beam"] = w.beam_search(prompts, 7, beams=3, return_beams_and_scores=True, cache_kv=cache_kv)
            torch.manual_seed(10)
            out[tag + ".beam_stochastic"] = w.beam_search(prompts, 4, beams=2, stochastic=True, cache_kv=cache_kv,
                                                          filter_logits_fn="top_k")
    w = AutoregressiveWrapper(perturbed(lm(max_seq_len=12, rotary_pos_emb=True)), pad_value=1)
    lst = [torch.randint(0, V, (n,)) for n in (3, 5)]
    out["list_prompts"] = w.generate(lst, 5, temperature=0.)
    out["prompt_lens"] = w.beam_search(prompts, 4, beams=2, prompt_lens=torch.tensor([3, 5]))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 1] = False
    out["mask"] = w.generate(prompts, 5, temperature=0., mask=mask)
    out["eos"] = w.generate(prompts, 8, temperature=0., eos_token=int(out["mask"][0, 1]))
    res, cache = w.generate(prompts, 4, temperature=0., return_intermediates=True)
    out["return_cache"] = (res, cache)
    torch.manual_seed(12)
    out["min_p"] = w.generate(prompts[0], 5, filter_logits_fn="min_p", temperature=1.2)
    out["top_a"] = w.generate(prompts, 5, filter_logits_fn="top_a")
    amateur = perturbed(lm(seed=3, depth=1, rotary_pos_emb=True, max_seq_len=12))
    for cache_kv in (True, False):
        out[f"contrastive{int(cache_kv)}"] = w.generate(prompts, 14, temperature=0., amateur_model=amateur,
                                                        cache_kv=cache_kv)
    return out


@case
def continuous():
    from xtk import ContinuousAutoregressiveWrapper, ContinuousTransformerWrapper, Decoder
    out = {}
    for name, (kw, lkw) in {"plain": (dict(dim_in=5, dim_out=5, max_seq_len=8), dict(rotary_pos_emb=True)),
                            "noabs": (dict(dim_in=5, dim_out=5, max_seq_len=8, use_abs_pos_emb=False),
                                      dict(rotary_pos_emb=True)),
                            "prob": (dict(dim_in=5, dim_out=5, max_seq_len=8, probabilistic=True), dict(alibi_pos_bias=True)),
                            "memtok": (dict(dim_in=5, dim_out=5, max_seq_len=8, num_memory_tokens=2, post_emb_norm=True,
                                            scaled_sinu_pos_emb=True), {})}.items():
        torch.manual_seed(0)
        net = perturbed(ContinuousTransformerWrapper(attn_layers=Decoder(dim=16, depth=2, heads=4, **lkw), **kw)).eval()
        torch.manual_seed(13)
        x = torch.randn(2, 6, 5)
        mask = torch.tensor([[True] * 6, [False, True, True, True, True, True]])
        out[name] = net(x, mask=mask)
        out[name + ".lens"] = net(x, lens=torch.tensor([6, 4]), return_intermediates=True)
        w = ContinuousAutoregressiveWrapper(net)
        for cache_kv in (True, False):
            torch.manual_seed(14)
            out[f"{name}.gen{int(cache_kv)}"] = w.generate(x[:, :3], 8, cache_kv=cache_kv)  # past max_seq_len
            torch.manual_seed(14)
            out[f"{name}.gen_mask{int(cache_kv)}"] = w.generate(x[:, :3], 7, cache_kv=cache_kv, mask=mask[:, :3])
        out[name + ".train"] = _train_step(w, lambda: w(x, mask=mask))
    torch.manual_seed(0)
    net = perturbed(ContinuousTransformerWrapper(attn_layers=Decoder(dim=16, depth=1, heads=2), dim_in=5, dim_out=5,
                                                 max_seq_len=8, max_mem_len=4, average_pool_embed=False)).eval()
    x = torch.randn(2, 6, 5)
    o, mems = net(x, return_mems=True)
    out["mems"] = (o, mems, net(x, mems=mems, return_mems=True))
    pre = torch.randn(2, 2, 16)
    logits, cache = net(x[:, :3], prepend_embeds=pre, return_intermediates=True)
    out["prepend_cache"] = (logits, net(x[:, :5], prepend_embeds=pre, return_intermediates=True, cache=cache))
    return out


@case
def vit():
    from xtk import Encoder, ViTransformerWrapper
    torch.manual_seed(0)
    m = perturbed(ViTransformerWrapper(image_size=8, patch_size=4, num_classes=3, num_register_tokens=2,
                                       post_emb_norm=True, attn_layers=Encoder(dim=16, depth=2, heads=4,
                                                                                alibi_pos_bias=True))).eval()
    torch.manual_seed(15)
    img = torch.randn(2, 3, 8, 8)
    out = {"logits_embed": m(img, return_logits_and_embeddings=True)}
    out["train"] = _train_step(m, lambda: m(img).square().mean())
    return out


@case
def extras():
    from xtk import (AutoregressiveWrapper, ContinuousAutoregressiveWrapper, ContinuousTransformerWrapper, Decoder,
                     XTransformer)
    out = {}
    torch.manual_seed(18)
    x = torch.randint(0, V, (2, 10))
    w = AutoregressiveWrapper(perturbed(lm(max_seq_len=8, rotary_pos_emb=True,
                                           wrapper_kw=dict(use_abs_pos_emb=False, emb_frac_gradient=0.5))))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 0] = False
    for cache_kv in (True, False):  # a mask past max_seq_len (sliding window)
        out[f"mask_window{int(cache_kv)}"] = w.generate(x[:, :5], 7, temperature=0., mask=mask, cache_kv=cache_kv)
    eos = int(w.generate(x[:, :5], 2, temperature=0.)[0, 1])
    out["eos_break"] = w.generate(x[:1, :5], 6, temperature=0., eos_token=eos)
    torch.manual_seed(19)
    out["filter_thres"] = w.generate(x[:, :5], 4, filter_thres=0.7)
    out["beam_1d"] = w.beam_search(x[0, :5], 4, beams=2, return_beams_and_scores=True)
    amateur = perturbed(lm(seed=3, depth=1, max_seq_len=8))
    for cache_kv in (True, False):
        out[f"contrastive_abs{int(cache_kv)}"] = w.generate(x[:, :5], 6, temperature=0., amateur_model=amateur,
                                                            cache_kv=cache_kv)
    out["loss_lens_prepend"] = _train_step(w, lambda: w(x[:, :7], lens=torch.tensor([7, 5]),
                                                        prepend_embeds=torch.randn(2, 1, 16), return_outputs=True)[0])
    w.eval()
    out["return_outputs"] = w(x[:, :7], return_outputs=True)
    net = w.net
    o, inter = net(x[:, :6], return_mems=True, return_intermediates=True)
    out["mems_inter"] = (o, inter.mems, inter)
    # the stack alone with a cache and the whole sequence (x-transformers' convention)
    layers = net.attn_layers
    h = torch.randn(2, 7, 16)
    full, cache = layers(h[:, :4], return_hiddens=True)
    step, cache = layers(h[:, :6], cache=cache, return_hiddens=True)
    out["layers_cache"] = (full, step, cache, layers(h[:, :7], cache=cache, cache_age=1))
    torch.manual_seed(0)
    xt = perturbed(XTransformer(dim=16, num_tokens=V, depth=1, heads=4, max_seq_len=16, tie_token_emb=True,
                                cross_attn_tokens_dropout=0.4, return_tgt_loss=True))
    src = torch.randint(0, V, (2, 9))
    src_mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    attn_mask = torch.rand(2, 1, 9, 9) > 0.2
    attn_mask[..., 0] = True
    out["xt_train"] = _train_step(xt, lambda: xt(src, x[:, :6], mask=src_mask, src_prepend_embeds=torch.randn(2, 2, 16),
                                                 tgt_mask=torch.ones(2, 6, dtype=torch.bool)))
    xt.eval()
    out["xt_attn_mask"] = xt(src, x[:, :6], src_mask=src_mask, attn_mask=attn_mask)
    torch.manual_seed(0)
    net = perturbed(ContinuousTransformerWrapper(attn_layers=Decoder(dim=16, depth=1, heads=2, residual_attn=True),
                                                 dim_in=5, dim_out=5, max_seq_len=8, average_pool_embed=True)).eval()
    v = torch.randn(2, 6, 5)
    out["cont_pool"] = (net(v, sum_embeds=torch.randn(2, 6, 16)), net(v, lens=torch.tensor([6, 2])),
                        net(v, return_attn=True))
    torch.manual_seed(0)
    net = perturbed(ContinuousTransformerWrapper(attn_layers=Decoder(dim=16, depth=1, heads=2), dim_in=5, dim_out=5,
                                                 max_seq_len=8)).eval()
    for name, cw in {"l1_eq": ContinuousAutoregressiveWrapper(net, use_l1_loss=True, equal_loss_weight_batch=True),
                     "lens": ContinuousAutoregressiveWrapper(net)}.items():
        kw = dict(lens=torch.tensor([6, 3])) if name == "lens" else dict(mask=torch.rand(2, 6) > 0.3)
        out[name] = _train_step(cw, lambda: cw(v, **kw))
    out["cont_nobatch"] = ContinuousAutoregressiveWrapper(net).generate(v[0, :3], 2)
    return out


# ------------------------------------------------------------------------------------ attention sweep

@case
def attention_sweep():
    import xtk
    from xtk.bias import Alibi, Dense, DistanceTable, T5
    from xtk.qk import QKNorm, Rotary, rotary_inv_freq, xpos_scale
    out = {}
    b, h, n, d = 2, 4, 9, 8
    for hk in (4, 2, 1):
        for nk in (9, 12):
            torch.manual_seed(16)
            q, k, v = torch.randn(b, h, n, d), torch.randn(b, hk, nk, d), torch.randn(b, hk, nk, d)
            keep = torch.rand(b, 1, n, nk) > 0.25
            biases = {"none": None, "alibi": Alibi(torch.tensor([0.5, 0.25, 0.125])),
                      "t5": T5(torch.randn(32, h), causal=False), "t5c": T5(torch.randn(16, h), num_buckets=16,
                                                                            max_distance=20, causal=True),
                      "table": DistanceTable(torch.randn(2 * 16 - 1, h)), "dense": Dense(torch.randn(1, h, n, nk))}
            for bname, bias in biases.items():
                for causal in (False, True):
                    for mname, mask in (("nomask", None), ("mask", keep)):
                        extra = dict(q_offset=nk - n) if causal and nk > n else {}
                        for backend in ("eager", "chunked"):
                            key = f"hk{hk}.nk{nk}.{bname}.c{int(causal)}.{mname}.{backend}"
                            try:
                                out[key] = xtk.attention(q, k, v, attn_mask=mask, is_causal=causal, bias=bias,
                                                         enable_gqa=hk != h, backend=backend, **extra)
                            except (RuntimeError, ValueError) as e:   # a backend that refuses: record that
                                out[key + ".refused"] = torch.tensor(len(type(e).__name__))
    torch.manual_seed(17)
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, 2, n + 2, d), torch.randn(b, 2, n + 2, d)
    feats = {"topk": dict(topk=3), "qk_norm": dict(qk_norm=QKNorm(groups=2, scale=8.0)),
             "rotary": dict(rotary=Rotary(d, rotary_inv_freq(d))),
             "xpos": dict(rotary=Rotary(d, rotary_inv_freq(d), xpos_scale=xpos_scale(d)), is_causal=True, q_offset=5),
             "prefix_alibi": dict(k_prefix=2, bias=Alibi(torch.tensor([0.5, 0.25, 0.1, 0.05])), q_offset=0)}
    for fname, kw in feats.items():
        for backend in ("eager", "chunked"):
            try:
                out[f"feat.{fname}.{backend}"] = xtk.attention(q, k, v, enable_gqa=True, backend=backend, **kw)
            except (RuntimeError, ValueError) as e:
                out[f"feat.{fname}.{backend}.refused"] = torch.tensor(len(type(e).__name__))
    return out


@case
def attention_grads():
    """Gradients of q, k, v, the bias descriptor's tensor and a float attn_mask, eager and chunked: every
    bias kind (ALiBi with fewer slopes than heads included) x no / bool / float mask x causal x GQA."""
    import xtk
    from xtk.bias import Alibi, Dense, DistanceTable, T5
    out = {}
    b, h, n, d = 2, 4, 9, 8
    kinds = {"alibi": (Alibi, lambda: torch.tensor([0.5, 0.25, 0.125, 0.0625])),
             "alibi3": (Alibi, lambda: torch.tensor([0.5, 0.25, 0.125])),
             "t5": (T5, lambda: torch.randn(32, h)), "t5c": (lambda t: T5(t, 16, 20, True), lambda: torch.randn(16, h)),
             "table": (DistanceTable, lambda: torch.randn(31, h)), "dense": (Dense, lambda: torch.randn(1, h, n, 12))}
    for hk in (4, 2):
        for bname, (make, init) in kinds.items():
            for causal in (False, True):
                for mname in ("nomask", "mask", "fmask"):
                    for backend in ("eager", "chunked"):
                        torch.manual_seed(16)
                        q, k, v = (torch.randn(b, heads, m, d, requires_grad=True)
                                   for heads, m in ((h, n), (hk, 12), (hk, 12)))
                        masks = {"nomask": None, "mask": torch.rand(b, 1, n, 12) > 0.25,
                                 "fmask": torch.randn(b, 1, n, 12, requires_grad=True)}
                        t = init().requires_grad_()
                        mask = masks[mname]
                        o = xtk.attention(q, k, v, attn_mask=mask, is_causal=causal, bias=make(t),
                                          enable_gqa=hk != h, backend=backend, q_offset=3 if causal else 0)
                        wrt = [q, k, v, t] + ([mask] if mname == "fmask" else [])
                        grads = torch.autograd.grad((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum(), wrt)
                        out[f"hk{hk}.{bname}.c{int(causal)}.{mname}.{backend}"] = [o.detach(), *grads]
    return out


# ------------------------------------------------------------------------------------ driver

def run_all() -> dict:
    torch.set_num_threads(1)   # reductions in one fixed order
    out = {}
    for name, fn in CASES.items():
        random.seed(0)
        flatten(name, fn(), out)
    return out


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.nan_to_num(a, 0.), torch.nan_to_num(b, 0.))
    return torch.equal(a, b)


def _maxdiff(a, b) -> str:
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    if not a.numel():
        return "0"
    return f"{(a.double() - b.double()).abs().nan_to_num(float('inf')).max().item():.3e}"


def main(argv):
    if len(argv) != 2 or argv[0] not in ("save", "compare"):
        print(__doc__)
        return 2
    import xtk
    from xtk import _ext
    try:
        _ext.load()
        ext = "loaded"
    except ImportError:
        ext = "missing"
    print(f"xtk from {os.path.dirname(xtk.__file__)}; xtk._C {ext}; torch {torch.__version__}; "
          f"XTK_BACKEND={os.environ.get('XTK_BACKEND', '')!r}")
    out = run_all()
    out["__meta__.ext_loaded"] = torch.tensor(ext == "loaded")
    if argv[0] == "save":
        torch.save(out, argv[1])
        print(f"saved {len(out)} tensors to {argv[1]}")
        return 0
    base = torch.load(argv[1])
    bad = 0
    for key in sorted(set(base) | set(out)):
        if key not in base or key not in out:
            print(f"{key}: only in {'new' if key not in base else 'baseline'}")
            bad += 1
            continue
        same = _equal(base[key], out[key])
        if not same:
            bad += 1
        if not same or os.environ.get("SNAPSHOT_VERBOSE"):
            print(f"{key}: max|diff| {_maxdiff(base[key], out[key])}{'' if same else '  DIFFERS'}")
    print(f"{len(out)} entries compared, {bad} differ" + ("" if bad else ": all exactly equal"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
