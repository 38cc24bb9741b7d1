"""``xtk.integrations.hf.patch``: Hugging Face models whose bias lives outside the attention registry.

Tiny configs (nothing is downloaded), 6 heads where ALiBi is involved (not a power of two: the
slopes interleave two power-of-two lists there, a wrong order shows). Per family, fp32: logits and every parameter gradient of the
patched model against the same model unpatched ("eager") by the 2x rule against an fp64 oracle,
with and without left padding. The oracle is the unpatched model in fp64 run on each sequence with
its padding removed, which is what padding means for these models (BLOOM counts positions from the
first unpadded token; the others' biases depend on distances only); run on the padded batch,
BLOOM's and MPT's fp32 softmax turns fp64's masked minimum into -inf and a fully padded query row
into NaN. Encoder-decoders (encoder padding only) use the padded batch: no row is empty there.
Greedy ``generate()`` with transformers' own cache (dynamic and static) gives the same tokens;
parameters keep their ids; ``unpatch`` is bit-identical; what cannot run is refused by name.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from xtk.integrations import hf, hf_patch  # noqa: E402

from tolerance import assert_close_2x  # noqa: E402

V = 97
CAUSAL = {
    "bloom": lambda: transformers.BloomConfig(vocab_size=V, hidden_size=48, n_layer=2, n_head=6),
    "mpt": lambda: transformers.MptConfig(vocab_size=V, d_model=48, n_layers=2, n_heads=6, max_seq_len=32,
                                          attn_config={"alibi_bias_max": 4, "clip_qkv": 3.0}),
    "falcon_alibi": lambda: transformers.FalconConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2,
                                                      num_attention_heads=6, alibi=True, multi_query=False,
                                                      parallel_attn=False, bias=True),
    "falcon_rotary_gqa": lambda: transformers.FalconConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2,
                                                           num_attention_heads=6, num_kv_heads=2,
                                                           new_decoder_architecture=True),
    "falcon_rotary_mqa": lambda: transformers.FalconConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2,
                                                           num_attention_heads=6, multi_query=True),
}
T5S = dict(vocab_size=V, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=6, decoder_start_token_id=0,
           relative_attention_num_buckets=8, relative_attention_max_distance=12)
SEQ2SEQ = {
    "t5": lambda: transformers.T5Config(**T5S),
    "mt5": lambda: transformers.MT5Config(**T5S),
    "umt5": lambda: transformers.UMT5Config(**T5S),
    "longt5": lambda: transformers.LongT5Config(**T5S, local_radius=4),
}


def _eager(family):
    """The unpatched model; ``<family>_sdpa``: built with "sdpa" (the masks it gets are bool or None)."""
    torch.manual_seed(0)
    base = family.removesuffix("_sdpa")
    auto = transformers.AutoModelForSeq2SeqLM if base in SEQ2SEQ else transformers.AutoModelForCausalLM
    impl = "sdpa" if family.endswith("_sdpa") else "eager"
    return auto.from_config({**CAUSAL, **SEQ2SEQ}[base](), attn_implementation=impl).eval()


def _models(family):
    eager = _eager(family)
    ours = copy.deepcopy(eager)
    hf.patch(ours)
    return ours, eager, copy.deepcopy(eager).double()


def _batch(padded: bool, n=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    if padded:
        mask[1, :4] = 0  # left padding of the second sequence
    return ids, mask


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def _run(model, ids, mask, dec=None):
    """Logits with padded positions zeroed, and every parameter's gradient of their mean square."""
    model.zero_grad()
    kw = dict(decoder_input_ids=dec) if dec is not None else {}
    logits = model(input_ids=ids, attention_mask=mask, **kw).logits
    keep = mask.bool()[..., None] if dec is None else torch.ones_like(logits[..., :1], dtype=torch.bool)
    torch.where(keep, logits.double(), 0.0).square().mean().backward()
    return torch.where(keep, logits.detach(), 0.0), _grads(model)


def _run_unpadded(model, ids, mask):
    """``_run`` of a decoder-only model, one sequence at a time without its padding (the same loss)."""
    model.zero_grad()
    logits = torch.zeros(*ids.shape, V, dtype=torch.float64)
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        out = model(input_ids=ids[b:b + 1, keep]).logits[0]
        (out.double().square().sum() / logits.numel()).backward()
        logits[b, keep] = out.detach().double()
    return logits, _grads(model)


def _assert_runs_close(runs):
    assert_close_2x(*(r[0] for r in runs), "logits")
    for name in runs[0][1]:
        grads = [r[1][name] for r in runs]
        assert grads[0] is not None, f"grad of {name}: the patched model gave none"
        assert_close_2x(*grads, f"grad of {name}")


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", [*CAUSAL, "falcon_alibi_sdpa"])  # Falcon adds its ALiBi twice under eager
def test_decoder_only_patch_equals_eager(family, padded):
    ours, eager, oracle = _models(family)
    ids, mask = _batch(padded)
    _assert_runs_close([_run(ours, ids, mask), _run(eager, ids, mask), _run_unpadded(oracle, ids, mask)])


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", [*SEQ2SEQ, "t5_sdpa"])
def test_encoder_decoder_patch_equals_eager(family, padded):
    ours, eager, oracle = _models(family)
    ids, mask = _batch(padded, n=19)  # encoder longer than max_distance: the log buckets are used
    dec = torch.randint(2, V, (2, 7), generator=torch.Generator().manual_seed(2))
    runs = [_run(m, ids, mask, dec) for m in (ours, eager, oracle)]
    _assert_runs_close(runs)
    tables = [n for n in runs[0][1] if n.endswith("relative_attention_bias.weight")]
    assert tables and all(runs[0][1][n].abs().sum() > 0 for n in tables)  # the tables' gradients flow


def test_bloom_padding_with_holes_gets_its_own_alibi_dense(monkeypatch):
    """A key mask with a hole: BLOOM's positions skip it (no distance form), so its alibi tensor goes in dense."""
    seen = []
    real = hf_patch.Dense
    monkeypatch.setattr(hf_patch, "Dense", lambda t: seen.append(tuple(t.shape)) or real(t))
    ours, eager, oracle = _models("bloom")
    ids, mask = _batch(True)
    mask[0, 5] = 0
    _assert_runs_close([_run(ours, ids, mask), _run(eager, ids, mask), _run_unpadded(oracle, ids, mask)])
    assert seen and all(s == (2, 6, 1, 11) for s in seen)
    seen.clear()
    _run(ours, *_batch(True))
    assert not seen  # left padding alone: ALiBi in-kernel


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_alibi_with_later_keys_visible_is_the_models_own(family):
    """An attention module called with a mask that lets queries see later keys (not what the models
    build, but what the module accepts): the key-position ALiBi of BLOOM/MPT is no distance form
    there, so the patch passes the model's own bias tensor (dense) and equals the original."""
    model = _eager(family)
    torch.manual_seed(4)
    x = torch.randn(2, 9, 48)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    if family == "bloom":
        att = model.transformer.h[0].self_attention
        alibi = model.transformer.build_alibi_tensor(mask, 6, torch.float32)
        keep = mask.bool()[:, None, None, :].expand(2, 1, 9, 9)
        args = dict(hidden_states=x, residual=x, alibi=alibi, attention_mask=torch.where(keep, 0.0, -3e38))
    else:
        att = model.transformer.blocks[0].attn
        bias = model.transformer.build_mpt_alibi_tensor(6, 32)
        masked = ~mask.bool()[:, None, None, :].expand(2, 1, 9, 9)
        args = dict(hidden_states=x, position_bias=bias, attention_mask=masked)
    want = att(**args)[0]
    hf.patch(model)
    got = att(**args)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _big_init(model, scale):
    """Weights large enough that greedy decoding does not repeat one token (a test that can tell)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * r if (p.dim() == 1 and "weight" in n) else r * (scale if p.dim() > 1 else 0.1))
    return model


@pytest.mark.parametrize("family,cache", [
    *((f, "dynamic") for f in ["bloom", "mpt", "falcon_alibi", "falcon_rotary_gqa", "t5", "umt5", "longt5"]),
    # static: keys include the empty slots (masked), queries sit at the cache's length. MPT ignores it;
    # Falcon with ALiBi fails with it unpatched (transformers 5.24)
    *((f, "static") for f in ["bloom", "falcon_rotary_gqa", "t5", "umt5"])])
def test_greedy_generation_gives_the_same_tokens(family, cache):
    eager = _big_init(_eager(family), 2.0 if family in SEQ2SEQ else 1.0)
    eager.generation_config.pad_token_id = 0
    ours = copy.deepcopy(eager)
    hf.patch(ours)
    ids, mask = _batch(True)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    if family in SEQ2SEQ:
        kw["eos_token_id"] = None
    got, want = ours.generate(ids, **kw), eager.generate(ids, **kw)
    new = want[:, -8:] if family not in SEQ2SEQ else want[:, 1:]
    assert len(set(new.flatten().tolist())) > 3  # not one repeated token: the comparison can fail
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon_alibi", "t5", "umt5", "longt5"])
def test_in_place_same_parameters_and_unpatch_is_bit_identical(family):
    model = _eager(family)
    ids, mask = _batch(True)
    kw = dict(decoder_input_ids=ids[:, :5]) if family in SEQ2SEQ else {}
    loss = lambda m: m(input_ids=ids, attention_mask=mask, **kw).logits.square().mean()  # noqa: E731
    params = [(n, p) for n, p in model.named_parameters()]
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the patch
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, **kw).logits
    report = hf.patch(model)
    assert report.swapped and [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params]
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)  # a patched copy reads its own tables and unpatches on its own
    loss(clone).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for n, p in clone.named_parameters() if n.endswith("relative_attention_bias.weight"))
    hf.unpatch(clone)
    assert all("forward" not in m.__dict__ and hf_patch._output_attentions_hook not in m._forward_pre_hooks.values()
               for m in clone.modules())
    assert any("forward" in m.__dict__ for m in model.modules())
    model.train()
    loss(model).backward()
    old = [p.detach().clone() for _, p in params]
    opt.step()  # the optimizer reaches the patched model's parameters
    assert not torch.equal(old[0], params[0][1])
    model.eval()
    with torch.no_grad():
        for (_, p), o in zip(params, old):
            p.copy_(o)
    hf.unpatch(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, **kw).logits, before)


def test_dropout_runs_in_kernel_in_training():
    model = _eager("bloom")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    hf.patch(model)
    model.train()
    ids, mask = _batch(True)
    a = model(input_ids=ids, attention_mask=mask).logits
    b = model(input_ids=ids, attention_mask=mask).logits
    a.square().mean().backward()
    assert not torch.equal(a, b) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("family", ["bloom", "t5"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    model = _eager(family)
    for m in model.modules():  # no dropout: the two runs must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "relative_attention_num_buckets"):
            m.dropout = 0.0
    hf.patch(model)
    model.train()
    ids, mask = _batch(True)
    kw = dict(decoder_input_ids=ids[:, :5]) if family in SEQ2SEQ else {}
    plain = _run(model, ids, mask, kw.get("decoder_input_ids"))[1]
    model.gradient_checkpointing_enable()
    ckpt = _run(model, ids, mask, kw.get("decoder_input_ids"))[1]
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_encoder_only_t5():
    model = transformers.T5EncoderModel(transformers.T5Config(**T5S))
    report = hf.patch(model)
    assert [p for p, _ in report.swapped] == ["encoder.block.0.layer.0.SelfAttention",
                                              "encoder.block.1.layer.0.SelfAttention"]


def test_slopes_and_buckets_are_the_models_own():
    """ALiBi slopes: BLOOM's and MPT's (as its forward builds them: alibi_bias_max 8 whatever the config
    says; the patch reads them from the tensor the model passes) are SPEC's for every head count, MPT's
    interleaving of a non-power-of-2 count included, up to the last bit: the models take fp32 powers
    (BLOOM at 11 heads, MPT at 11-16 differ from the fp64 list in the last bits), which is why the patch uses the
    models' own tensors. T5's buckets: the patch checks them per model."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
    from xtk.bias import alibi_slopes
    for h in range(1, 17):
        bloom = _get_alibi_slopes(h, "cpu")
        spec = torch.tensor(alibi_slopes(h), dtype=torch.float32)
        torch.testing.assert_close(bloom, spec, rtol=4.8e-7, atol=0, msg=f"{h} heads")
        torch.testing.assert_close(-build_mpt_alibi_tensor(h, 32)[:, 0, -2], spec, rtol=4.8e-7, atol=0,
                                   msg=f"{h} heads")
    assert not torch.equal(-build_mpt_alibi_tensor(6, 32, alibi_bias_max=4)[:, 0, -2], _get_alibi_slopes(6, "cpu"))
    for nb, md in ((32, 128), (8, 12), (64, 256)):
        for causal in (False, True):
            cfg = transformers.T5Config(relative_attention_num_buckets=nb, relative_attention_max_distance=md,
                                        is_decoder=causal)
            att = transformers.models.t5.modeling_t5.T5Attention(cfg, has_relative_attention_bias=True)
            assert hf_patch._t5_buckets_match(att, causal) is None


def test_report_names_what_is_kept_and_why():
    model = _eager("longt5")
    report = hf.patch(model)
    assert {p for p, _ in report.kept} == {"encoder.block.0.layer.0.LocalSelfAttention",
                                           "encoder.block.1.layer.0.LocalSelfAttention"}
    assert all("not one xtk.attention call" in why for _, why in report.kept)
    assert "kept    encoder.block.0.layer.0.LocalSelfAttention" in str(report)
    tg = transformers.AutoModelForSeq2SeqLM.from_config(
        transformers.LongT5Config(**T5S, encoder_attention_type="transient-global"), attn_implementation="eager")
    assert all("transient-global" in why for _, why in hf.patch(tg).kept)


def test_refusals_name_what_is_refused(monkeypatch):
    llama = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(TypeError, match="LlamaForCausalLM has no attention module the patch knows"):
        hf.patch(llama)
    model = _eager("bloom")
    hf.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        hf.patch(model)
    ids, mask = _batch(False)
    with pytest.raises(ValueError, match="output_attentions: the xtk patch never forms"):
        model(input_ids=ids, output_attentions=True)
    t5 = _eager("t5")
    hf.patch(t5)
    with pytest.raises(ValueError, match="output_attentions"):
        t5(input_ids=ids, decoder_input_ids=ids, output_attentions=True)
    monkeypatch.setattr(hf_patch, "_installed_version", lambda: "5.30.0")
    with pytest.raises(RuntimeError, match=r"tested with transformers >=5.24,<5.25, got 5.30.0"):
        hf.patch(_eager("mpt"))
