"""Where the time of one attention step goes, per kernel (eleventh session, H200 call 2).

    python profile_kernels.py warm FEATURE CAUSAL MODE   # compile one cell (run in parallel)
    python profile_kernels.py profile                    # then time every cell, kernel by kernel

Cells: xtk at b4 h16 n4096 d128 bf16 (the issue's anchor) for none / alibi / t5 / dtable / topk8,
forward and forward+backward, non-causal; flex T5 / DistanceTable causal forward (compiled without
dynamo's silent eager fallback, bench_attention._compile_without_fallback). Per cell: the median
step (triton.testing.do_bench) and torch.profiler's CUDA time per kernel name per step.
"""
import sys

import torch
import triton

from xtk.bench.bench_attention import make_call

SHAPE = (4, 16, 4096, 128)
CELLS = ([("xtk", f, False, m) for f in ("none", "alibi", "t5", "dtable", "topk8") for m in ("fwd", "fwd+bwd")]
         + [("flex", f, True, "fwd") for f in ("t5", "dtable")])


def step(impl, feature, causal, mode):
    call, why = make_call(impl, feature, SHAPE, causal, mode, torch.bfloat16, "cuda")
    if call is None:
        raise RuntimeError(why)
    return call


def profile(cell, iters=5):
    call = step(*cell)
    call()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(call, warmup=25, rep=200)
    peak = torch.cuda.max_memory_allocated() / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 1e3 / iters, e.count // iters) for e in prof.key_averages()
                   if e.device_time_total > 0), key=lambda r: -r[1])
    print(f"\n## {cell}: median {ms:.3f} ms, peak {peak:.0f} MiB", flush=True)
    for name, t, count in rows[:10]:
        print(f"  {t:8.3f} ms  x{count:<3d} {name[:110]}")


if __name__ == "__main__":
    if sys.argv[1] == "warm":
        impl, feature, causal, mode = sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5]
        step(impl, feature, causal, mode)()
        torch.cuda.synchronize()
    else:
        for cell in CELLS:
            try:
                profile(cell)
            except Exception as e:  # noqa: BLE001 -- report and go on
                print(f"\n## {cell}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()
