"""Needs table_by_head.patch applied (git apply bench/results/nvidia-h100-80gb-hbm3/2026-11-27-session4/table_by_head.patch).
A/B in one process: the distance table as the kernels read it, (2L-1, h) row-major (strides (h, 1),
the layout before kernels/attention_op._table_by_head) against per-head contiguous (strides (1, 2L-1)).
Features t5 and dtable (learned table: fwd+bwd includes its gradient), b4 h16 n4096 d128 bf16."""
import torch
import triton

from xtk.bench import bench_attention as ba
from xtk.kernels import attention_op

by_head = attention_op._table_by_head
rows = []
for feature in ("t5", "dtable", "alibi", "none"):
    for causal in (False, True):
        for mode in ("fwd", "fwd+bwd"):
            for layout in ("row-major", "by-head"):
                attention_op._table_by_head = (lambda t: t) if layout == "row-major" else by_head
                call, reason = ba.make_call("xtk", feature, (4, 16, 4096, 128), causal, mode, torch.bfloat16, "cuda")
                ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
                rows.append((feature, causal, mode, layout, ms))
                print(f"{feature:7s} causal={int(causal)} {mode:8s} {layout:10s} {ms:8.3f} ms", flush=True)
                if feature in ("alibi", "none"):
                    break  # no table: one layout
attention_op._table_by_head = by_head
