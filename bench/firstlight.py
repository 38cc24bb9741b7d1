"""First light on a GPU: speed at the issue's anchor shapes, a tile sweep, big-shape accuracy.

    python -m xtk.bench.firstlight warm --shard I/N   # compile the cells of shard I (run N in parallel)
    python -m xtk.bench.firstlight time --json PATH   # accuracy at the anchor shapes, then timings
    python -m xtk.bench.firstlight tiles --json PATH  # candidate tiles of the plain forward/backward
    python -m xtk.bench.firstlight tf32 D FEATURE     # one fp32 + TF32 fwd+bwd (a compile crash aborts)

Used by bench/firstlight.sh (one command on a GPU machine). ``--tiny`` runs every path at toy
sizes (CPU, the interpreter) so the script is checked before GPU time is spent on it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

import xtk
from xtk.kernels import attention_op

from . import bench_attention as ba

XTK_FEATURES = ["none", "alibi", "t5", "dtable", "topk8", "qknorm", "rotary_xpos"]
FLEX_FEATURES = ["none", "alibi", "t5"]


def shapes(tiny: bool):
    return [(1, 2, 64, 32)] if tiny else [(4, 16, 4096, 128), (4, 16, 4096, 64)]


def cells(tiny: bool):
    """(impl, feature, shape, causal, mode) of every timed cell."""
    out = []
    for shape in shapes(tiny):
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                out.append(("sdpa-nobias", "none", shape, causal, mode))
                for f in XTK_FEATURES:
                    out.append(("xtk", f, shape, causal, mode))
                if shape[3] == 128 and not tiny:
                    for f in FLEX_FEATURES:
                        out.append(("flex", f, shape, causal, mode))
                    if not causal:
                        out.append(("eager", "alibi", shape, causal, mode))
    return out


def _device(tiny):
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(tiny):
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _bench(fn, device):
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def warm(args):
    """Compile (run once) every timed cell and tile candidate of shard I of N."""
    i, n = (int(x) for x in args.shard.split("/"))
    device, dtype = _device(args.tiny), _dtype(args.tiny)
    jobs = [("cell", c) for c in cells(args.tiny)] + [("tile", c) for c in tile_cells(args.tiny)]
    for j, (what, cell) in enumerate(jobs):
        if j % n != i:
            continue
        t0 = time.perf_counter()
        try:
            if what == "cell":
                call, why = ba.make_call(cell[0], cell[1], cell[2], cell[3], cell[4], dtype, device)
            else:
                call, why = tile_call(cell, device, dtype), ""
            if call is not None:
                call()
                if device == "cuda":
                    torch.cuda.synchronize()
            print(f"warm {what} {cell}: {time.perf_counter() - t0:.1f}s {why}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"warm {what} {cell}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def accuracy(shape, feature, causal, device, dtype):
    """Relative errors of xtk (bf16) and of SDPA/eager on the same bf16 inputs against an fp32
    eager reference on upcast inputs: output and dq/dk/dv (and the bias-table gradient)."""
    b, h, n, d = shape
    shape1 = (1, h, n, d)
    q, k, v, kw = ba._inputs(feature, *shape1, dtype, device, True, seed=1)
    go = torch.randn(1, h, n, d, device=device, dtype=dtype)

    def run(backend, q, k, v, kw, go):
        out = xtk.attention(q, k, v, is_causal=causal, backend=backend, **kw)
        leaves = [q, k, v] + [t for t in (getattr(kw.get("bias"), "table", None),) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(out, leaves, go)
        return [out.detach()] + list(grads)

    def up(t):
        return t.detach().float().requires_grad_(t.requires_grad)
    kw32 = dict(kw)
    bias = kw.get("bias")
    if bias is not None and getattr(bias, "table", None) is not None:
        import dataclasses
        kw32["bias"] = dataclasses.replace(bias, table=up(bias.table))
    ref = run("eager", up(q), up(k), up(v), kw32, go.float())
    got = run("auto", q, k, v, kw, go)
    low = run("eager", q, k, v, kw, go)
    names = ["out", "dq", "dk", "dv", "dtable"]
    res = {}
    for name, r, g, lo in zip(names, ref, got, low):
        e, el = _rel(g, r), _rel(lo, r)
        res[name] = dict(xtk=e, eager_bf16=el, ok=bool(e <= 2 * el + 1e-6 and e == e))
    return res


def time_cells(args):
    device, dtype = _device(args.tiny), _dtype(args.tiny)
    report = dict(accuracy=[], timings=[])
    acc_seen = set()
    for impl, f, shape, causal, mode in cells(args.tiny):
        if impl == "xtk" and (f, shape, causal) not in acc_seen:
            acc_seen.add((f, shape, causal))
            try:
                acc = accuracy(shape, f, causal, device, dtype)
            except Exception as e:  # noqa: BLE001
                acc = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            report["accuracy"].append(dict(feature=f, shape=shape, causal=causal, result=acc))
            bad = [k for k, v in acc.items() if isinstance(v, dict) and not v["ok"]]
            print(f"acc {f} {shape} causal={causal}: {'FAIL ' + str(bad) if bad or 'error' in acc else 'ok'} "
                  + json.dumps(acc)[:400], flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
        row = dict(impl=impl, feature=f, shape=shape, causal=causal, mode=mode)
        try:
            call, why = ba.make_call(impl, f, shape, causal, mode, dtype, device)
            if call is None:
                row["skipped"] = why
            else:
                t0 = time.perf_counter()
                call()
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                row["first_s"] = time.perf_counter() - t0
                ms = _bench(call, device)
                row["ms"] = ms
                row["tflops"] = ba.flops(*shape, causal, mode) / ms / 1e9
                if device == "cuda":
                    row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        report["timings"].append(row)
        print("time " + json.dumps(row), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    report["kernels"] = compiled_kernels()
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1)


def compiled_kernels():
    """(kernel, constexprs, registers, spills, shared bytes) of every kernel this process launched."""
    from xtk.kernels import attention_bwd, attention_fwd
    rows = []
    for fn in (attention_fwd._attn_fwd, attention_fwd._attn_topk_threshold, attention_bwd._attn_bwd_dkdv,
               attention_bwd._attn_bwd_dq):
        caches = getattr(fn, "device_caches", {})
        for dev, entry in caches.items():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for key, kern in getattr(cache, "items", lambda: [])():
                meta = getattr(kern, "metadata", None)
                rows.append(dict(kernel=fn.__name__, regs=getattr(kern, "n_regs", None),
                                 spills=getattr(kern, "n_spills", None),
                                 shared=getattr(meta, "shared", None), warps=getattr(meta, "num_warps", None),
                                 stages=getattr(meta, "num_stages", None), key=str(key)[-300:]))
    return rows


FWD_TILES = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3),
             (128, 64, 8, 2), (64, 32, 8, 2)]
DKDV_TILES = [(32, 64, 8, 1), (64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2), (32, 128, 4, 2),
              (32, 64, 4, 2), (64, 64, 4, 3)]
DQ_TILES = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 128, 8, 2), (64, 64, 8, 3),
            (128, 64, 4, 2)]


def tile_cells(tiny: bool):
    """(shape, feature, causal, kernel kind, candidate tile) of the tile sweep: d128, plain and ALiBi."""
    shape = (1, 2, 64, 32) if tiny else (4, 16, 4096, 128)
    out = []
    for feature, causal in (("none", False), ("none", True), ("alibi", False)):
        for kind, cands in (("fwd", FWD_TILES), ("dkdv", DKDV_TILES), ("dq", DQ_TILES)):
            for cand in ([(32, 32, 4, 1)] if tiny else cands):
                out.append((shape, feature, causal, kind, cand))
    return out


class _Override:
    """Replace the shipped tile of one kernel kind while in the block."""

    def __init__(self, kind, cand):
        self.kind, self.cand = kind, cand

    def __enter__(self):
        self.orig = attention_op.config
        kind, (bm, bn, w, s), orig = self.kind, self.cand, self.orig

        def patched(k, *a, **kw):
            return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s) if k == kind else orig(k, *a, **kw)
        attention_op.config = patched

    def __exit__(self, *exc):
        attention_op.config = self.orig


def tile_call(cell, device, dtype):
    shape, feature, causal, kind, cand = cell
    mode = "fwd" if kind == "fwd" else "fwd+bwd"
    call, _ = ba.make_call("xtk", feature, shape, causal, mode, dtype, device)

    def run():
        with _Override(kind, cand):
            return call()
    return run


def tiles(args):
    """Time each candidate tile of one kernel with the others at their shipped config."""
    device, dtype = _device(args.tiny), _dtype(args.tiny)
    rows = []
    for cell in tile_cells(args.tiny):
        shape, feature, causal, kind, cand = cell
        row = dict(d=shape[3], feature=feature, causal=causal, kind=kind, tile=cand)
        try:
            call = tile_call(cell, device, dtype)
            call()
            row["ms"] = _bench(call, device)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print("tile " + json.dumps(row), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(args.json, "w") as fh:
        json.dump(dict(rows=rows, kernels=compiled_kernels()), fh, indent=1)


def tf32(args):
    """fp32 with TF32 allowed: one forward+backward (a compile failure may abort the process)."""
    device = _device(args.tiny)
    torch.backends.cuda.matmul.allow_tf32 = True
    d, feature = int(args.d), args.feature
    n = 130
    q, k, v, kw = ba._inputs(feature, 1, 2, n, d, torch.float32, device, True)
    out = xtk.attention(q, k, v, is_causal=True, **kw)
    out.sum().backward()
    ref = xtk.attention(q.detach().double(), k.detach().double(), v.detach().double(), is_causal=True,
                        backend="eager", **{k_: v_ for k_, v_ in kw.items() if k_ != "bias"}) if "bias" not in kw else None
    err = _rel(out.detach(), ref) if ref is not None else float("nan")
    print(f"tf32 d={d} {feature}: ok, out rel err vs fp64 {err:.2e}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m xtk.bench.firstlight")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("warm")
    w.add_argument("--shard", default="0/1")
    for name in ("time", "tiles"):
        s = sub.add_parser(name)
        s.add_argument("--json", required=True)
    t = sub.add_parser("tf32")
    t.add_argument("d")
    t.add_argument("feature")
    for s in sub.choices.values():
        s.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    {"warm": warm, "time": time_cells, "tiles": tiles, "tf32": tf32}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
