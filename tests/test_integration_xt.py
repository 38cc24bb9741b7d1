"""``xtk.patch`` / ``xtk.unpatch`` on x-transformers objects, in place (issue 15, item 1).

For every loader-parity config (``test_loader.CASES``): the x-transformers model (fp32, eval) is run
unpatched, patched and as an fp64 copy (the oracle); the patched outputs and every parameter
gradient must be within the 2x rule (SPEC §4: error against the oracle at most twice the unpatched
fp32 model's, plus the fp32 floor). The same Parameter objects stay in the model, an optimizer built
before the patch moves them, the report names what was swapped and kept, and ``xtk.unpatch`` gives
outputs bit-identical to before the patch."""
import copy
import os

import pytest
import torch

X = pytest.importorskip("x_transformers")

import xtk  # noqa: E402
from model_helpers import perturb  # noqa: E402
import test_loader  # noqa: E402
from test_loader import BASE, CASES  # noqa: E402  (the loader-parity configs, reused as they are)
from tolerance import FLOOR, judge_2x  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# configs whose attention xtk cannot run exactly: patch keeps it, and says why
KEPT_ATTENTION = {"residual_attn": "residual attention", "talking_heads_pre_post": "talking heads",
                  "gqa_talking_residual_alibi": "talking heads"}


def _build(name, seed=0):
    case = dict(CASES[name])
    layers_cls = case.pop("layers_cls", "Decoder")
    wrap_kw = dict(num_tokens=23, max_seq_len=16, **case.pop("wrap_kw", {}))
    layer_kw = {k: v for k, v in {**BASE, **case}.items() if v is not None}
    torch.manual_seed(seed)
    model = X.TransformerWrapper(attn_layers=getattr(X, layers_cls)(**layer_kw), **wrap_kw).eval()
    return perturb(model, seed)


def _oracle(name):
    """The same model in fp64 (built again: a deepcopy would keep x-transformers' tied-embedding
    closure pointing at the fp32 weight). x-transformers' dynamic position bias feeds its MLP an
    fp32 ``arange`` (fp64 models fail there): the oracle casts that input to the MLP's dtype (small
    integers, or their fp32 log, the same numbers the fp32 models see)."""
    ref = _build(name).double()
    for m in ref.modules():
        if isinstance(m, X.x_transformers.DynamicPositionBias):
            first = m.mlp[0][0]
            first.register_forward_pre_hook(lambda mod, args: tuple(t.to(mod.weight.dtype) for t in args))
    return ref


def _run(model, x, kw):
    """-> (output, {name: gradient}) of the loss test_loader uses."""
    model.zero_grad(set_to_none=True)
    out = model(x, **kw)
    (out.square().mean() + out[:, :3].mean()).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_2x(patched, unpatched, oracle, what):
    (po, pg), (uo, ug), (oo, og) = patched, unpatched, oracle
    verdict = judge_2x(po, uo, oo, f"{what} output")
    assert verdict["ok"], verdict["why"]
    for n, g in og.items():
        if ug[n] is None and pg[n] is None and g is None:
            continue
        assert (pg[n] is None) == (ug[n] is None), f"{what}: gradient of {n} is {pg[n]} patched, {ug[n]} unpatched"
        verdict = judge_2x(pg[n], ug[n], g, f"{what} d{n}")
        assert verdict["ok"], verdict["why"]


def _attention_paths(model):
    return {p for p, m in model.named_modules() if isinstance(m, X.x_transformers.Attention)}


def _norm_and_glu_paths(model):
    xt = X.x_transformers
    return {p for p, m in model.named_modules() if type(m) in (xt.RMSNorm, xt.ScaleNorm, xt.SimpleRMSNorm, xt.GLU)}


@pytest.mark.parametrize("name", list(CASES))
def test_patch_in_place_matches_unpatched(name):
    model = _build(name)
    oracle = _oracle(name)
    x = torch.randint(0, 23, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, -3:] = False
    calls = [({}, "no mask"), ({"mask": mask}, "mask")]
    unpatched = [_run(model, x, kw) for kw, _ in calls]
    reference = [_run(oracle, x, kw) for kw, _ in calls]
    params = list(model.parameters())
    ids = [id(p) for p in params]
    opt = torch.optim.SGD(params, lr=0.1)   # built before the patch

    report = xtk.patch(model)
    swapped = {p for p, _ in report.swapped}
    kept = dict(report.kept)
    attn = _attention_paths(model)
    if name in KEPT_ATTENTION:
        assert attn <= set(kept) and all(KEPT_ATTENTION[name] in kept[p] for p in attn), str(report)
    else:
        assert attn <= swapped, str(report)
    assert _norm_and_glu_paths(model) <= swapped, str(report)
    assert [id(p) for p in model.parameters()] == ids

    for (kw, what), u, o in zip(calls, unpatched, reference):
        _assert_2x(_run(model, x, kw), u, o, f"{name} ({what})")

    xtk.unpatch(model)
    for (kw, _), (u_out, _) in zip(calls, unpatched):
        assert torch.equal(model(x, **kw).detach(), u_out), f"{name}: unpatched output is not bit-identical"

    xtk.patch(model)   # again after unpatch; then train one step on the patched model
    _run(model, x, {})
    before = [p.detach().clone() for p in params]
    opt.step()
    assert [id(p) for p in model.parameters()] == ids
    for n, b, p in zip([n for n, _ in model.named_parameters()], before, params):
        moved = not torch.equal(b, p.detach())
        if p.grad is None:
            assert not moved, n
        elif (0.1 * p.grad).abs().max() > 1e-6 * (1 + b.abs().max()):   # a step larger than fp32 rounding
            assert moved, f"{name}: {n} did not move"
    xtk.unpatch(model)


def test_report_lists_swaps_and_keeps_with_reasons():
    model = _build("gqa_talking_residual_alibi")
    report = xtk.patch(model)
    why = dict(report.kept)
    for path in _attention_paths(model):
        assert "talking heads" in why[path] and "residual attention" in why[path]
    assert all("LayerNorm: xtk has no op" in why[p] for p in ("attn_layers.final_norm", "attn_layers.layers.0.0.0"))
    text = str(report)
    assert text.startswith("xtk patch of TransformerWrapper:") and "kept    attn_layers.layers.0.1: attention:" in text
    xtk.unpatch(model)

    report = xtk.patch(_build("rmsnorm"))
    assert ("attn_layers.final_norm", "RMSNorm: xtk.rms_norm") in report.swapped
    report = xtk.patch(_build("ff_swish_glu"))
    assert ("attn_layers.layers.1.1.ff.0", "GLU: xtk.glu (silu)") in report.swapped
    report = xtk.patch(_build("t5_topk_mem_kv"))
    assert dict(report.swapped)["attn_layers.layers.0.1"] == \
        "attention: xtk.attention (T5 relative position in-kernel (the module's own tensors), causal, 2 memory key/values, top-4)"


def test_patch_logs_the_report(caplog):
    with caplog.at_level("INFO", logger="xtk.patch"):
        xtk.patch(_build("residual_attn"))
    assert any("modules swapped" in r.getMessage() for r in caplog.records)
    assert any(r.levelname == "WARNING" and "residual attention" in r.getMessage() for r in caplog.records)


def test_unsupported_models_raise_naming_the_class():
    with pytest.raises(TypeError, match="Linear"):
        xtk.patch(torch.nn.Linear(4, 4))
    mine = xtk.TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=xtk.Decoder(dim=16, depth=1, heads=2))
    with pytest.raises(TypeError, match="TransformerWrapper is not an x-transformers model"):
        xtk.patch(mine)
    with pytest.raises(TypeError, match="list"):
        xtk.patch([1])
    with pytest.raises(ValueError, match="backend"):
        xtk.patch(_build("basic"), backend="cuda")


def test_backend_is_forced_where_the_op_has_it():
    """'chunked' (attention only) forces attention; RMSNorm and GLU, which have no such backend, pick auto."""
    torch.manual_seed(0)
    model = perturb(X.TransformerWrapper(num_tokens=23, max_seq_len=16, attn_layers=X.Decoder(
        **BASE, use_rmsnorm=True, ff_glu=True)).eval())
    x = torch.randint(0, 23, (2, 10))
    want = model(x).detach()
    xtk.patch(model, backend="chunked")
    assert (model(x).detach() - want).abs().max() < 1e-5
    xtk.unpatch(model)


def test_patch_twice_raises_and_unpatch_needs_a_patch():
    model = _build("alibi")
    xtk.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        xtk.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        xtk.patch(model.attn_layers)   # a part of a patched model too
    xtk.unpatch(model)
    with pytest.raises(ValueError, match="nothing in this TransformerWrapper is patched"):
        xtk.unpatch(model)


def _close_and_restored(model, run):
    """Patched ``run(model)`` within 1e-5 of unpatched (these tests check the wiring; the 2x rule is
    checked above), and bit-identical after unpatch."""
    before = run(model)
    report = xtk.patch(model)
    assert report.swapped and not [k for k in report.kept if k[1].startswith("attention")], str(report)
    assert (run(model) - before).abs().max() < 1e-5
    xtk.unpatch(model)
    assert torch.equal(run(model), before)
    return report


def test_wrappers_xtransformer_vit_and_bare_layers():
    torch.manual_seed(0)
    xt = perturb(X.XTransformer(dim=16, enc_num_tokens=20, enc_depth=1, enc_heads=2, enc_max_seq_len=12,
                                dec_num_tokens=20, dec_depth=1, dec_heads=2, dec_max_seq_len=12,
                                enc_alibi_pos_bias=True, dec_rel_pos_bias=True).eval())
    src, tgt = torch.randint(0, 20, (2, 9)), torch.randint(0, 20, (2, 7))
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    src_mask[1, 6:] = False
    report = _close_and_restored(xt, lambda m: m(src, tgt, mask=src_mask).detach())
    assert any(p.endswith("layers.1.1") and "cross-attention" in w for p, w in report.swapped)   # cross attention swapped too

    vit = perturb(X.ViTransformerWrapper(image_size=16, patch_size=4, num_classes=5,
                                         attn_layers=X.Encoder(dim=16, depth=2, heads=2, use_rmsnorm=True)).eval())
    img = torch.randn(2, 3, 16, 16)
    _close_and_restored(vit, lambda m: m(img).detach())

    enc = perturb(X.Encoder(dim=16, depth=2, heads=4, attn_kv_heads=2, dynamic_pos_bias=True).eval())
    h = torch.randn(2, 7, 16)
    _close_and_restored(enc, lambda m: m(h).detach())

    ar = X.AutoregressiveWrapper(_build("rotary_xpos"))
    seq = torch.randint(0, 23, (2, 12))
    _close_and_restored(ar, lambda m: m(seq).detach())

    torch.manual_seed(0)
    cont = X.ContinuousAutoregressiveWrapper(perturb(X.ContinuousTransformerWrapper(
        dim_in=5, dim_out=5, max_seq_len=16, attn_layers=X.Decoder(dim=16, depth=1, heads=2, rel_pos_bias=True)).eval()))
    series = torch.randn(2, 9, 5)
    _close_and_restored(cont, lambda m: m(series).detach())


def _greedy_patched_equals_unpatched(ar):
    """Greedy KV-cache generation of the x-transformers wrapper ``ar``: patched gives the tokens unpatched gives."""
    prompt = torch.randint(0, 23, (2, 4))
    greedy = dict(seq_len=8, filter_logits_fn="top_k", filter_kwargs=dict(k=1), cache_kv=True)
    want = ar.generate(prompt, **greedy)
    xtk.patch(ar)
    assert torch.equal(ar.generate(prompt, **greedy), want)
    xtk.unpatch(ar)


def test_kv_cache_generation_and_transformer_xl_memories():
    ar = X.AutoregressiveWrapper(_build("gqa_t5_mem_kv"))
    _greedy_patched_equals_unpatched(ar)

    torch.manual_seed(1)
    xl = perturb(X.TransformerWrapper(num_tokens=20, max_seq_len=8, max_mem_len=6, attn_layers=X.Decoder(
        dim=16, depth=2, heads=4, attn_dim_head=8, dynamic_pos_bias=True, attn_num_mem_kv=2)).eval())
    _close_and_restored(xl, _segments_runner(torch.randint(0, 20, (3, 2, 5))))


def test_per_call_features_run_the_original_path():
    """A call that passes something xtk does not run (here ``attn_delta``) takes x-transformers' path
    for that call: same numbers as unpatched."""
    model = _build("alibi")
    attn = model.attn_layers.layers[0][1]
    h = torch.randn(2, 6, 16)
    delta = torch.rand(2, 4, 6, 6) * 0.01
    want = attn(h, attn_delta=delta, rel_pos=model.attn_layers.rel_pos)
    xtk.patch(model)
    assert torch.equal(attn(h, attn_delta=delta, rel_pos=model.attn_layers.rel_pos), want)
    xtk.unpatch(model)


def test_rotary_in_kernel_at_standard_positions_else_by_x_transformers():
    """Rotary/xpos runs in-kernel when x-transformers derives the positions itself; a call with custom
    ``pos`` keeps x-transformers' rotation of q/k (the kernel's positions would be another function)."""
    model = _build("rotary_xpos")
    report = xtk.patch(model)
    assert "rotary/xpos in-kernel" in dict(report.swapped)["attn_layers.layers.0.1"]
    xtk.unpatch(model)
    x = torch.randint(0, 23, (2, 10))
    pos = torch.arange(10) * 2 + 1
    want, want_std = model(x, pos=pos).detach(), model(x).detach()
    assert (want - want_std).abs().max() > 1e-2   # the custom positions matter
    xtk.patch(model)
    assert (model(x, pos=pos).detach() - want).abs().max() < 1e-5
    assert (model(x).detach() - want_std).abs().max() < 1e-5
    xtk.unpatch(model)


@pytest.mark.parametrize("case", [dict(rotary_xpos=True, rotary_xpos_scale_base=64, attn_kv_heads=2),
                                  dict(rotary_pos_emb=True, attn_qk_norm=True, attn_num_mem_kv=2)])
def test_rotary_kv_cache_generation(case):
    torch.manual_seed(0)
    ar = X.AutoregressiveWrapper(perturb(X.TransformerWrapper(num_tokens=23, max_seq_len=16, attn_layers=X.Decoder(
        **{**BASE, **case})).eval()))
    _greedy_patched_equals_unpatched(ar)


def _loader_params(test):
    """The parameter list of a parametrized loader-parity test (its configs, reused)."""
    return next(m for m in test.pytestmark if m.name == "parametrize").args[1]


def _segments_runner(segs):
    """A run over Transformer-XL segments ``segs`` ``(k, b, n)``: the outputs, memories carried."""
    def run(m):
        mems, outs = None, []
        for seg in segs:
            out, mems = m(seg, mems=mems, return_mems=True)
            outs.append(out.detach())
        return torch.cat(outs, 1)
    return run


@pytest.mark.parametrize("shift_mem_down,pos_kw", _loader_params(test_loader.test_transformer_xl_mems_parity))
def test_transformer_xl_memories(shift_mem_down, pos_kw):
    torch.manual_seed(1)
    xl = perturb(X.TransformerWrapper(num_tokens=20, max_seq_len=8, max_mem_len=6, shift_mem_down=shift_mem_down,
                                      attn_layers=X.Decoder(dim=16, depth=2, heads=4, attn_dim_head=8, **pos_kw)).eval())
    _close_and_restored(xl, _segments_runner(torch.randint(0, 20, (3, 2, 5))))


def test_masks_left_padding_and_glu_mult_bias():
    """``attn_mask`` (2- and 4-D), ``seq_start_pos`` (left padding: equal outside the padded query
    positions, where xtk gives zeros and x-transformers an average, SPEC §2.8), GLU ``mult_bias``."""
    torch.manual_seed(0)
    model = perturb(X.TransformerWrapper(num_tokens=23, max_seq_len=16, attn_layers=X.Decoder(
        **BASE, alibi_pos_bias=True, attn_kv_heads=2, ff_glu=True, ff_glu_mult_bias=True)).eval())
    x = torch.randint(0, 23, (2, 10))
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(10, 10, generator=g) > 0.3) | torch.eye(10, dtype=torch.bool),
             (torch.rand(2, 4, 10, 10, generator=g) > 0.3) | torch.eye(10, dtype=torch.bool)]
    ssp = torch.tensor([0, 3])
    want = [model(x, attn_mask=m).detach() for m in masks] + [model(x, seq_start_pos=ssp).detach()]
    report = xtk.patch(model)
    assert ("attn_layers.layers.1.1.ff.0", "GLU: xtk.glu (gelu)") in report.swapped
    got = [model(x, attn_mask=m).detach() for m in masks] + [model(x, seq_start_pos=ssp).detach()]
    for w, o in zip(want[:2], got[:2]):
        assert (w - o).abs().max() < 1e-5
    assert (want[2][0] - got[2][0]).abs().max() < 1e-5 and (want[2][1, 3:] - got[2][1, 3:]).abs().max() < 1e-5
    xtk.unpatch(model)


def test_state_dict_deepcopy_and_bare_attention():
    model = _build("t5_topk_mem_kv")
    keys = list(model.state_dict())
    x = torch.randint(0, 23, (2, 10))
    want = model(x).detach()
    xtk.patch(model)
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)   # the copy is patched on its own objects
    with torch.no_grad():
        model.attn_layers.rel_pos.relative_attention_bias.weight.add_(1.0)
    assert (twin(x).detach() - want).abs().max() < 1e-5
    xtk.unpatch(twin)
    assert torch.equal(twin(x), want)

    attn = X.x_transformers.Attention(dim=16, heads=4, dim_head=8, causal=True, kv_heads=2).eval()
    h = torch.randn(2, 6, 16)
    alibi = X.x_transformers.AlibiPositionalBias(heads=4)
    before = attn(h, rel_pos=alibi).detach()
    report = xtk.patch(attn)
    assert [p for p, _ in report.swapped] == [""]
    assert (attn(h, rel_pos=alibi).detach() - before).abs().max() < 1e-5
    xtk.unpatch(attn)
    assert torch.equal(attn(h, rel_pos=alibi), before)


@pytest.mark.parametrize("kw,why", [
    (dict(attn_softclamp_logits=True), "logit soft-clamping"),
    (dict(attn_head_learned_sink=True), "learned attention sink"),
    (dict(attn_add_zero_kv=True), "zero key/value"),
    (dict(attn_l2_distance=True), "l2-distance"),
    (dict(attn_sigmoid=True), "attention function sigmoid"),
    (dict(attn_cog_signed=True), "signed (cog)"),
    (dict(attn_use_cope=True), "CoPE"),
    (dict(attn_selective=True), "selective"),
    (dict(attn_sparse_topk=3, attn_sparse_topk_straight_through=True), "attention function sparse_topk_attn"),
    (dict(attn_data_dependent_alibi=True), "data-dependent ALiBi"),
    (dict(attn_pre_scale_post_talking_heads=True), "talking heads"),
    (dict(alibi_pos_bias=True, rotary_pos_emb=True), "ALiBi with rotary"),
])
def test_unsupported_attention_is_kept_and_reported(kw, why):
    """Kept attention runs x-transformers' own code: with LayerNorm (kept too) the patched model is
    bit-identical to the unpatched one."""
    torch.manual_seed(0)
    model = perturb(X.TransformerWrapper(num_tokens=23, max_seq_len=16, attn_layers=X.Decoder(**BASE, **kw)).eval())
    x = torch.randint(0, 23, (2, 10))
    want = model(x)
    report = xtk.patch(model)
    kept = dict(report.kept)
    assert all(why in kept[p] for p in _attention_paths(model)), str(report)
    assert torch.equal(model(x), want)
    xtk.unpatch(model)


def test_glu_without_an_xtk_activation_is_kept():
    torch.manual_seed(0)
    model = perturb(X.TransformerWrapper(num_tokens=23, max_seq_len=16, attn_layers=X.Decoder(
        **BASE, ff_glu=True, ff_custom_activation=torch.nn.Tanh())).eval())
    report = xtk.patch(model)
    assert "GLU gate activation Tanh" in dict(report.kept)["attn_layers.layers.1.1.ff.0"]


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it unless overridden)")
@pytest.mark.parametrize("name", ["alibi_gqa_3_heads", "gqa_t5_topk_mem_kv", "rotary_xpos", "dynamic_pos_bias_log_norm"])
def test_patch_with_the_triton_kernels(name):
    """``backend="triton"``: the Triton kernels (the interpreter on CPU) run the in-kernel ALiBi,
    T5 / distance tables, top-k, memory key/values, GQA order and rotary/xpos of a patched model,
    outputs and every gradient by the 2x rule (norms and GLU: auto, they have no Triton backend)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, oracle = _build(name).to(dev), _oracle(name).to(dev)
    x = torch.randint(0, 23, (2, 10), device=dev)
    mask = torch.ones(2, 10, dtype=torch.bool, device=dev)
    mask[0, -3:] = False
    unpatched, reference = _run(model, x, {"mask": mask}), _run(oracle, x, {"mask": mask})
    xtk.patch(model, backend="triton")
    _assert_2x(_run(model, x, {"mask": mask}), unpatched, reference, f"{name} (triton)")
    xtk.unpatch(model)


@pytest.mark.parametrize("cls,extra", _loader_params(test_loader.test_cross_attention_parity))
def test_cross_attention_configs(cls, extra):
    """The loader's cross-attention configs: outputs, the gradients of x, context and every
    parameter by the 2x rule; cross residual attention is kept."""
    kw = dict(dim=16, depth=2, heads=4, attn_dim_head=8, **extra)

    def build():
        torch.manual_seed(0)
        return perturb(getattr(X, cls)(**kw).eval())

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, generator=g)
    ctx = torch.randn(2, 5, extra.get("cross_attn_dim_context", 16), generator=g)
    cm = torch.ones(2, 5, dtype=torch.bool)
    cm[1, 3:] = False
    m = torch.ones(2, 7, dtype=torch.bool)
    m[0, 5:] = False

    def run(model, dtype):
        model.zero_grad(set_to_none=True)
        xi, ci = (t.detach().clone().to(dtype).requires_grad_() for t in (x, ctx))
        out = model(xi, context=ci, context_mask=cm, mask=m)
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return out.detach(), {**grads, "x": xi.grad, "context": ci.grad}

    model = build()
    unpatched, reference = run(model, torch.float32), run(build().double(), torch.float64)
    report = xtk.patch(model)
    kept = dict(report.kept)
    if extra.get("cross_residual_attn"):
        assert any("residual attention" in why for why in kept.values())
    assert report.swapped
    _assert_2x(run(model, torch.float32), unpatched, reference, f"{cls} {extra}")
    xtk.unpatch(model)
    assert torch.equal(run(model, torch.float32)[0], unpatched[0])


@pytest.mark.parametrize("pos", [dict(alibi_pos_bias=True, attn_kv_heads=2), dict(rotary_xpos=True)])
def test_patched_model_compiles_fullgraph(pos):
    """torch.compile(fullgraph=True) of a patched model (the per-call hand-off to Attend traces
    without a graph break), forward and backward equal to the patched eager model."""
    torch.manual_seed(0)
    model = perturb(X.TransformerWrapper(num_tokens=23, max_seq_len=16, attn_layers=X.Decoder(
        dim=16, depth=1, heads=4, attn_dim_head=8, use_rmsnorm=True, ff_glu=True, **pos)).eval())
    x = torch.randint(0, 23, (2, 10))
    xtk.patch(model)
    want, grads = _run(model, x, {})
    compiled = torch.compile(model, fullgraph=True)
    model.zero_grad(set_to_none=True)
    got = compiled(x)
    (got.square().mean() + got[:, :3].mean()).backward()
    got_grads = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(got_grads[n], g, atol=1e-5, rtol=1e-5)
    xtk.unpatch(model)


@pytest.mark.parametrize("name", ["num_mem_kv_alibi", "qk_norm_gqa_dim_scale", "gqa_t5_topk_mem_kv", "rotary_xpos",
                                  "dynamic_pos_bias_log_norm", "post_norm_scalenorm_gqa", "ff_relu_squared_glu"])
def test_patch_under_bf16_autocast(name):
    """x-transformers runs 16-bit under autocast (a .bfloat16() model fails in its own code on CPU):
    fp32 memory key/values and QK-norm dim scales then promote k or q to fp32 while v is bf16; the
    patch computes in autocast's dtype, as x-transformers' einsums do. 2x rule, bf16 floor."""
    model, oracle = _build(name), _oracle(name)
    x = torch.randint(0, 23, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, -3:] = False

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _run(m, x, {"mask": mask})

    unpatched, reference = run(model), _run(oracle, x, {"mask": mask})
    xtk.patch(model)
    (po, pg), (uo, ug), (oo, og) = run(model), unpatched, reference
    floor = FLOOR[torch.bfloat16]
    verdict = judge_2x(po.float(), uo.float(), oo, f"{name} bf16 output", floor=floor)
    assert verdict["ok"], verdict["why"]
    for n, g in og.items():
        if g is not None:
            verdict = judge_2x(pg[n], ug[n], g, f"{name} bf16 d{n}", floor=floor)
            assert verdict["ok"], verdict["why"]
    xtk.unpatch(model)


def test_attention_dropout_runs_in_kernel_when_training():
    """``attn_dropout`` in training: xtk's in-kernel dropout (its own random stream), gradients finite;
    in eval none, equal to unpatched."""
    torch.manual_seed(0)
    model = perturb(X.TransformerWrapper(num_tokens=23, max_seq_len=16, attn_layers=X.Decoder(
        **BASE, alibi_pos_bias=True, attn_dropout=0.5)).eval())
    x = torch.randint(0, 23, (2, 10))
    want = model(x).detach()
    xtk.patch(model)
    model.train()
    a, b = model(x), model(x)
    assert (a - b).abs().max() > 1e-3 and torch.isfinite(a).all()
    a.square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    assert (model(x).detach() - want).abs().max() < 1e-5
    xtk.unpatch(model)


def test_flash_attend_is_swapped_too():
    """``attn_flash=True`` (x-transformers' SDPA path) computes the same function: swapped likewise."""
    torch.manual_seed(0)
    model = perturb(X.TransformerWrapper(num_tokens=23, max_seq_len=16, attn_layers=X.Decoder(
        **BASE, attn_flash=True, alibi_pos_bias=True, attn_kv_heads=2, attn_num_mem_kv=2)).eval())
    x = torch.randint(0, 23, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, -3:] = False
    _close_and_restored(model, lambda m: m(x, mask=mask).detach())
