"""``python -m xtk info`` (versions, device, extension, which backend auto picks and why),
``python -m xtk bench`` (the benchmark suite, see bench/) and ``python -m xtk gpucheck`` (prove and
time the kernels on a GPU, bench/gpucheck.py)."""
from __future__ import annotations

import argparse
import platform
import sys

import torch


def _versions() -> list[tuple[str, str]]:
    rows = [("python", platform.python_version()), ("torch", torch.__version__)]
    try:
        import triton
        rows.append(("triton", triton.__version__))
    except Exception as e:
        rows.append(("triton", f"not available ({type(e).__name__}: {e})"))
    try:
        import numpy
        rows.append(("numpy", numpy.__version__))
    except Exception as e:  # torch's tensor.numpy() and the Triton interpreter need it, xtk itself does not
        rows.append(("numpy", f"not installed ({type(e).__name__}: {e}): tensor.numpy() and TRITON_INTERPRET=1 need it"))
    rows.append(("torch CUDA", str(torch.version.cuda) if torch.version.cuda else "none (CPU build)"))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rows.append(("device", f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"))
    else:
        rows.append(("device", f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"))
    from . import _ext, backends
    ext = backends.load("rms_norm", "ext")
    if isinstance(ext, str):
        rows.append(("C++/CUDA extension", f"not usable: {ext}"))
    else:
        c = _ext.load()
        rows.append(("C++/CUDA extension", f"built (CPU loops: {c.cpu_isa}; CUDA: {'yes' if c.with_cuda else 'no'})"))
    import os
    rows.append(("XTK_BACKEND", os.environ.get("XTK_BACKEND", "auto (unset)")))
    rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")))
    return rows


def _sample_inputs(device: str, dtype):
    """One small representative call per op, to ask each backend whether it would run it."""
    from .ops import attention, attention_kvcache, glu, rms_norm
    from .bias import Alibi
    q = torch.zeros(1, 2, 4, 64, device=device, dtype=dtype)
    pages = torch.zeros(2, 1, 16, 64, device=device, dtype=dtype)
    return {
        "attention": attention._validate(q, q, q, None, 0.0, True, None, False, Alibi(torch.ones(2, device=device)),
                                         None, None, None, None, 0, None),
        "attention_with_kvcache": attention_kvcache.kvcache_inputs(
            q[:, :, :1], pages, pages, cache_seqlens=20, bias=Alibi(torch.ones(2, device=device)),
            block_table=torch.tensor([[1, 0]], dtype=torch.int32, device=device)),
        "rms_norm": rms_norm._validate(torch.zeros(4, 64, device=device, dtype=dtype), torch.ones(64, device=device, dtype=dtype), 1e-12, None),
        "glu": glu._validate(torch.zeros(4, 64, device=device, dtype=dtype), "gelu", gated=True),
        "activation": glu._validate(torch.zeros(4, 64, device=device, dtype=dtype), "relu_squared", gated=False),
    }


def info(out=sys.stdout) -> None:
    from . import backends
    w = max(len(k) for k, _ in _versions())
    print("xtk", __import__("xtk").__version__, file=out)
    for k, v in _versions():
        print(f"  {k:<{w}}  {v}", file=out)
    devices = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
    for device, dtype in devices:
        print(f"\nbackend choice for {device} {str(dtype).replace('torch.', '')} tensors (auto):", file=out)
        for op, inputs in _sample_inputs(device, dtype).items():
            rows = backends.explain(op, inputs)
            chosen = next((n for n, r in rows if not r), None)
            print(f"  {op}: auto -> {chosen}", file=out)
            for name, why in rows:
                mark = "ok" if not why else "; ".join(str(x) for x in why)
                print(f"      {name:<7} {mark}", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xtk", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    info_p = sub.add_parser("info", help="versions, device, extension, backend choice per op")
    info_p.add_argument("--model", metavar="EXPR", default=None,
                        help='a model constructor, e.g. "Decoder(dim=64, depth=2, heads=4, attn_talking_heads=True)": '
                             "lists the layers that cannot use a kernel and why; the names transformers and "
                             "x_transformers are in scope")
    info_p.add_argument("--patch", action="store_true",
                        help="patch the --model in place first (xtk.patch for x-transformers, "
                             "xtk.integrations.hf.patch for Hugging Face) and print what was swapped and kept")
    sub.add_parser("bench", help="benchmark suite (python -m xtk bench --help)", add_help=False)
    sub.add_parser("gpucheck", help="prove and time the kernels on this GPU (python -m xtk gpucheck --help)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.cmd in (None, "info"):
        info()
        if getattr(args, "model", None):
            from .introspect import print_model_report
            try:
                print_model_report(args.model, sys.stdout, patch=args.patch)
            except (TypeError, ValueError, RuntimeError, NameError, SyntaxError) as e:
                print(f"python -m xtk info: {type(e).__name__}: {e}", file=sys.stderr)
                return 2
        return 0
    if args.cmd == "bench":
        from .bench.cli import main as bench_main
        return bench_main(rest)
    if args.cmd == "gpucheck":
        from .bench.gpucheck import main as gpucheck_main
        return gpucheck_main(rest)
    parser.error(f"unknown command {args.cmd!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
