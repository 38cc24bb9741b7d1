"""CI-sized pytest-benchmark runs (``pytest bench/ --benchmark-only``): one tiny call per op and
implementation, the same callables ``python -m xtk bench`` times. Not part of ``pytest tests``; CI
runs them once each (``.ci/run``: ``pytest bench --benchmark-disable``)."""
import pytest
import torch

from xtk.bench import bench_attention, bench_glu, bench_model, bench_norm

ATT_SHAPE = (1, 2, 128, 32)
pytestmark = pytest.mark.benchmark(max_time=0.05, min_rounds=3)  # CI-sized: ~0.1 s per benchmark


@pytest.mark.parametrize("impl", ["xtk", "eager", "sdpa"])
@pytest.mark.parametrize("feature", ["none", "alibi", "t5", "topk8"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention(benchmark, impl, feature, mode):
    call, why = bench_attention.make_call(impl, feature, ATT_SHAPE, True, mode, torch.float32, "cpu")
    if call is None:
        assert impl == "sdpa" and feature == "topk8", why
        return
    benchmark(call)


@pytest.mark.parametrize("impl", bench_norm.IMPLS)
@pytest.mark.parametrize("case", bench_norm.CASES)
def test_rms_norm(benchmark, impl, case):
    benchmark(bench_norm.make_call(impl, case, (256, 256), "fwd+bwd", torch.float32, "cpu"))


@pytest.mark.parametrize("impl", bench_glu.IMPLS)
def test_glu(benchmark, impl):
    benchmark(bench_glu.make_call(impl, "gelu", (256, 256), "fwd+bwd", torch.float32, "cpu"))


@pytest.mark.parametrize("impl", bench_model.IMPLS)
def test_model_step(benchmark, impl):
    TW, Dec, AR = bench_model.classes()
    torch.manual_seed(0)
    cfg = dict(batch=1, seq=32, prompt=4, gen=4, vocab=256)
    model = TW(num_tokens=cfg["vocab"], max_seq_len=1024, attn_layers=Dec(dim=64, depth=1, heads=4, alibi_pos_bias=True))
    benchmark(bench_model.make_call(impl, "alibi", "step", cfg, "cpu", torch.float32, model, AR))
