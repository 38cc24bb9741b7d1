"""The dK/dV kernel's GQA-group split on a GPU: forward+backward with the launcher's split against the
same call forced unsplit (``kernels.attention_op.dkdv_split``), bf16, non-causal and causal.

    python bench/profile_dkdv_split.py [--n 4096] [--d 128]
    python bench/profile_dkdv_split.py --dry-run   # CPU, the Triton interpreter, tiny sizes: the plumbing

Shapes where the unsplit grid leaves SMs idle (MQA / GQA at batch 1-2) and one where it does not
(b 4, 16 kv heads: the split must stay 1 there). Per cell: the split the launcher takes, the median
step of each (``triton.testing.do_bench``; the split's includes the sum of its partials), their
ratio, and torch.profiler's time of the dK/dV kernel alone per step. CUDA, or ``--dry-run`` (every
code path once on CPU under TRITON_INTERPRET=1, with a stand-in 132-SM GPU so that the split
happens; its times mean nothing).
"""
import argparse
import time

import torch
import triton

import xtk
from xtk.kernels import attention_op

SHAPES = [(1, 16, 1), (1, 32, 8), (2, 16, 2), (4, 16, 16)]  # (b, h, hk)


def make_step(b, h, hk, n, d, causal, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g).requires_grad_()
    k, v = (torch.randn(b, hk, n, d, device=device, dtype=dtype, generator=g).requires_grad_()
            for _ in range(2))
    do = torch.randn_like(q)

    def step():
        q.grad = k.grad = v.grad = None
        xtk.attention(q, k, v, is_causal=causal, enable_gqa=hk != h, backend="triton").backward(do)
    return step


def median_ms(step) -> float:
    if torch.cuda.is_available():
        return triton.testing.do_bench(step, warmup=25, rep=200)
    t = time.perf_counter()  # the dry run: one call (its time means nothing)
    step()
    return (time.perf_counter() - t) * 1e3


def dkdv_ms(step, iters=5) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages() if "_attn_bwd_dkdv" in e.key) / 1e3 / iters


def cell(b, h, hk, n, d, causal, device="cuda"):
    auto = attention_op.dkdv_split
    taken = []

    def recorded(*a):
        taken.append(auto(*a))
        return taken[-1]
    attention_op.dkdv_split = recorded
    try:
        step = make_step(b, h, hk, n, d, causal, device)
        step()
        split_ms, split_kernel = median_ms(step), dkdv_ms(step)
        attention_op.dkdv_split = lambda *a: 1
        step()
        plain_ms, plain_kernel = median_ms(step), dkdv_ms(step)
    finally:
        attention_op.dkdv_split = auto
    print(f"| b{b} h{h} hk{hk} n{n} d{d} {'causal' if causal else 'full'} | {taken[0]} | {split_ms:.3f} | "
          f"{plain_ms:.3f} | {plain_ms / split_ms:.2f}x | {split_kernel:.3f} | {plain_kernel:.3f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="sequence length (queries = keys)")
    parser.add_argument("--d", type=int, default=128, help="head dim")
    parser.add_argument("--dry-run", action="store_true", help="CPU (TRITON_INTERPRET=1), tiny sizes: the plumbing")
    args = parser.parse_args(argv)
    device, n, d, shapes = "cuda", args.n, args.d, SHAPES
    if args.dry_run:
        device, n, d, shapes = "cpu", 40, 16, [(1, 4, 1), (2, 4, 4)]
        attention_op.sm_count = lambda dev: 132  # a stand-in GPU, so that the split happens
    elif not torch.cuda.is_available():
        raise SystemExit("profile_dkdv_split: needs a CUDA GPU (it times kernels), or --dry-run")
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (dry run)'}, "
          f"{attention_op.sm_count(torch.device(device))} SMs, torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | split | fwd+bwd ms (split) | fwd+bwd ms (unsplit) | speedup | dK/dV ms (split) | dK/dV ms (unsplit) |")
    print("|---|---|---|---|---|---|---|")
    for b, h, hk in shapes:
        for causal in (False, True):
            cell(b, h, hk, n, d, causal, device)


if __name__ == "__main__":
    main()
