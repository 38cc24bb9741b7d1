"""Ahead-of-time compile of the attention kernel specializations, no GPU needed.

``python -m xtk.kernels.aot [--set ci|full] [--json PATH] [--jobs N]`` compiles every specialization of
the chosen set with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` using the
launcher's pinned configs (``attention_op.config``), and reports per specialization the shared
memory, the registers per thread and the spill bytes read from the ptxas log
(``TRITON_DUMP_PTXAS_LOG=1``; run with a fresh ``TRITON_CACHE_DIR``, or a cached kernel prints no
log), and whether the PTX uses tensor cores (``wgmma`` on sm_90, ``mma.sync`` on sm_80).
Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the jit functions).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import json
import os
import re
import sys
import time

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
KINDS = ("fwd", "thr", "dkdv", "dq")
_PTR_F32 = {"LSE", "THR", "DELTA", "DSLOPE", "DTAB", "DS", "DLSC", "SLOPES", "TAB", "QSC", "KSC", "DQSC", "DKSC", "INV_FREQ", "XPOS"}
_PTR_IO = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV_"}
_FLOAT_SCALARS = {"sm_scale", "dropout_p", "xpos_base", "interp"}
_UNIT_STRIDES = {"sqd", "skd", "svd", "sod", "sdod", "sdqd", "sdkd", "sdvd", "smn", "sbn"}
_DIV16_STRIDES = {"sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "som",
                  "sdob", "sdoh", "sdom", "sdqb", "sdqh", "sdqm", "sdkb", "sdkh", "sdkn", "sdvb", "sdvh", "sdvn"}
_TY = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _kernel(kind):
    from . import attention_bwd, attention_fwd
    return {"fwd": attention_fwd._attn_fwd, "thr": attention_fwd._attn_topk_threshold,
            "dkdv": attention_bwd._attn_bwd_dkdv, "dq": attention_bwd._attn_bwd_dq}[kind]


def spec_name(spec: dict) -> str:
    sw = ",".join(f"{k}={v}" for k, v in sorted(spec["switches"].items()))
    topk = f"/topk{spec['topk']}" if "topk" in spec else ""
    return f"{spec['kind']}/sm{spec['cc']}/d{spec['d']}/{spec['dtype']}/{sw}{topk}"


def build(spec: dict):
    """(fn, signature, constexprs, options) of one specialization.

    spec: kind, cc, d, dtype ('float16'...), switches (IS_CAUSAL, BIAS_KIND, MASK_KIND, HAS_TOPK,
    HAS_DROPOUT, NEED_DSLOPE, NEED_DTAB, NEED_DS, NEED_DLSC, and the in-kernel QK features HAS_NORM, GROUPS,
    HAS_DSCALE, HAS_ROT, HAS_XPOS; missing = off), topk (for HAS_TOPK)."""
    from . import attention_op
    fn = _kernel(spec["kind"])
    sw = dict(spec["switches"])
    d, ty = spec["d"], _TY[spec["dtype"]]
    topk = spec.get("topk", 8) if sw.get("HAS_TOPK") else 0
    qk = any(sw.get(n) for n in ("HAS_NORM", "HAS_DSCALE", "HAS_ROT"))
    cfg = attention_op.config(spec["kind"], d, d, spec["cc"], topk,
                              ieee=spec["dtype"] == "float32", qk=qk)
    prec = "ieee" if spec["dtype"] == "float32" else "tf32"
    constexprs = dict(IS_CAUSAL=bool(sw.get("IS_CAUSAL", 0)), BIAS_KIND=int(sw.get("BIAS_KIND", 0)),
                      MASK_KIND=int(sw.get("MASK_KIND", 0)), HAS_TOPK=bool(sw.get("HAS_TOPK", 0)),
                      HAS_DROPOUT=bool(sw.get("HAS_DROPOUT", 0)), PRECISION=prec,
                      NEED_DSLOPE=bool(sw.get("NEED_DSLOPE", 0)), NEED_DTAB=bool(sw.get("NEED_DTAB", 0)),
                      NEED_DS=bool(sw.get("NEED_DS", 0)), NEED_DLSC=bool(sw.get("NEED_DLSC", 0)), HAS_NORM=bool(sw.get("HAS_NORM", 0)),
                      GROUPS=int(sw.get("GROUPS", 1)), HAS_DSCALE=bool(sw.get("HAS_DSCALE", 0)),
                      HAS_ROT=bool(sw.get("HAS_ROT", 0)), HAS_XPOS=bool(sw.get("HAS_XPOS", 0)), K2=max(1, 1 << max(0, topk - 1).bit_length()),
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=attention_op.block_d(d),
                      BLOCK_DV=attention_op.block_d(d))
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    # as the JIT specializes a launch on contiguous q/k/v (last dim stride 1, which Triton turns
    # into a constant) and 16-byte aligned pointers / row strides (the tt.divisibility hint)
    for name in fn.arg_names:
        if name in _UNIT_STRIDES:
            constexprs[name] = 1
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name not in constexprs and (name.isupper() or name in _DIV16_STRIDES):
            attrs[(i,)] = [["tt.divisibility", 16]]
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _PTR_IO:
            signature[name] = "*" + ty
        elif name in _PTR_F32:
            signature[name] = "*fp32"
        elif name == "MASK":
            signature[name] = "*u8" if constexprs["MASK_KIND"] == 2 else "*" + ty
        elif name == "BIAS":
            signature[name] = "*u8" if constexprs["BIAS_KIND"] == 4 else "*" + ty
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return fn, signature, constexprs, attrs, options, cfg


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_spec(spec: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn, signature, constexprs, attrs, options, cfg = build(spec)
    log = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", spec["cc"], 32), options=options)
    text = log.getvalue()
    regs = [int(x) for x in _REGS.findall(text)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(text)]
    ptx = compiled.asm.get("ptx", "")
    return dict(name=spec_name(spec), spec=spec, config=cfg, shared=int(compiled.metadata.shared),
                smem_limit=SMEM_LIMIT[spec["cc"]], registers=max(regs) if regs else None,
                spill_bytes=max(spills) if spills else None, ptxas_log_found=bool(regs),
                tensor_cores=("wgmma.mma_async" in ptx) if spec["cc"] >= 90 else ("mma.sync" in ptx),
                mma_sync="mma.sync" in ptx,
                seconds=round(time.time() - t0, 2))


def spec_set(which: str = "ci") -> list[dict]:
    """The specializations to compile.

    'ci' (~270; 6-10 minutes with 2 jobs): every kernel plain at every head dim (32/64/128/256) on both
    archs; every switch value (each bias and mask kind, causal, top-k, dropout, each QK feature, each
    learned-input gradient) at every head dim on both archs, in a kernel that rotates with the head
    dim (the gradient switches in dq, where they live); the heaviest combinations (causal + ALiBi +
    bool mask + top-k + dropout, with and without all QK features) in every kernel at d 64, 128 and
    256 on both archs; fp32 (IEEE FMA tiles) and fp16 in every kernel at every head dim.
    'full' (XTK_FULL_TESTS=1): every switch value and the heavy combinations x every kernel x every
    head dim x both archs x the three dtypes."""
    specs = []

    def add(kind, cc, d, dtype="bfloat16", **sw):
        specs.append(dict(kind=kind, cc=cc, d=d, dtype=dtype, switches=sw))

    kinds = ("fwd", "dkdv", "dq")
    archs, dims = (80, 90), (32, 64, 128, 256)
    single = [dict(IS_CAUSAL=1), dict(BIAS_KIND=1), dict(BIAS_KIND=2), dict(BIAS_KIND=3), dict(BIAS_KIND=4),
              dict(MASK_KIND=1), dict(MASK_KIND=2), dict(HAS_TOPK=1), dict(HAS_DROPOUT=1)]
    heavy = dict(IS_CAUSAL=1, BIAS_KIND=1, MASK_KIND=2, HAS_TOPK=1, HAS_DROPOUT=1)
    qk_single = [dict(HAS_NORM=1), dict(HAS_NORM=1, GROUPS=2), dict(HAS_DSCALE=1), dict(HAS_ROT=1),
                 dict(HAS_ROT=1, HAS_XPOS=1)]
    qk_all = dict(HAS_NORM=1, GROUPS=2, HAS_DSCALE=1, HAS_ROT=1, HAS_XPOS=1)
    grads = [dict(BIAS_KIND=1, NEED_DSLOPE=1), dict(BIAS_KIND=2, NEED_DTAB=1), dict(BIAS_KIND=3, NEED_DS=1),
             dict(NEED_DLSC=1, **qk_all)]

    def heaviest(cc, d, dtype="bfloat16"):
        add("fwd", cc, d, dtype, **heavy)
        add("dkdv", cc, d, dtype, **heavy)
        add("dq", cc, d, dtype, **heavy, NEED_DSLOPE=1)
        for kind in kinds:
            add(kind, cc, d, dtype, **qk_all)
        add("thr", cc, d, dtype, HAS_TOPK=1, **qk_all)
        add("fwd", cc, d, dtype, **heavy, **qk_all)
        add("fwd", cc, d, dtype, **{**heavy, "HAS_TOPK": 0}, **qk_all)
        add("dkdv", cc, d, dtype, **heavy, **qk_all)
        add("dq", cc, d, dtype, **heavy, **qk_all, NEED_DSLOPE=1, NEED_DLSC=1)

    if which == "ci":
        grid = list(itertools.product(archs, dims))
        for cc, d in grid:
            for kind in kinds:
                add(kind, cc, d)
            add("thr", cc, d, HAS_TOPK=1)
        for i, sw in enumerate(single + qk_single + grads):
            for j, (cc, d) in enumerate(grid):
                kind = "dq" if any(n.startswith("NEED_") for n in sw) else kinds[(i + j) % 3]
                add(kind, cc, d, **sw)
        for cc, d in itertools.product(archs, (64, 128, 256)):
            heaviest(cc, d)
        for j, d in enumerate(dims):
            for kind in kinds:
                add(kind, archs[j % 2], d, "float32")
                add(kind, archs[(j + 1) % 2], d, "float16")
        for cc, kind in itertools.product(archs, kinds):
            add(kind, cc, 128, "float32", **qk_all)
        for cc, d in itertools.product(archs, (64, 128)):  # the largest top-k buffer (k = 128)
            add("thr", cc, d, HAS_TOPK=1)
            specs[-1]["topk"] = 128
    else:
        for cc, d, dtype in itertools.product(archs, dims, ("float16", "bfloat16", "float32")):
            for sw in [{}] + single + qk_single:
                for kind in kinds:
                    add(kind, cc, d, dtype, **sw)
            for sw in [{}] + qk_single:
                add("thr", cc, d, dtype, HAS_TOPK=1, **sw)
            for sw in grads:
                add("dq", cc, d, dtype, **sw)
            heaviest(cc, d, dtype)
    return specs


def _compile_or_error(spec: dict) -> dict:
    try:
        return compile_spec(spec)
    except Exception as e:  # reported, and the test fails on it
        return dict(name=spec_name(spec), spec=spec, error=f"{type(e).__name__}: {e}"[:2000])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="ci", choices=("ci", "full"))
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--only", default=None, help="substring filter on the specialization name")
    ap.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                    help="compile in this many processes (default: the CPU count, at most 8)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")
    specs = [sp for sp in spec_set(args.set) if not args.only or args.only in spec_name(sp)]
    results = []
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for r in pool.map(_compile_or_error, specs):
            results.append(r)
            print(json.dumps({k: r.get(k) for k in ("name", "shared", "registers", "spill_bytes", "tensor_cores",
                                                    "seconds", "error")}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
