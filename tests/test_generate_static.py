"""The static decode step (``xtk.models.static_decode``) and ``generate(..., cuda_graph=True)``.

The step runs eagerly on CPU (``generate_static(..., capture=False)``), so that what a CUDA graph
would capture is checked here without a GPU: greedy tokens equal ``generate()``'s token for token
for every position feature (absolute, ALiBi, T5, dynamic position bias, rotary, xpos, QK-norm, GQA,
cross attention), sampled ones too with the same seed on CPU; the fixed-capacity stores hold what
``generate``'s cache holds; eos cuts the output where ``generate`` stops; the step reads no device
value on the host (``host_reads.no_host_reads``, the attention forced to the decode kernel under the
Triton interpreter); every feature it cannot serve raises a ValueError naming it. The capture
mechanics (warm-up, one capture, replays) are checked with a stand-in for ``torch.cuda``; the real
capture runs only where CUDA is available (``test_cuda_graph_equals_generate``).
"""
import contextlib
import os

import pytest
import torch

from xtk import Decoder, TransformerWrapper
from xtk.models import static_decode
from xtk.models.autoregressive import AutoregressiveWrapper
from xtk.models.static_decode import DeviceSampler, decode_step, generate_static, static_state

from host_reads import no_host_reads
from model_helpers import perturb

pytestmark = pytest.mark.usefixtures("one_thread")
V = 37
INTERPRETER = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the 'triton' backend runs here


def lm(max_seq_len=32, wrapper_kw=None, **layer_kw):
    torch.manual_seed(0)
    layer = dict(dim=32, depth=2, heads=2)
    layer.update(layer_kw)
    net = TransformerWrapper(num_tokens=V, max_seq_len=max_seq_len, attn_layers=Decoder(**layer), **(wrapper_kw or {}))
    return AutoregressiveWrapper(perturb(net, seed=1).eval())


def context_for(layer_kw, b=3):
    """The ``context`` kwarg for a cross-attending model (6 positions), else none."""
    return dict(context=torch.randn(b, 6, layer_kw.get("dim", 32))) if layer_kw.get("cross_attend") else {}


FEATURES = {
    "absolute": dict(),
    "scaled-sinusoidal": dict(wrapper_kw=dict(scaled_sinu_pos_emb=True)),
    "alibi": dict(alibi_pos_bias=True, heads=4, alibi_num_heads=2),
    "t5": dict(rel_pos_bias=True),
    "dynamic": dict(dynamic_pos_bias=True, dynamic_pos_bias_log_distance=True),
    "rotary": dict(rotary_pos_emb=True),
    "xpos": dict(rotary_xpos=True, rotary_xpos_scale_base=8),
    "qk-norm": dict(attn_qk_norm=True, attn_qk_norm_dim_scale=True, rotary_pos_emb=True),
    "gqa": dict(heads=4, attn_kv_heads=2, alibi_pos_bias=True),
    "one-kv-head": dict(heads=4, attn_one_kv_head=True, rel_pos_bias=True),
    "cross-attention": dict(cross_attend=True, rotary_pos_emb=True, heads=4, attn_kv_heads=1),
    "memory-kv": dict(attn_num_mem_kv=3, cross_attend=True, alibi_pos_bias=True, attn_qk_norm=True),
    "layer-features": dict(sandwich_norm=True, use_rmsnorm=True, ff_glu=True, attn_gate_values=True,
                           attn_head_scale=True, attn_sparse_topk=4, macaron=True, wrapper_kw=dict(tie_embedding=True)),
    "post-norm-gated": dict(pre_norm=False, gate_residual=True, use_scalenorm=True, attn_on_attn=True),
    "rezero": dict(use_rezero=True, rotary_pos_emb=True),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_static_greedy_equals_generate(feature):
    """The static step run eagerly gives generate()'s greedy tokens, token for token (24 of them,
    most of the way to max_seq_len)."""
    w, kw = lm(**FEATURES[feature]), FEATURES[feature]
    prompts = torch.randint(0, V, (3, 7))
    ctx = context_for(kw)
    want = w.generate(prompts, 24, temperature=0., **ctx)
    got = generate_static(w, prompts, 24, temperature=0., capture=False, **ctx)
    assert got.shape == (3, 24) and len(set(want.flatten().tolist())) > 3   # tokens that vary
    assert torch.equal(got, want)


def test_static_stores_hold_what_generates_cache_holds():
    """After the steps, every layer's store holds, in place, the keys/values generate()'s cache holds
    (same positions, same values); seqlens and the output index advanced once per step."""
    w = lm(rotary_pos_emb=True, heads=4, attn_kv_heads=2)
    prompts, n = torch.randint(0, V, (2, 5)), 9
    _, cache = w.generate(prompts, n, temperature=0., return_intermediates=True)
    with torch.no_grad():
        logits, prompt_cache = w.net(prompts, return_intermediates=True)
        state = static_state(w.net, prompt_cache, logits[:, -1].argmax(-1, keepdim=True), n)
        stores = [s.k for s in state.layers]
        for _ in range(n - 1):
            decode_step(w.net, state, DeviceSampler(0., None, {}))
    assert state.seqlens.tolist() == [5 + n - 1] * 2 and state.index.tolist() == [n]
    for store, stores_k, inter in zip(state.layers, stores, cache.layer_caches()):
        assert store.k is stores_k and store.k.shape == (2, 2, 5 + n - 1, 64)   # fixed, written in place
        torch.testing.assert_close(store.k, inter.cached_kv[0])
        torch.testing.assert_close(store.v, inter.cached_kv[1])


@pytest.mark.parametrize("filter_kw", [dict(), dict(filter_kwargs=dict(k=3)), dict(filter_logits_fn="top_p")])
def test_sampling_on_the_device_matches_generate_with_the_same_seed(filter_kw):
    """Temperature and the filters on the device: on CPU the exponential race draws from the same
    random stream as torch.multinomial, so the same seed gives the same tokens."""
    w = lm(alibi_pos_bias=True, heads=4)
    prompts = torch.randint(0, V, (3, 4))
    torch.manual_seed(5)
    want = w.generate(prompts, 16, temperature=0.8, **filter_kw)
    torch.manual_seed(5)
    got = generate_static(w, prompts, 16, temperature=0.8, capture=False, **filter_kw)
    assert torch.equal(got, want)


class _CountingStep:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = static_decode.decode_step

        def counted(*args):
            self.calls += 1
            return original(*args)
        monkeypatch.setattr(static_decode, "decode_step", counted)


def test_eos_cuts_where_generate_stops_checked_every_k_steps(monkeypatch):
    """eos: generate() stops once every row has produced it; the static loop looks every
    EOS_CHECK_EVERY steps and cuts the output at the same place, padding after eos alike."""
    w = lm(rel_pos_bias=True)
    w.pad_value = -1
    prompts = torch.randint(0, V, (3, 4))
    free = w.generate(prompts, 28, temperature=0.)
    common = set.intersection(*(set(row.tolist()) for row in free))
    eos = min(common, key=lambda tok: max(row.tolist().index(tok) for row in free))
    stop = max(row.tolist().index(eos) for row in free) + 1       # generate's length
    want = w.generate(prompts, 28, temperature=0., eos_token=eos)
    assert want.shape[1] == stop < 28
    monkeypatch.setattr(static_decode, "EOS_CHECK_EVERY", 4)
    counter = _CountingStep(monkeypatch)
    got = generate_static(w, prompts, 28, temperature=0., eos_token=eos, capture=False)
    assert torch.equal(got, want)
    assert counter.calls % 4 == 0 and stop - 1 <= counter.calls < stop - 1 + 4   # steps after the prompt's


@pytest.mark.skipif(not INTERPRETER, reason="needs CUDA or the Triton interpreter (tests/conftest.py sets it on CPU)")
@pytest.mark.parametrize("feature", ["absolute", "alibi", "t5", "dynamic", "qk-norm", "xpos", "gqa", "cross-attention",
                                     "memory-kv"])
def test_the_static_step_reads_nothing_on_the_host(feature, monkeypatch):
    """With the attention on the decode kernel ('triton', what a capture uses), a whole step --
    embedding at the device position, every layer with its bias / rotary / QK-norm, logits,
    temperature + top-k sampling, the in-place advance -- reads no device value on the host. The
    same step on the reference path (which reads the lengths) trips the guard."""
    monkeypatch.delenv("XTK_DEBUG_CHECKS", raising=False)
    kw = FEATURES[feature]
    w = lm(**kw).to(TRITON_DEVICE)  # compiled Triton takes CUDA tensors only
    with torch.device(TRITON_DEVICE):
        prompts = torch.randint(0, V, (2, 5))
        with torch.no_grad():
            logits, cache = w.net(prompts, return_intermediates=True, **context_for(kw, 2))
        first = logits[:, -1].argmax(-1, keepdim=True)
        sampler = DeviceSampler(0.9, static_decode.top_k, dict(k=5))
        for backend, guarded in (("triton", contextlib.nullcontext()),
                                 ("eager", pytest.raises(AssertionError, match="host"))):
            state = static_state(w.net, cache, first, 4, backend)
            with torch.no_grad(), guarded, no_host_reads(monkeypatch):
                for _ in range(2):
                    decode_step(w.net, state, sampler)
            if backend == "triton":
                assert state.seqlens.tolist() == [state.k_prefix + 7] * 2 and state.index.tolist() == [3]


def test_cuda_graph_on_cpu_is_refused_before_any_work():
    w = lm()
    calls = []
    w.net.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"^cuda_graph: CUDA graphs need a CUDA device; got cpu"):
        w.generate(torch.randint(0, V, (2, 3)), 4, cuda_graph=True)
    assert calls == []


REFUSED = {   # (model kwargs, generate kwargs, the message)
    "prompt_lens": (dict(), dict(prompt_lens=torch.tensor([4, 2])), r"prompt_lens: prompts of different lengths"),
    "list-prompts": (dict(), dict(prompts=[torch.tensor([1, 2]), torch.tensor([3])]), r"prompt_lens:"),
    "mask": (dict(), dict(mask=torch.ones(2, 4, dtype=torch.bool)), r"mask: a prompt key mask"),
    "context_mask": (dict(cross_attend=True), dict(context=torch.randn(2, 6, 32),
                                                   context_mask=torch.ones(2, 6, dtype=torch.bool)),
                     r"context_mask: masked cross attention"),
    "mems": (dict(), dict(mems=[torch.randn(2, 3, 32)] * 2), r"mems: Transformer-XL memories"),
    "amateur_model": (dict(), dict(amateur_model="net"), r"amateur_model: contrastive decoding"),
    "cache_kv": (dict(), dict(cache_kv=False), r"cache_kv: the static step is a KV-cached step"),
    "return_intermediates": (dict(), dict(return_intermediates=True), r"return_intermediates:"),
    "custom-filter": (dict(), dict(filter_logits_fn=lambda logits: logits, temperature=1.),
                      r"filter_logits_fn: only the built-in filters"),
    "sliding-window": (dict(rotary_pos_emb=True), dict(seq_len=30), r"seq_len: the prompt \(4\) and seq_len - 1 = 29 "
                                                                      r"steps reach 33 positions, more than max_seq_len"),
    "absolute-past-max": (dict(), dict(seq_len=30, restrict_to_max_seq_len=False),
                          r"seq_len: 33 positions exceed the 32 of the absolute positional embedding"),
    "memory-tokens": (dict(wrapper_kw=dict(num_memory_tokens=2)), dict(), r"num_memory_tokens:"),
    "shift-tokens": (dict(shift_tokens=1), dict(), r"shift_tokens:"),
    "collab-heads": (dict(attn_collab_heads=True), dict(), r"attn_collab_heads"),
    "talking-heads": (dict(attn_talking_heads=True), dict(), r"layers\[0\]: talking heads needs the whole score"),
    "residual-attention": (dict(residual_attn=True), dict(), r"layers\[0\]: residual attention"),
    "position-infused": (dict(position_infused_attn=True), dict(), r"position_infused_attn:"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_the_static_step_cannot_serve_is_refused_by_name(case):
    model_kw, call_kw, match = REFUSED[case]
    w = lm(**model_kw)
    call_kw = dict(call_kw)
    if call_kw.get("amateur_model") == "net":
        call_kw["amateur_model"] = w.net
    prompts = call_kw.pop("prompts", torch.randint(0, V, (2, 4)))
    seq_len = call_kw.pop("seq_len", 5)
    with pytest.raises(ValueError, match=r"generate\(cuda_graph=True\) cannot serve this call: .*" + match):
        generate_static(w, prompts, seq_len, capture=False, **call_kw)


def test_a_network_other_than_transformer_wrapper_is_refused():
    class Net(torch.nn.Module):
        max_seq_len, can_cache_kv = 8, True
    with pytest.raises(ValueError, match="net: the static step runs xtk's TransformerWrapper, got Net"):
        generate_static(AutoregressiveWrapper(Net()), torch.zeros(1, 2, dtype=torch.long), 3, capture=False)


def test_relative_positions_run_past_max_seq_len_without_restriction():
    """restrict_to_max_seq_len=False: no window, the stores simply grow past max_seq_len (T5)."""
    w = lm(max_seq_len=8, rel_pos_bias=True)
    prompts = torch.randint(0, V, (2, 5))
    want = w.generate(prompts, 12, temperature=0., restrict_to_max_seq_len=False)
    assert torch.equal(generate_static(w, prompts, 12, temperature=0., restrict_to_max_seq_len=False,
                                       capture=False), want)


def test_one_dim_prompt_and_a_single_token():
    w = lm(rotary_pos_emb=True)
    prompt = torch.randint(0, V, (6,))
    for n in (1, 5):
        got = generate_static(w, prompt, n, temperature=0., capture=False, filter_logits_fn=lambda t: t)
        assert got.shape == (n,) and torch.equal(got, w.generate(prompt, n, temperature=0.))


class _FakeCuda:
    """Stands in for the torch.cuda calls of _GraphedStep, recording them."""

    def __init__(self):
        self.log = []
        fake = self

        class Stream:
            def wait_stream(self, other):
                fake.log.append("wait")

        class Graph:
            def replay(self):
                fake.log.append("replay")

        @contextlib.contextmanager
        def stream(s):
            fake.log.append("side")
            yield

        @contextlib.contextmanager
        def graph(g):
            fake.log.append("capture")
            fake.capturing = True
            yield
            fake.capturing = False

        self.Stream, self.CUDAGraph, self.stream, self.graph = Stream, Graph, stream, graph
        self.current_stream, self.capturing = Stream, False


def test_graph_mechanics_warm_up_then_capture_once_then_replay(monkeypatch):
    fake = _FakeCuda()
    for name in ("Stream", "CUDAGraph", "stream", "graph", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    ran = []
    graphed = static_decode._GraphedStep(lambda: ran.append("capture" if fake.capturing else "eager"))
    for _ in range(5):
        graphed()
    assert ran == ["eager", "eager", "capture"]       # two real warm-up steps, then recorded once
    assert [e for e in fake.log if e != "wait"] == ["side", "side", "capture", "replay", "replay", "replay"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("feature", ["absolute", "alibi", "t5", "dynamic", "xpos", "qk-norm", "gqa"])
def test_cuda_graph_equals_generate(feature):
    w = lm(**FEATURES[feature]).cuda()
    prompts = torch.randint(0, V, (3, 7), device="cuda")
    want = w.generate(prompts, 24, temperature=0.)
    assert torch.equal(w.generate(prompts, 24, temperature=0., cuda_graph=True), want)
