"""CI-sized pytest-benchmark runs (``pytest bench/ --benchmark-only``): one tiny call per op and
implementation, the same callables ``python -m xtk bench`` times. Not part of ``pytest tests``; CI
runs them once each (``.ci/run``: ``pytest bench --benchmark-disable``)."""
import pytest
import torch

from xtk.bench import bench_attention, bench_decode, bench_glu, bench_model, bench_norm, bench_varlen

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


@pytest.mark.parametrize("feature", ["alibi", "t5"])
def test_attention_flex_cpu_forward(benchmark, feature):
    """The CPU flex_attention baseline: compiled forward, the same values as xtk's row; no backward."""
    import xtk
    call, why = bench_attention.make_call("flex", feature, ATT_SHAPE, True, "fwd+bwd", torch.float32, "cpu")
    assert call is None and "no backward on CPU" in why
    call, why = bench_attention.make_call("flex", feature, ATT_SHAPE, True, "fwd", torch.float32, "cpu")
    q, k, v, kw = bench_attention._inputs(feature, *ATT_SHAPE, torch.float32, "cpu", False)
    torch.testing.assert_close(call(), xtk.attention(q, k, v, is_causal=True, **kw), atol=1e-5, rtol=1e-5)
    benchmark(call)


@pytest.mark.parametrize("impl", bench_norm.IMPLS)
@pytest.mark.parametrize("case", bench_norm.CASES)
def test_rms_norm(benchmark, impl, case):
    benchmark(bench_norm.make_call(impl, case, (256, 256), "fwd+bwd", torch.float32, "cpu"))


@pytest.mark.parametrize("impl", bench_glu.IMPLS)
def test_glu(benchmark, impl):
    benchmark(bench_glu.make_call(impl, "gelu", (256, 256), "fwd+bwd", torch.float32, "cpu"))


def _small_models():
    """A tiny xtk model and (x-transformers' model with the same weights, its wrapper) or why not."""
    TW, Dec, AR = bench_model.classes()
    kw = dict(num_tokens=256, max_seq_len=1024)
    torch.manual_seed(0)
    model = TW(attn_layers=Dec(dim=64, depth=1, heads=4, alibi_pos_bias=True), **kw)
    xt = bench_model.x_transformers_classes()
    if not isinstance(xt, str):
        import xtk
        xt_model = xt[0](attn_layers=xt[1](dim=64, depth=1, heads=4, alibi_pos_bias=True), **kw)
        xtk.load_x_transformers_weights(model, xt_model.state_dict())
        xt = (xt_model, xt[2])
    return model, AR, xt


@pytest.mark.parametrize("mode", bench_model.MODES)
@pytest.mark.parametrize("impl", bench_model.IMPLS)
def test_model(benchmark, impl, mode):
    if impl not in bench_model.impls_for(mode):
        return
    model, AR, xt = _small_models()
    if impl == "x-transformers" and isinstance(xt, str):
        pytest.skip(xt)
    cfg = dict(batch=1, seq=32, prompt=4, gen=4, vocab=256)
    benchmark(bench_model.make_call(impl, "alibi", mode, cfg, "cpu", torch.float32, model, AR, xt))


def test_model_rows_interleaved_and_busy():
    """bench_model.run's row logic on a tiny model: every impl measured, busy rows named."""
    from xtk.bench.common import BusyLoad, Result, measure_interleaved
    rows = [(Result("model", "c", i, "step"), lambda: (lambda: torch.ones(8).sum())) for i in ("a", "b")]
    with BusyLoad(1, max_seconds=30) as load:
        assert len(load.procs) == 1 and load.procs[0].is_alive()
        measure_interleaved(rows, "cpu")
    assert not load.procs
    assert all(r.status == "ok" and r.ms > 0 for r, _ in rows)
    bad = [(Result("model", "c", "x", "step"), lambda: (lambda: 1 / 0))]
    measure_interleaved(bad, "cpu")
    assert bad[0][0].status.startswith("error: ZeroDivisionError")
    assert bench_model.count("cpu", False, busy=2) == 2 * bench_model.count("cpu", False)


@pytest.mark.parametrize("impl", bench_decode.IMPLS)
@pytest.mark.parametrize("case", bench_decode.CASES)
def test_decode(benchmark, impl, case):
    call, why = bench_decode.make_call(impl, case, (2, 4, 2, 100, 16), torch.float32, "cpu")
    if call is None:
        assert impl == "flex", why
        return
    benchmark(call)


@pytest.mark.parametrize("impl", bench_varlen.IMPLS)
@pytest.mark.parametrize("case", bench_varlen.CASES)
@pytest.mark.parametrize("mode", bench_varlen.MODES)
def test_varlen(benchmark, impl, case, mode):
    call, _ = bench_varlen.make_call(impl, case, ((20, 3, 41), 2, 16), mode, torch.float32, "cpu")
    benchmark(call)


def test_serving_baselines_compute_what_xtk_computes():
    """The decode and varlen baselines are the same function as xtk's rows (outputs compared)."""
    import xtk
    for case in bench_decode.CASES:
        outs = [bench_decode.make_call(i, case, (2, 4, 2, 100, 16), torch.float32, "cpu")[0]() for i in ("xtk", "xtk-paged", "sdpa")]
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-5)
    for case in bench_varlen.CASES:
        outs = [bench_varlen.make_call(i, case, ((20, 3, 41), 2, 16), "fwd", torch.float32, "cpu")[0]() for i in bench_varlen.IMPLS]
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert xtk.attention_varlen is not None
