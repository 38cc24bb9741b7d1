"""``python -m xtk bench``: run the benchmark suite, print a table, optionally save JSON / markdown / PNG.

    python -m xtk bench                          # quick sweep of every op (~1.5 min on a quiet 2-core CPU)
    python -m xtk bench --op attention --full    # the issue's sweep: n 512..16k, hd 64/128, 16 heads
    python -m xtk bench --json r.json --markdown r.md --plot r.png
    python -m xtk bench --save                   # all three into bench/results/<device-slug>/
    python -m xtk bench --op model --model-shape depth=2,seq=1024,vocab=256   # a model size of your choice
    python -m xtk bench --op decode --op varlen  # serving: a decode step over a KV cache, packed batches
    python -m xtk bench --op model --busy 2      # model rows quiet and beside 2 busy processes
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict

import torch

from . import bench_attention, bench_decode, bench_glu, bench_model, bench_norm, bench_varlen
from .common import Result, device_slug, dump_json, environment, fmt, frozen_gc

OPS = OrderedDict(attention=bench_attention, rms_norm=bench_norm, glu=bench_glu, model=bench_model,
                  decode=bench_decode, varlen=bench_varlen)
BASELINES = {"attention": ["eager", "sdpa", "sdpa-nobias", "flex"], "rms_norm": ["eager", "F.rms_norm", "copy"],
             "glu": ["eager", "torch", "copy"], "model": ["eager", "xtk-cat", "x-transformers"], "decode": ["sdpa", "flex", "xtk-paged"],
             "varlen": ["sdpa-padded"]}
METRIC = {"attention": "TFLOP/s", "rms_norm": "GB/s", "glu": "GB/s", "model": "tok/s", "decode": "GB/s",
          "varlen": "TFLOP/s"}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m xtk bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", choices=list(OPS),
                   help="op to measure (repeatable; default: all)")
    p.add_argument("--full", action="store_true", help="the full sweep of the issue (slow on CPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--features", help=f"attention features, comma-separated (default all: {','.join(bench_attention.FEATURES)})")
    p.add_argument("--shape", action="append", metavar="B,H,N,D",
                   help="attention shape(s) instead of the sweep's (repeatable), e.g. 2,8,2048,32")
    p.add_argument("--model-shape", metavar="K=V,...",
                   help="model size instead of the sweep's, keys depth, batch, seq, prompt, gen, vocab "
                        "(default vocab 20000), e.g. depth=2,seq=1024,vocab=256; keys not given keep the sweep's values "
                        "(with --full: more repeats per cell, >= 5 samples)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--plot", metavar="PATH", help="PNG (needs matplotlib: pip install 'xtk[bench]')")
    p.add_argument("--save", nargs="?", const=RESULTS_DIR, metavar="DIR",
                   help="write LABEL.json, LABEL.md and LABEL.png under DIR/<device-slug>/ (default DIR: bench/results)")
    p.add_argument("--label", help="file name for --save (default: quick, full, or shapes with --shape)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's choice")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="model rows again with N competing busy processes (one core each, stopped after the row)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        print("(tqdm not installed: no progress bar)", file=sys.stderr)
        return None, lambda: None
    bar = tqdm(total=total, desc="xtk bench", unit="cell", file=sys.stderr, dynamic_ncols=True)
    return bar, bar.update


# ----------------------------------------------------------------------------- tables
def _shape(r: Result) -> str:
    p = r.params
    if r.op == "attention":
        return f"b{p['b']} h{p['h']} n{p['n']} d{p['d']}" + (" causal" if p["causal"] else "")
    if r.op == "rms_norm":
        return f"{p['tokens']}x{p['dim']}"
    if r.op == "glu":
        return f"{p['tokens']}x{2 * p['inner']}"
    if r.op == "decode":
        return f"b{p['b']} h{p['h']}/{p['hk']} n{p['n']} d{p['d']}"
    if r.op == "varlen":
        return f"{len(p['lens'])} seqs T{sum(p['lens'])} h{p['h']} d{p['d']}"
    vocab = p.get("vocab", bench_model.VOCAB)
    return (f"d{p['dim']} depth{p['depth']} b{p['batch']} " + (f"n{p['seq']}" if r.mode == "step" else f"prompt{p['prompt']}+{p['gen']}")
            + ("" if vocab == bench_model.VOCAB else f" v{vocab}"))


def _cell(r: Result) -> str:
    if r is None:
        return "-"
    if r.status == "ok":
        return fmt(r.ms)
    if r.status == "OOM":
        return "OOM"
    return "skip" if r.status.startswith("skipped") else "error"


def summarize(results: list[Result]) -> list[tuple[list[str], list[list[str]]]]:
    """One table per op: (header, rows). Each row: a case/shape/mode with every implementation's
    median ms, xtk's throughput, peak memory of xtk and of the eager reference, and xtk's speed-up
    over each baseline (baseline ms / xtk ms; > 1 means xtk is faster)."""
    tables = []
    by_op = OrderedDict()
    for r in results:
        by_op.setdefault(r.op, []).append(r)
    for op, rs in by_op.items():
        impls = list(OrderedDict.fromkeys(r.impl for r in rs))
        groups = OrderedDict()
        for r in rs:
            groups.setdefault((r.case, _shape(r), r.mode), {})[r.impl] = r
        metric = METRIC[op]
        base = [b for b in BASELINES[op] if b in impls]
        header = ["case", "shape", "mode"] + [f"{i} ms" for i in impls] + [f"xtk {metric}", "xtk MB", "eager MB"] + [f"x{b}" for b in base]
        rows = []
        for (case, shape, mode), cells in groups.items():
            x = cells.get("xtk")
            row = [case, shape, mode] + [_cell(cells.get(i)) for i in impls]
            val = None
            if x is not None and x.status == "ok":
                val = {"TFLOP/s": x.tflops, "GB/s": x.gbps, "tok/s": x.tokens_per_s}[metric]
            e = cells.get("eager")
            row += [fmt(val), fmt(x.peak_mb) if x else "-", fmt(e.peak_mb) if e and e.status == "ok" else _cell(e)]
            for b in base:
                ref = cells.get(b)
                if b == "sdpa-nobias" and ref is None:  # the speed-of-light row of the same shape
                    ref = groups.get(("none", shape, mode), {}).get(b)
                if x is not None and x.status == "ok" and ref is not None and ref.status == "ok":
                    row.append(f"{ref.ms / x.ms:.2f}")
                else:
                    row.append(_cell(ref) if ref is not None and ref.status != "ok" else "-")
            rows.append(row)
        tables.append((op, header, rows))
    return tables


def render_text(tables) -> str:
    out = []
    for op, header, rows in tables:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        out.append(f"\n== {op} ==")
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def render_markdown(tables, env: dict, argv: list[str], notes: list[str]) -> str:
    lines = [f"# xtk benchmark: {env['device_name']}", "",
             f"- command: `python -m xtk bench {' '.join(argv)}`".rstrip(),
             f"- date: {env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
             f"python {env['python']}, {env['threads']} threads; load average at start {env['load_average']}",
             "- times: median ms per call; `xN` columns: baseline time / xtk time (> 1: xtk faster); "
             "MB: peak extra memory of the call (CPU: resident-set high-water mark delta via /proc/self/clear_refs; "
             "CUDA: max_memory_allocated delta)"]
    lines += [f"- {n}" for n in notes]
    for op, header, rows in tables:
        lines += ["", f"## {op}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _bars(ax, groups: list, impls: list, find) -> None:
    """Grouped bars: per group one bar per implementation, the median ms of ``find(impl, group)``
    (a ``Result``, or None for no bar); ticks at the group centres."""
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, group in enumerate(groups):
            r = find(impl, group)
            if r is not None:
                xs.append(i + j * width)
                ys.append(r.ms)
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])


def plot(results: list[Result], path: str) -> str:
    """Save a PNG; returns a message (also when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot: matplotlib is not installed (pip install matplotlib, or pip install 'xtk[bench]'); no plot written"
    att = [r for r in results if r.op == "attention" and r.status == "ok"]
    others = [r for r in results if r.op != "attention" and r.status == "ok"]
    ns = sorted({r.params["n"] for r in att})
    features = list(OrderedDict.fromkeys(r.case for r in att))
    panels = [(m, c) for m in ("fwd", "fwd+bwd") for c in (True, False)]
    nrows = (1 if att or not others else 0) + (1 if others else 0)  # no empty attention row for a model-only run
    fig, axes = plt.subplots(nrows, len(panels), figsize=(5 * len(panels), 4.5 * nrows), squeeze=False)
    for ax, (mode, causal) in zip(axes[0] if nrows == 2 or not others else [], panels):
        sel = [r for r in att if r.mode == mode and r.params["causal"] == causal]
        impls = list(OrderedDict.fromkeys(r.impl for r in sel))
        if len(ns) > 1:  # TFLOP/s vs n, one line per implementation and feature
            for impl in impls:
                for f in features:
                    pts = sorted((r.params["n"], r.tflops) for r in sel if r.impl == impl and r.case == f)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{impl} {f}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length n")
            ax.set_ylabel("TFLOP/s")
        else:  # one shape: time per feature, one bar per implementation
            _bars(ax, features, impls, lambda impl, f: next((r for r in sel if r.impl == impl and r.case == f), None))
            ax.set_xticklabels(features, rotation=45, ha="right")
            ax.set_yscale("log")
            ax.set_ylabel("median ms (log)")
        ax.set_title(f"attention {mode} {'causal' if causal else 'full'}" + (f" n={ns[0]}" if len(ns) == 1 else ""))
        ax.legend(fontsize=6)
    if others:
        groups = OrderedDict()
        for r in others:
            groups.setdefault(r.op, []).append(r)
        for ax in axes[-1]:
            ax.axis("off")
        for ax, (op, rs) in zip(axes[-1], groups.items()):
            ax.axis("on")
            labels = list(OrderedDict.fromkeys(f"{r.case} {_shape(r)} {r.mode}" for r in rs))
            impls = list(OrderedDict.fromkeys(r.impl for r in rs))
            _bars(ax, labels, impls,
                  lambda impl, lab: next((r for r in rs if r.impl == impl and f"{r.case} {_shape(r)} {r.mode}" == lab), None))
            ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=6)
            ax.set_ylabel("median ms")
            ax.set_title(op)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    ops = args.op or list(OPS)
    features = args.features.split(",") if args.features else None
    if features:
        bad = [f for f in features if f not in bench_attention.FEATURES]
        if bad:
            print(f"--features: unknown {bad}; have {bench_attention.FEATURES}", file=sys.stderr)
            return 2
    shapes = None
    if args.shape:
        try:
            shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape]
            assert all(len(s) == 4 and min(s) > 0 for s in shapes)
        except (ValueError, AssertionError):
            print(f"--shape: expected B,H,N,D with 4 positive integers, got {args.shape}", file=sys.stderr)
            return 2
    model_shape = None
    if args.model_shape:
        try:
            model_shape = bench_model.parse_shape(args.model_shape)
        except ValueError as e:
            print(f"--model-shape: expected K=V,... with keys {bench_model.SHAPE_KEYS} and positive integers, "
                  f"bad item {e}", file=sys.stderr)
            return 2
    env = environment(device)
    notes = []
    if device == "cpu":
        notes.append("flex_attention: forward only on CPU (torch's flex_attention has no CPU backward); "
                     "the decode rows measure it on CUDA only")
    why = bench_model.classes()
    if "model" in ops and isinstance(why, str):
        print(f"model: skipped: {why}", file=sys.stderr)
        notes.append(f"model rows skipped: {why}")
    if args.busy < 0:
        print(f"--busy: expected a number of processes >= 0, got {args.busy}", file=sys.stderr)
        return 2
    counts = {"attention": lambda: bench_attention.count(device, args.full, features, shapes=shapes),
              "model": lambda: bench_model.count(device, args.full, busy=args.busy)}
    total = sum(counts.get(op, lambda: OPS[op].count(device, args.full))() for op in ops)
    print(f"xtk bench on {env['device_name']} ({device}, {str(dtype).replace('torch.', '')}, torch {env['torch']}, "
          f"{env['threads']} threads), {'full' if args.full else 'quick'} sweep: {total} cells", file=sys.stderr)
    bar, tick = _progress(total, not args.no_progress)
    results: list[Result] = []
    try:
        with frozen_gc():
            for op in ops:
                if op == "attention":
                    results += bench_attention.run(device, args.full, dtype, features=features, progress=tick,
                                                   shapes=shapes)
                elif op == "model":
                    results += bench_model.run(device, args.full, dtype, progress=tick, shape=model_shape,
                                               busy=args.busy)
                else:
                    results += OPS[op].run(device, args.full, dtype, progress=tick)
    finally:
        if bar is not None:
            bar.close()
    tables = summarize(results)
    print(render_text(tables))
    errors = [r for r in results if r.status.startswith("error")]
    for r in errors:
        print(f"  {r.op} {r.case} {r.impl} {r.mode}: {r.status}", file=sys.stderr)
    paths = {}
    if args.save:
        folder = os.path.join(args.save, device_slug(device))
        os.makedirs(folder, exist_ok=True)
        label = args.label or ("shapes" if shapes or model_shape else "full" if args.full else "quick")
        paths = {k: os.path.join(folder, f"{label}.{ext}") for k, ext in (("json", "json"), ("markdown", "md"), ("plot", "png"))}
    for key in ("json", "markdown", "plot"):
        if getattr(args, key):
            paths[key] = getattr(args, key)
    if "json" in paths:
        dump_json(paths["json"], env, results, argv)
        print(f"json written to {paths['json']}")
    if "markdown" in paths:
        with open(paths["markdown"], "w") as f:
            f.write(render_markdown(tables, env, argv, notes))
        print(f"markdown written to {paths['markdown']}")
    if "plot" in paths:
        print(plot(results, paths["plot"]))
    return 1 if errors else 0
