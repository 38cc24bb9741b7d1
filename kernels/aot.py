"""Ahead-of-time compile of the attention kernel specializations, no GPU needed.

``python -m xtk.kernels.aot [--set ci|full] [--json PATH] [--jobs N] [--only S]`` compiles every
specialization of the chosen set with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32))`` under the tile config the launcher picks (``kernels/tiles.py``; ``XTK_TILES`` applies), and
reports per specialization the shared memory, the registers per thread and the spill bytes read
from the ptxas log (``TRITON_DUMP_PTXAS_LOG=1``; run with a fresh ``TRITON_CACHE_DIR``, or a
cached kernel prints no log), and whether the PTX uses tensor cores (``wgmma`` on sm_90,
``mma.sync`` below). From the repo root ``python -m kernels.aot ...`` does the same with nothing
but triton installed (no torch, no xtk): CI runs it so in a triton==3.6.0 venv, the GPU image's.

``--pick`` is the tile search behind ``tiles_sm80.json`` / ``tiles_sm90.json``: for every table key
it walks ``tiles.candidates`` (largest first) and keeps the first tile under which every
representative specialization of the key's class (``reps``: the heaviest switch combinations of
that class and the lighter ones) compiles with no spill and fits shared memory, under this
Python's triton and, with ``--also PYTHON``, under another one's (``--also venv36/bin/python``).
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
import subprocess
import sys
import tempfile
import time

from . import kinds, tiles

KINDS = ("fwd", "thr", "dkdv", "dq", "decode", "combine", "qkrows")
ARCHS = (80, 90)
DIMS = tiles.HEAD_DIMS
_PTR_F32 = {"STATS", "THR", "DELTA", "DSLOPE", "DTAB", "DS", "DLSC", "SLOPES", "TAB", "QSC", "KSC", "DSC", "DSC_PART",
            "G", "INV_FREQ", "XPOS", "OP", "LSEP", "LSE", "SCR", "KTH"}
_PTR_I32 = {"SEQLENS", "BT", "ROWS", "CU_Q", "CU_K", "NANF"}  # the decode kernel's cache lengths, block table,
# cache rows; a packed batch's sequence offsets (VARLEN); the NaN-rule guard twins' device flag
_PTR_IO = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV_", "X", "Y"}
_PTR_I64 = {"SEED", "SEED_PTR", "SEEDS"}  # a device-side dropout seed / philox state, if the kernels take one
_FLOAT_SCALARS = {"sm_scale", "dropout_p", "xpos_base", "interp"}
_INT_UPPER = {"H", "HK", "NQ", "NK", "D", "DV", "TOPK", "R", "B", "NEW", "SPLITS", "ROWS_TOTAL", "HEADS"}  # sizes (all other upper-case names are pointers)
_UNIT_STRIDES = {"sqd", "skd", "svd", "sod", "sdod", "sdqd", "sdkd", "sdvd", "smn", "sbn", "sxd", "sgd", "syd"}
_DIV16_STRIDES = {"sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "som",
                  "sdob", "sdoh", "sdom", "sdqb", "sdqh", "sdqm", "sdkb", "sdkh", "sdkn", "sdvb", "sdvh", "sdvn",
                  "sxb", "sxh", "sxn", "sgb", "sgh", "sgn", "syb", "syh", "syn"}
_TY = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_SWITCHES = ("IS_CAUSAL", "BIAS_KIND", "MASK_KIND", "HAS_TOPK", "HAS_DROPOUT", "NEED_DSLOPE", "NEED_DTAB", "NEED_DS",
             "NEED_DLSC", "HAS_NORM", "GROUPS", "HAS_DSCALE", "HAS_ROT", "HAS_XPOS", "GQA_REPEAT", "PAGED", "TOPK_PASS",
             "VARLEN", "NAN_GUARD", "IS_KEY", "BACKWARD", "GROUP_SPLIT")
_INT_SWITCHES = ("BIAS_KIND", "MASK_KIND", "TOPK_PASS", "NAN_GUARD")
_COMBINE_CFG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)  # the combine kernel: no table entry
MAX_SPLITS = 128  # attention_decode_op.MAX_SPLITS (the combine's lse vector; that module imports torch)


def _kernel(kind):
    from . import attention_bwd, attention_decode, attention_fwd, attention_qk
    return {"fwd": attention_fwd._attn_fwd, "thr": attention_fwd._attn_topk_threshold,
            "dkdv": attention_bwd._attn_bwd_dkdv, "dq": attention_bwd._attn_bwd_dq,
            "decode": attention_decode._decode_split, "combine": attention_decode._decode_combine,
            "qkrows": attention_qk._qk_rows}[kind]


def _fixed_config(kind: str, d: int) -> dict | None:
    """The tile of a kernel that has no table entry (the decode combine, the QK row kernel), else None."""
    if kind == "combine":
        return _COMBINE_CFG
    if kind == "qkrows":
        from .attention_qk import rows_config
        return rows_config(d)
    return None


# ----------------------------------------------------------------------------- one specialization

def spec(kind: str, cc: int, d: int, precision: str = "16bit", dtype: str | None = None, topk: int | None = None,
         **switches) -> dict:
    """One specialization: kernel kind, arch, head dim (d = dv), table precision ('16bit' | 'tf32' |
    'ieee'), input dtype (bfloat16 for 16bit unless given; float32 otherwise), switches (missing =
    off), topk (the top-k whose buffer the thr kernel holds; 8 unless given)."""
    dtype = dtype or ("bfloat16" if precision == "16bit" else "float32")
    s = dict(kind=kind, cc=cc, d=d, precision=precision, dtype=dtype, switches=switches)
    if topk is not None:
        s["topk"] = topk
    return s


def spec_name(s: dict) -> str:
    sw = ",".join(f"{k}={v}" for k, v in sorted(s["switches"].items()))
    topk = f"/topk{s['topk']}" if "topk" in s else ""
    ty = "tf32" if s.get("precision") == "tf32" else s["dtype"]
    return f"{s['kind']}/sm{s['cc']}/d{s['d']}/{ty}/{sw}{topk}"


def spec_cls(s: dict) -> str:
    """The specialization class the launcher computes for this spec's switches (QK features make a
    class of their own only in the decode kernel, the one that has them as switches)."""
    sw = s["switches"]
    qk = s["kind"] == "decode" and any(sw.get(n) for n in ("HAS_NORM", "HAS_DSCALE", "HAS_ROT"))
    cls = tiles.spec_class(int(sw.get("BIAS_KIND", 0)), int(sw.get("MASK_KIND", 0)), bool(sw.get("HAS_TOPK")),
                           bool(sw.get("HAS_DROPOUT")), qk)
    return tiles.dq_class(cls, bool(sw.get("NEED_DLSC"))) if s["kind"] == "dq" else cls


def _topk(s: dict) -> int:
    return s.get("topk", 8) if s["switches"].get("HAS_TOPK") or s["kind"] == "thr" else 0


def _not_specialized(fn) -> set:
    """Names of the kernel's ``do_not_specialize`` integers (the per-decode-step ones): the JIT
    gives them no divisibility hint, so neither does the AOT build."""
    names = getattr(fn, "do_not_specialize", None) or ()
    return {fn.arg_names[x] if isinstance(x, int) else x for x in names}


def _signature(fn, constexprs: dict, ty: str):
    """(signature, attrs) of a launch with contiguous 16-byte aligned tensors, as the JIT specializes it."""
    signature, attrs = {}, {}
    plain = _not_specialized(fn)
    for i, name in enumerate(fn.arg_names):
        if name not in constexprs and name not in plain and (name.isupper() or name in _DIV16_STRIDES):
            attrs[(i,)] = [["tt.divisibility", 16]]
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _PTR_IO:
            signature[name] = "*" + ty
        elif name in _PTR_F32:
            signature[name] = "*fp32"
        elif name in _PTR_I64:
            signature[name] = "*i64"
        elif name in _PTR_I32:
            signature[name] = "*i32"
        elif name == "MASK":
            signature[name] = "*u8" if constexprs["MASK_KIND"] == kinds.MASK_BOOL else "*" + ty
        elif name == "BIAS":
            signature[name] = "*u8" if constexprs["BIAS_KIND"] == kinds.BIAS_DENSE_BOOL else "*" + ty
        elif name.isupper() and name not in _INT_UPPER:
            raise ValueError(f"aot: kernel {fn.__name__} has a parameter {name} this tool does not know: "
                             f"add it to one of aot.py's _PTR_* sets (or to the scalars)")
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, attrs


def build(s: dict, cfg: dict | None = None):
    """(fn, signature, constexprs, attrs, options, cfg) of one specialization; ``cfg`` (BLOCK_M,
    BLOCK_N, num_warps, num_stages) defaults to the launcher's ``tiles.config``."""
    fn = _kernel(s["kind"])
    sw = dict(s["switches"])
    d, ty = s["d"], _TY[s["dtype"]]
    topk = _topk(s)
    if cfg is None:
        cfg = _fixed_config(s["kind"], d) or tiles.config(s["kind"], d, d, s["cc"], topk, s["precision"], spec_cls(s))
    constexprs = {n: int(sw.get(n, 0)) if n in _INT_SWITCHES else bool(sw.get(n, 0)) for n in _SWITCHES}
    constexprs.update(GROUPS=int(sw.get("GROUPS", 1)), PRECISION="ieee" if s["precision"] == "ieee" else "tf32",
                      K2=1 << max(0, topk - 1).bit_length(), BLOCK_M=cfg.get("BLOCK_M"), BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_D=tiles.block_d(d), BLOCK_DV=tiles.block_d(d), PAGE=int(sw.get("PAGE", 16)),
                      BLOCK_S=MAX_SPLITS)
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    for name in fn.arg_names:  # contiguous last dims: the JIT turns a stride of 1 into a constant
        if name in _UNIT_STRIDES:
            constexprs[name] = 1
    signature, attrs = _signature(fn, constexprs, ty)
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return fn, signature, constexprs, attrs, options, cfg


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def launcher_key(s: dict, arch: int | None = None) -> str:
    """The table key ``tiles.config`` reads for spec ``s`` on ``arch`` (default: the spec's cc)."""
    arch = arch or s["cc"]
    if _fixed_config(s["kind"], s["d"]):
        return None  # a fixed config, no table entry
    bd, cls = tiles.padded_head_dim(s["d"], s["d"]), spec_cls(s)
    k, entry = tiles.lookup(s["kind"], arch, bd, s["precision"], cls)
    if s["kind"] == "thr" and (1 << max(0, _topk(s) - 1).bit_length()) > min(entry[1], tiles.THR_K2):
        k, _ = tiles.lookup("thrwide", arch, bd, s["precision"], cls)
    return k


def smem_limit(s: dict) -> int:
    """The shared memory (bytes per block) the launcher's config for ``s`` must fit: the smallest
    limit among the archs running that tile (an sm80 tile runs on sm_86/89 too unless the file's
    ``smem99`` entries, or an XTK_TILES file for sm_86, give those another)."""
    if s["cc"] != 80 or _fixed_config(s["kind"], s["d"]):
        return tiles.SMEM_LIMIT[s["cc"]]
    args, rest = (s["kind"], s["d"], s["d"]), (_topk(s), s["precision"], spec_cls(s))
    try:
        same = tiles.config(*args, 86, *rest) == tiles.config(*args, 80, *rest)
    except tiles.UnsupportedConfig:  # refused on sm_86/89 (an smem99 null): only sm_80/87 run it
        same = False
    return tiles.SMEM_LIMIT[86] if same else tiles.SMEM_LIMIT[80]


def compile_spec(s: dict, cfg: dict | None = None) -> dict:
    """Compile one specialization; -> name, spec, cls, config, shared, smem_limit, registers,
    spill_bytes, ptxas_log_found, tensor_cores, mma_sync, seconds, triton."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    limit = smem_limit(s) if cfg is None else tiles.SMEM_LIMIT[s["cc"]]  # the launcher's tile, or a candidate
    key = launcher_key(s) if cfg is None else None
    fn, signature, constexprs, attrs, options, cfg = build(s, cfg)
    log = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(log), tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: a cached kernel prints no ptxas log
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", s["cc"], 32), options=options)
    text = log.getvalue()
    regs = [int(x) for x in _REGS.findall(text)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(text)]
    ptx = compiled.asm.get("ptx", "")
    return dict(name=spec_name(s), spec=s, cls=spec_cls(s), config=cfg, key=key,
                shared=int(compiled.metadata.shared),
                smem_limit=limit, registers=max(regs) if regs else None,
                spill_bytes=max(spills) if spills else None, ptxas_log_found=bool(regs),
                tensor_cores=("wgmma.mma_async" in ptx) if s["cc"] >= 90 else ("mma.sync" in ptx),
                mma_sync="mma.sync" in ptx, seconds=round(time.time() - t0, 2), triton=triton.__version__)


def _compile_or_error(job) -> dict:
    s, cfg = job if isinstance(job, tuple) else (job, None)
    try:
        return compile_spec(s, cfg)
    except Exception as e:  # reported, and the test fails on it
        import triton
        return dict(name=spec_name(s), spec=s, cls=spec_cls(s), config=cfg, error=f"{type(e).__name__}: {e}"[:2000],
                    triton=triton.__version__)


def verdict(r: dict) -> str | None:
    """None if the result is clean (compiled, fits its shared-memory limit, no spill), else why not."""
    if "error" in r:
        return "error: " + r["error"].splitlines()[0][:300] if r["error"] else "error"
    if r["shared"] > r["smem_limit"]:
        return f"shared {r['shared']} B > {r['smem_limit']} B"
    if not r["ptxas_log_found"]:
        return "no ptxas log (cached kernel? use a fresh TRITON_CACHE_DIR)"
    if r["spill_bytes"]:
        return f"{r['spill_bytes']} B spilled ({r['registers']} registers)"
    return None


# ----------------------------------------------------------------------------- representatives of a class

_QK_ALL = dict(HAS_NORM=1, GROUPS=2, HAS_DSCALE=1, HAS_ROT=1, HAS_XPOS=1)  # the decode kernel's and the row kernel's
# per class of fwd/thr/dkdv/dq, the heaviest switch combinations: each also holds every lighter
# class's switches (ALiBi + a bool mask, the third dense combination, is lighter than both dense ones
# here: the CI set compiles it alone per switch; plain without causal is a subset of causal's code),
# but for top-k, which posbias holds and dense does not (dense with top-k is heavy: ``spec_class``):
# an entry shared by both is compiled with each one's representative (``_entry_specs``).
# NEED_DLSC (a learned QK-norm scale's gradient) takes the dq kernel's heavy tile (``tiles.dq_class``).
_CLASS_REPS = {
    "plain": [dict(IS_CAUSAL=1)],
    "posbias": [dict(IS_CAUSAL=1, BIAS_KIND=kinds.BIAS_TABLE, NEED_DTAB=1, HAS_TOPK=1),
                dict(IS_CAUSAL=1, BIAS_KIND=kinds.BIAS_ALIBI, NEED_DSLOPE=1, HAS_TOPK=1)],
    "dense": [dict(IS_CAUSAL=1, BIAS_KIND=kinds.BIAS_TABLE, MASK_KIND=kinds.MASK_FLOAT, NEED_DTAB=1),
              dict(IS_CAUSAL=1, BIAS_KIND=kinds.BIAS_DENSE_FLOAT, MASK_KIND=kinds.MASK_FLOAT, NEED_DS=1)],
}
_CLASS_REPS["heavy"] = [dict(r, NEED_DLSC=1, HAS_TOPK=1, HAS_DROPOUT=1) for r in _CLASS_REPS["dense"]]


# the decode kernel (kernels/attention_decode.py): two table classes, posbias (plain falls back to it)
# and qk, their representatives the paged cache with each position bias (and every QK feature)
_DECODE_POSBIAS = [dict(IS_CAUSAL=1, PAGED=1, PAGE=64, BIAS_KIND=kinds.BIAS_TABLE),
                   dict(IS_CAUSAL=1, PAGED=1, PAGE=64, BIAS_KIND=kinds.BIAS_ALIBI, GQA_REPEAT=1)]
_DECODE_REPS = {"posbias": _DECODE_POSBIAS, "qk": [dict(sw, **_QK_ALL) for sw in _DECODE_POSBIAS]}


def reps(kind: str, cc: int, bd: int, precision: str, cls: str, cfg: dict | None = None) -> list[dict]:
    """The specializations a table entry must compile cleanly: the heaviest of its class, heaviest first.
    thr holds the widest top-k buffer it serves (min(BLOCK_N, 32); thrwide: 128), with the heaviest
    representative only (its compiles take 10-40 s)."""
    if kind == "decode":
        return [spec(kind, cc, bd, precision, **sw) for sw in _DECODE_REPS[cls]]
    name = "thr" if kind == "thrwide" else kind
    out = []
    for sw in _CLASS_REPS[cls][:1] if name == "thr" else _CLASS_REPS[cls]:
        sw = {k: v for k, v in sw.items() if not (name != "dq" and k.startswith("NEED_"))}
        if name == "thr":
            sw = dict({k: v for k, v in sw.items() if k != "HAS_DROPOUT"}, HAS_TOPK=1)
            topk = tiles.MAX_TOPK if kind == "thrwide" else min(cfg["BLOCK_N"] if cfg else 16, tiles.THR_K2)
            out.append(spec(name, cc, bd, precision, topk=topk, **sw))
        else:
            out.append(spec(name, cc, bd, precision, **sw))
    uniq = {spec_name(s): s for s in out}
    return list(uniq.values())


# ----------------------------------------------------------------------------- the covering sets

def _table_keys(arch: int):
    """Every (kind, cls, precision, bd) the tables hold for table arch ``arch``: every class but qk
    (the decode kernel's) at 16 bit and TF32; exact fp32 (FMA tiles, register-bound whatever the
    switches) holds plain and heavy, the classes between fall back to heavy (tiles.lookup); decode
    holds posbias (plain falls back to it) and qk, except where no qk tile compiles spill-free
    (there the kernel refuses QK features)."""
    for prec, bd in itertools.product(tiles.PRECISIONS, DIMS):
        for kind in ("fwd", "dkdv", "dq"):
            for cls in (tiles.ATTN_CLASSES if prec != "ieee" else ("plain", "heavy")):
                yield kind, cls, prec, bd
        yield "thr", "heavy", prec, bd
        yield "thrwide", "heavy", prec, bd
        yield "decode", "posbias", prec, bd
        yield "decode", "qk", prec, bd


def _entry_specs(cc: int, lookup_arch: int) -> list[dict]:
    """One spec per distinct tile entry of each (kind, precision, bd): the heaviest representative of
    the heaviest class that uses it (lighter classes with the same tile are subsets of it), and a
    lighter class's own where it holds a switch that one lacks (posbias's top-k beside dense)."""
    out = []
    groups = {}
    for kind, cls, prec, bd in _table_keys(80 if cc < 90 else 90):
        if kind == "decode" and not _has_entry(kind, lookup_arch, bd, prec, cls):
            continue  # no spill-free tile: the launcher refuses these launches (tiles.py)
        k, entry = tiles.lookup(kind, lookup_arch, bd, prec, cls)
        groups.setdefault((kind, prec, bd, entry), []).append(cls)
    for (kind, prec, bd, entry), classes in groups.items():
        cfg = dict(BLOCK_M=entry[0], BLOCK_N=entry[1])
        heaviest = reps(kind, cc, bd, prec, classes[-1], cfg)[0]
        out.append(heaviest)
        for cls in classes[:-1]:  # a lighter class with a switch the heaviest lacks (top-k in posbias)
            rep = reps(kind, cc, bd, prec, cls, cfg)[0]
            if set(rep["switches"]) - set(heaviest["switches"]):
                out.append(rep)
    return out


def _ci_set() -> list[dict]:
    """The CI covering set.

    1. every distinct entry of both tables (each kind x precision x head dim x class group), with
       the heaviest representative of its heaviest class; the sm80 table's 99 KB entries for sm_86/89;
    2. every switch value alone at two head dims on both archs, in a kernel and precision that
       rotate (the gradient switches in dq, where they live);
    3. plain without causal at every head dim (fp16 and bf16), the top-k buffer at k = 1 (the
       running maximum; k = 128, the widest, is every thrwide entry's in 1);
    4. dK/dV's GROUP_SPLIT kernel (the GQA group split over programs where the grid is small, a
       switch the class representatives do not hold; it changes the prologue and the store's head
       only) at every 16-bit dK/dV entry of 1 and at the TF32 and exact-fp32 ones of head dim 128."""
    specs = []
    for cc in ARCHS:
        specs += _entry_specs(cc, cc)
    smem99 = tiles.shipped(80)["smem99"]
    for k in smem99:
        if smem99[k] is None:
            continue  # refused on sm_86/89: nothing to compile
        kind, cls, prec, bd = k.split("/")
        specs.append(reps(kind, 86, int(bd[1:]), prec, cls)[0])
    specs += [dict(s, switches=dict(s["switches"], GROUP_SPLIT=1)) for s in specs
              if s["kind"] == "dkdv" and (s["precision"] == "16bit" or s["d"] == 128)]
    single = [dict(IS_CAUSAL=1), dict(BIAS_KIND=kinds.BIAS_ALIBI), dict(BIAS_KIND=kinds.BIAS_TABLE),
              dict(BIAS_KIND=kinds.BIAS_DENSE_FLOAT), dict(BIAS_KIND=kinds.BIAS_DENSE_BOOL),
              dict(MASK_KIND=kinds.MASK_FLOAT), dict(MASK_KIND=kinds.MASK_BOOL), dict(HAS_TOPK=1), dict(HAS_DROPOUT=1),
              # the learned QK-norm scale's gradient with each class's switches in dq, at the heavy tile
              # (five entries where the in-kernel QK switches were: the rotation after them stays as it was)
              dict(NEED_DLSC=1), dict(NEED_DLSC=1, IS_CAUSAL=1), dict(NEED_DLSC=1, MASK_KIND=kinds.MASK_BOOL),
              dict(NEED_DLSC=1, BIAS_KIND=kinds.BIAS_ALIBI, NEED_DSLOPE=1),
              dict(NEED_DLSC=1, BIAS_KIND=kinds.BIAS_TABLE, NEED_DTAB=1)]
    grads = [dict(BIAS_KIND=kinds.BIAS_ALIBI, NEED_DSLOPE=1), dict(BIAS_KIND=kinds.BIAS_TABLE, NEED_DTAB=1),
             dict(BIAS_KIND=kinds.BIAS_DENSE_FLOAT, NEED_DS=1), dict(NEED_DLSC=1, HAS_TOPK=1, HAS_DROPOUT=1)]
    grid = list(itertools.product(ARCHS, DIMS))
    precs = ("16bit", "tf32", "ieee")
    # GQA_REPEAT last: a switch inserted earlier moves the others' (kind, arch, dim, precision) rotation
    for i, sw in enumerate(single + grads + [dict(IS_CAUSAL=1, GQA_REPEAT=1)]):
        for j, (cc, d) in enumerate(grid):
            if (i + j) % 2:
                continue  # each switch at two head dims on both archs
            kind = "dq" if any(n.startswith("NEED_") for n in sw) else ("fwd", "dkdv", "dq")[(i + j) % 3]
            specs.append(spec(kind, cc, d, precs[(i + j // 2) % 3], **sw))
    for j, (cc, d) in enumerate(grid):  # plain without causal, both 16-bit types
        specs.append(spec(("fwd", "dkdv", "dq")[j % 3], cc, d, "16bit", dtype="float16" if j % 2 else "bfloat16"))
    for cc, prec in itertools.product(ARCHS, precs):
        specs.append(spec("thr", cc, 64, prec, topk=1, HAS_TOPK=1))
    specs += _NOT_MONOTONE + _decode_specs() + _varlen_specs() + _GUARD_TWINS + _qk_rows_specs()
    return list({spec_name(s): s for s in specs}.values())


# the packed-batch switch (xtk.attention_varlen's one launch): every switch combination it runs --
# no dense bias or attn_mask there, so its heaviest is a distance table with top-k and dropout (the
# heavy class's tile) and the learned QK-norm scale's gradient -- in the four kernels on both archs
_VARLEN = [dict(IS_CAUSAL=1), dict(IS_CAUSAL=1, BIAS_KIND=kinds.BIAS_ALIBI, NEED_DSLOPE=1),
           dict(BIAS_KIND=kinds.BIAS_TABLE, NEED_DTAB=1, GQA_REPEAT=1),
           dict(IS_CAUSAL=1, BIAS_KIND=kinds.BIAS_TABLE, NEED_DTAB=1, NEED_DLSC=1, HAS_TOPK=1, HAS_DROPOUT=1)]


def _varlen_specs() -> list[dict]:
    """VARLEN with each of ``_VARLEN`` in fwd, dkdv and dq on both archs (head dims 64 and 128 and the
    three precisions rotating; the gradient switches only in dq), the top-k threshold pass with the
    heaviest at both head dims, and the heaviest at 16 bit d128 (the widest shipped tile) everywhere."""
    specs = []
    precs = ("16bit", "tf32", "ieee")
    for cc in ARCHS:
        for i, sw in enumerate(_VARLEN):
            for j, kind in enumerate(("fwd", "dkdv", "dq")):
                sw_k = {k: v for k, v in sw.items() if kind == "dq" or not k.startswith("NEED_")}
                specs.append(spec(kind, cc, (64, 128)[(i + j) % 2], precs[(i + j) % 3], VARLEN=1, **sw_k))
                if i == len(_VARLEN) - 1:
                    specs.append(spec(kind, cc, 128, "16bit", VARLEN=1, **sw_k))
        heavy = {k: v for k, v in _VARLEN[-1].items() if not k.startswith("NEED_") and k != "HAS_DROPOUT"}
        for d, prec in ((64, "tf32"), (128, "16bit")):
            specs.append(spec("thr", cc, d, prec, topk=16, VARLEN=1, **heavy))
    return specs


def _has_entry(kind: str, arch: int, bd: int, precision: str, cls: str) -> bool:
    """Whether the tables hold a tile for this key (or a heavier class's)."""
    try:
        tiles.lookup(kind, arch, bd, precision, cls)
    except tiles.TileConfigError:
        return False
    return True


def _decode_specs() -> list[dict]:
    """The decode kernel's switches one at a time (a contiguous cache unless PAGED), each at two head
    dims on both archs with a rotating precision (where a tile ships: none for the keys whose every
    candidate spills, whose launches are refused), and the combine kernel at every head dim."""
    single = [dict(), dict(IS_CAUSAL=1), dict(BIAS_KIND=kinds.BIAS_ALIBI), dict(BIAS_KIND=kinds.BIAS_TABLE),
              dict(HAS_NORM=1, GROUPS=2, HAS_DSCALE=1), dict(HAS_ROT=1, HAS_XPOS=1), dict(GQA_REPEAT=1),
              dict(PAGED=1, PAGE=16), dict(PAGED=1, PAGE=48, IS_CAUSAL=1)]
    specs = []
    for i, sw in enumerate(single):
        for j, (cc, d) in enumerate(itertools.product(ARCHS, DIMS)):
            s = spec("decode", cc, d, ("16bit", "tf32", "ieee")[(i + j // 2) % 3], **sw)
            if (i + j) % 2 == 0 and _has_entry("decode", cc, d, s["precision"], spec_cls(s)):
                specs.append(s)
    for cc, d in itertools.product(ARCHS, DIMS):
        specs.append(spec("combine", cc, d, "16bit", dtype="float16" if d % 64 else "bfloat16"))
    return specs + [s for s in _DECODE_TOPK if _has_entry("decode", s["cc"], s["d"], s["precision"], spec_cls(s))]


# top-k's two passes of the decode kernel (TOPK_PASS 1: logits to the scratch, 2: the masked
# attention), the second also with the heaviest switches (every QK feature, a table, pages)
_DECODE_TOPK = [spec("decode", 80, 128, "16bit", TOPK_PASS=kinds.TOPK_LOGITS, PAGED=1, PAGE=16, IS_CAUSAL=1),
                spec("decode", 90, 64, "ieee", TOPK_PASS=kinds.TOPK_LOGITS, BIAS_KIND=kinds.BIAS_TABLE),
                spec("decode", 80, 64, "tf32", TOPK_PASS=kinds.TOPK_MASK, BIAS_KIND=kinds.BIAS_ALIBI),
                spec("decode", 90, 128, "16bit", TOPK_PASS=kinds.TOPK_MASK, PAGED=1, PAGE=64, IS_CAUSAL=1),
                spec("decode", 80, 256, "16bit", TOPK_PASS=kinds.TOPK_MASK, PAGED=1, PAGE=64, IS_CAUSAL=1,
                     BIAS_KIND=kinds.BIAS_TABLE, **_QK_ALL),
                spec("decode", 90, 128, "tf32", TOPK_PASS=kinds.TOPK_MASK, PAGED=1, PAGE=64, IS_CAUSAL=1,
                     BIAS_KIND=kinds.BIAS_TABLE, **_QK_ALL)]


# non-causal variants that spill where their class's causal representatives do not (ptxas is not
# monotone in the switches; found 2026-11-27 when the rotation above shifted): kept in the set, each
# bounded by its key's spill_ok
_NOT_MONOTONE = [spec("dq", 80, 64, "16bit", BIAS_KIND=kinds.BIAS_ALIBI, NEED_DSLOPE=1),
                 spec("dq", 80, 64, "ieee", BIAS_KIND=kinds.BIAS_DENSE_FLOAT, NEED_DS=1),
                 spec("dq", 90, 128, "16bit", NEED_DLSC=1),
                 spec("dq", 90, 32, "ieee", NEED_DLSC=1)]


# the NaN rule's guard twins (NAN_GUARD, kernels/attention_op.py): each kernel's twin once per arch
# with the switches that shape its selects (a float mask, causal, a learned bias gradient), so that
# each compiles and fits its shared memory. The flagged twins (1) run only on inputs holding NaN/inf:
# their spills are recorded, not refused (``twin_spill_ok``); the empty-row twin (fwd 2) runs after
# every forward without a float mask and must not spill.
_GUARD_TWINS = [spec("fwd", 90, 128, "16bit", IS_CAUSAL=1, MASK_KIND=kinds.MASK_FLOAT, NAN_GUARD=1),
                spec("fwd", 80, 64, "tf32", BIAS_KIND=kinds.BIAS_DENSE_FLOAT, NAN_GUARD=1),
                spec("fwd", 90, 64, "16bit", IS_CAUSAL=1, NAN_GUARD=2),
                spec("fwd", 80, 128, "16bit", MASK_KIND=kinds.MASK_BOOL, NAN_GUARD=2),
                spec("thr", 90, 64, "16bit", topk=8, HAS_TOPK=1, MASK_KIND=kinds.MASK_FLOAT, NAN_GUARD=1),
                spec("dkdv", 90, 128, "16bit", IS_CAUSAL=1, NAN_GUARD=1),
                spec("dkdv", 80, 64, "tf32", MASK_KIND=kinds.MASK_FLOAT, NAN_GUARD=1),
                spec("dq", 90, 128, "16bit", IS_CAUSAL=1, BIAS_KIND=kinds.BIAS_ALIBI, NEED_DSLOPE=1, NAN_GUARD=1),
                spec("dq", 80, 64, "16bit", IS_CAUSAL=1, BIAS_KIND=kinds.BIAS_TABLE, NEED_DTAB=1, NAN_GUARD=1)]


def _qk_rows_specs() -> list[dict]:
    """The QK row kernel (kernels/attention_qk.py) on both archs at every head dim: forward and
    backward, q rows and k rows, every feature at once in the three dtypes, each feature alone, and
    the packed batch."""
    specs = []
    dtypes = ("bfloat16", "float16", "float32")
    alone = [dict(HAS_NORM=1), dict(HAS_NORM=1, GROUPS=2, HAS_DSCALE=1), dict(HAS_ROT=1), dict(HAS_ROT=1, HAS_XPOS=1)]
    for j, (cc, d) in enumerate(itertools.product(ARCHS, DIMS)):
        for backward, is_key in itertools.product((0, 1), (0, 1)):
            dtype = dtypes[(j + 2 * backward + is_key) % 3]
            specs.append(spec("qkrows", cc, d, "ieee" if dtype == "float32" else "16bit", dtype=dtype,
                              BACKWARD=backward, IS_KEY=is_key, **_QK_ALL))
        for i, sw in enumerate(alone):
            specs.append(spec("qkrows", cc, d, "16bit", BACKWARD=(i + j) % 2, IS_KEY=i % 2, **sw))
        specs.append(spec("qkrows", cc, d, "16bit", BACKWARD=j % 2, IS_KEY=(j // 2) % 2, VARLEN=1, **_QK_ALL))
    return specs


def twin_spill_ok(s: dict) -> bool:
    """Whether a specialization may spill because it is a flagged guard twin (see ``_GUARD_TWINS``)."""
    return s["switches"].get("NAN_GUARD") == 1


def _full_set() -> list[dict]:
    """Every representative of every key of both tables (and the 99 KB entries), plus the CI set."""
    specs = _ci_set()
    for cc in ARCHS:
        for kind, cls, prec, bd in _table_keys(cc):
            if kind == "decode" and not _has_entry(kind, cc, bd, prec, cls):
                continue
            specs += reps(kind, cc, bd, prec, cls, tiles.config(kind, bd, bd, cc, tiles.MAX_TOPK if kind == "thrwide"
                                                                  else 0, prec, cls))
    return list({spec_name(s): s for s in specs}.values())


def spec_set(which: str = "ci") -> list[dict]:
    """The specializations to compile: 'ci' (_ci_set) or 'full' (_full_set, XTK_FULL_TESTS=1)."""
    return _ci_set() if which == "ci" else _full_set()


# ----------------------------------------------------------------------------- running

def run_jobs(jobs: list, n_procs: int, echo: bool = False) -> list[dict]:
    """Compile ``jobs`` (specs, or (spec, cfg) pairs) in ``n_procs`` processes; results in order."""
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")
    results = []
    with concurrent.futures.ProcessPoolExecutor(max(1, n_procs)) as pool:
        for r in pool.map(_compile_or_error, jobs):
            results.append(r)
            if echo:
                print(json.dumps({k: r.get(k) for k in ("name", "config", "shared", "registers", "spill_bytes",
                                                        "tensor_cores", "seconds", "error")}), flush=True)
    return results


def _run_elsewhere(python: str, jobs: list, n_procs: int) -> list[dict]:
    """Compile ``jobs`` under another Python (another triton) with ``python -m kernels.aot --jobs-file``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "jobs.json"), os.path.join(tmp, "out.json")
        with open(src, "w") as f:
            json.dump([[s, c] for s, c in jobs], f)
        env = dict(os.environ, PYTHONPATH=root, TRITON_DUMP_PTXAS_LOG="1")
        env.pop("TRITON_INTERPRET", None)
        subprocess.run([python, "-m", "kernels.aot", "--jobs-file", src, "--json", dst, "--jobs", str(n_procs)],
                       cwd=root, env=env, check=True)
        with open(dst) as f:
            return json.load(f)


def estimate(kind: str, bd: int, precision: str, tile, smem: int) -> str | None:
    """Why a candidate tile cannot compile cleanly, from lower bounds alone (None: compile it).

    Shared memory: the operand tiles each loop iteration loads (fwd/dq: the K and V tiles; dK/dV:
    the q and dO tiles; thr: K), times ``num_stages - 1`` buffers at least. Registers: the fp32
    accumulators per thread (fwd: BLOCK_M x d, dK/dV: 2 x BLOCK_N x d, dQ: BLOCK_M x d) past 192
    of the 255 a thread has leave too little for the rest: a certain spill."""
    bm, bn, warps, stages = tile
    esize = 2 if precision == "16bit" else 4
    per = {"fwd": bn * 2 * bd, "decode": bn * 2 * bd, "dq": bn * 2 * bd, "dkdv": bm * 2 * bd}.get(kind, bn * bd)
    if per * esize * max(1, stages - 1) > smem:
        return f"estimate: shared >= {per * esize * max(1, stages - 1)} B > {smem} B"
    acc = {"fwd": bm * bd, "decode": bm * bd, "dq": bm * bd, "dkdv": 2 * bn * bd}.get(kind, 0) / (32 * warps)
    if acc > 192:
        return f"estimate: {acc:.0f} accumulator registers per thread > 192"
    return None


def pick(arch_list, n_procs: int, also: str | None = None, keys: str | None = None, log=sys.stdout,
         partial: str | None = None, resume: dict | None = None) -> dict:
    """The tile search: {arch: {key: {"tile": [BM, BN, warps, stages] | None, "tried": [[tile, why], ...],
    "shared": max shared bytes of its representatives, "detail": per representative [triton, name,
    registers, shared]}}}.

    Keys are searched in rounds; a key starts once the next lighter class and the next smaller head
    dim of its family are settled, at the later of their winners (a tile that spills with fewer
    switches or a smaller head dim spills here too: skipped unseen). Tiles that ``estimate`` rules
    out are skipped uncompiled. A candidate first compiles its class's first (heaviest) representative
    under this triton; if clean, every representative under this triton and the first under ``also``'s
    (pick under the Triton that spills more: 3.6 here); the first candidate clean in all wins.
    ``partial``: a JSON file rewritten after each round; ``resume``: such a file, whose failed
    candidates are skipped."""
    state = {}
    for arch in arch_list:
        for kind, cls, prec, bd in _table_keys(arch):
            k = tiles.key(kind, cls, prec, bd)
            if keys and not re.search(keys, f"sm{arch}/{k}"):
                continue
            state[(arch, k)] = dict(arch=arch, kind=kind, cls=cls, prec=prec, bd=bd, idx=0, stage=0, tried=[],
                                    tile=None, done=False, shared=0, detail=[],
                                    cands=tiles.candidates(kind, min(arch, 90), bd, prec, cls))
    for (arch, k), st in state.items():  # resume: skip what an earlier run saw fail, keep what it settled
        old = (resume or {}).get(str(arch), {}).get(k, {})
        for tile, why in old.get("tried", []):
            if st["idx"] < len(st["cands"]) and list(st["cands"][st["idx"]]) == tile:
                st["tried"].append([tile, why])
                if why == "ok":
                    st.update(tile=tile, done=True, shared=old.get("shared", 0), detail=old.get("detail", []))
                    break
                st["idx"] += 1
    rnd = 0
    while not all(st["done"] for st in state.values()):
        rnd += 1
        ready = [st for st in state.values() if not st["done"] and _ready(st, state)]
        for st in ready:
            if st["stage"] == 0:
                _advance_start(st, state)
        jobs, owners = [], []
        for st in ready:
            if st["done"]:
                continue
            cfg = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), st["cands"][st["idx"]]))
            rs = reps(st["kind"], st["arch"], st["bd"], st["prec"], st["cls"], cfg)
            for s in (rs[:1] if st["stage"] == 0 else rs):
                jobs.append((s, cfg))
                owners.append(st)
        if not jobs:
            continue
        t0 = time.time()
        why = {id(st): None for st in ready}
        details = {id(st): [] for st in ready}
        for r, st in zip(run_jobs(jobs, n_procs), owners):
            _note(r, st, why, details)
        if also:
            firsts = {}  # the first (heaviest) representative of each clean key
            for j, st in zip(jobs, owners):
                if st["stage"] == 1 and why[id(st)] is None:
                    firsts.setdefault(id(st), (j, st))
            clean = list(firsts.values())
            for r, (_, st) in zip(_run_elsewhere(also, [j for j, _ in clean], n_procs) if clean else [], clean):
                _note(r, st, why, details)
        for st in ready:
            if st["done"]:
                continue
            tile = list(st["cands"][st["idx"]])
            if why[id(st)] is not None:
                st["tried"].append([tile, why[id(st)]])
                st["idx"], st["stage"] = st["idx"] + 1, 0
            elif st["stage"] == 0:
                st["stage"] = 1
            else:
                st["tried"].append([tile, "ok"])
                st["tile"], st["done"], st["detail"] = tile, True, details[id(st)]
                st["shared"] = max([d[3] or 0 for d in details[id(st)]] + [0])
        out = _pick_results(state)
        if partial:
            with open(partial, "w") as f:
                json.dump(out, f, indent=1)
        print(f"pick round {rnd}: {len(jobs)} compiles in {time.time() - t0:.0f} s, "
              f"{sum(st['done'] for st in state.values())}/{len(state)} keys done", file=log, flush=True)
    return _pick_results(state)


def _note(r: dict, st: dict, why: dict, details: dict):
    """Record one compile result against its key: the first failure wins."""
    bad = verdict(r)
    if bad and why[id(st)] is None:
        why[id(st)] = f"{r['triton']}: {r['name']}: {bad}"
    details[id(st)].append([r["triton"], r["name"], r.get("registers"), r.get("shared"), r.get("seconds")])


def _advance_start(st: dict, state: dict):
    """Move a key's candidate to the later of its predecessors' winners, past tiles tried or ruled out
    by ``estimate``; when none is left, rescan once from the top (spills are not monotone in the tile
    everywhere: FMA tiles)."""
    for pk in [] if st.get("rescan") else _preds(st):
        p = state.get((st["arch"], pk))
        if p and p["cands"] == st["cands"] and p["tile"] and p["cands"].index(tuple(p["tile"])) > st["idx"]:
            st["idx"] = p["cands"].index(tuple(p["tile"]))
    smem = tiles.SMEM_LIMIT[st["arch"]]
    seen = [t for t, _ in st["tried"]]
    while st["idx"] < len(st["cands"]):
        tile = list(st["cands"][st["idx"]])
        skip = "tried" if tile in seen else estimate(st["kind"], st["bd"], st["prec"], tile, smem)
        if not skip:
            return
        if skip != "tried":
            st["tried"].append([tile, skip])
        st["idx"] += 1
    if not st.get("rescan"):  # nothing left below the predecessors' winners: try the skipped ones once
        st["rescan"], st["idx"] = True, 0
        _advance_start(st, {})
        return
    st["done"] = True


def _pick_results(state: dict) -> dict:
    out = {}
    for (arch, k), st in state.items():
        out.setdefault(str(arch), {})[k] = dict(tile=st["tile"], done=st["done"], tried=st["tried"],
                                                shared=st["shared"], detail=st["detail"])
    return out


def _preds(st: dict) -> list[str]:
    """Keys whose winner bounds this key's candidate from below: the next lighter class, the next
    smaller head dim and, for TF32 (4-byte operands), the 16-bit key."""
    out = [tiles.key(st["kind"], st["cls"], "16bit", st["bd"])] if st["prec"] == "tf32" else []
    classes = [c for kd, c, p, b in _table_keys(st["arch"]) if (kd, p, b) == (st["kind"], st["prec"], st["bd"])]
    i = classes.index(st["cls"])
    if i > 0:
        out.append(tiles.key(st["kind"], classes[i - 1], st["prec"], st["bd"]))
    if st["bd"] > DIMS[0]:
        out.append(tiles.key(st["kind"], st["cls"], st["prec"], st["bd"] // 2))
    return out


def _ready(st: dict, state: dict) -> bool:
    """A key is searched once its predecessors are settled (so it starts at their winners)."""
    return all(state.get((st["arch"], pk), {"done": True})["done"] for pk in _preds(st))


def write_tables(picked: dict, evidence: str | None = None) -> str:
    """Write ``pick`` results ({arch: {key: {"tile", "shared", ...}}}) into kernels/tiles_sm80.json and
    tiles_sm90.json; -> a summary. Entries named in a file's ``evidence_keys`` (timed on a GPU) are
    kept. sm_86 results become the sm80 file's ``smem99`` entries where the sm_80 winner needs more
    than 99 KB. A key with no winner is left out (lookups fall back to a heavier class)."""
    import triton
    evidence = evidence or (f"aot no-spill 3.6+{triton.__version__.rsplit('.', 1)[0]} "
                            f"(kernels/aot.py --pick, {time.strftime('%Y-%m-%d')})")
    lines = []
    for arch in (80, 90):
        got = picked.get(str(arch))
        if not got:
            continue
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"tiles_sm{arch}.json")
        with open(path) as f:
            data = json.load(f)
        notes = data.get("evidence_keys", {})
        pinned = {k: v for k, v in notes.items() if "timed" in v}
        spill_ok = {k: v for k, v in data.get("spill_ok", {}).items() if k in pinned}
        valid = {tiles.key(*kk) for kk in _table_keys(arch)}
        table = {k: v for k, v in data.get("tiles", {}).items() if k in valid}
        for k, r in got.items():
            if k in pinned or not r.get("done", True):  # timed entries stay; unsettled keys keep theirs
                continue
            if r.get("tile"):
                table[k] = r["tile"]
                continue
            spilled = [(int(m.group(1)), t) for t, why in r.get("tried", [])
                       for m in [re.search(r"(\d+) B spilled", why)] if m]
            if not spilled:
                table.pop(k, None)
                lines.append(f"sm{arch} {k}: no candidate compiled (falls back to a heavier class)")
                continue
            least, tile = min(spilled)
            table[k], spill_ok[k] = tile, least
            pinned[k] = (f"aot: no candidate compiles spill-free under 3.6+3.9; the least spill of "
                         f"{len(r['tried'])} tried ({least} B)")
            lines.append(f"sm{arch} {k}: {pinned[k]}: {tile}")
        data.update(arch=arch, evidence=evidence, evidence_keys=dict(sorted(pinned.items())),
                    spill_ok=dict(sorted(spill_ok.items())), tiles=dict(sorted(table.items())))
        if arch == 80 and "86" in picked:  # without an sm_86 search the file's smem99 entries stay
            small = picked["86"]
            too_big = {k for k, r in got.items() if (r.get("shared") or 0) > tiles.SMEM_LIMIT[86]}
            data["smem99"] = {k: small.get(k, {}).get("tile") for k in sorted(too_big)  # None: refused there
                              if small.get(k, {}).get("tile") != table.get(k)}
        with open(path, "w") as f:
            f.write(_dump_table(data))
        lines.append(f"wrote {path}: {len(table)} entries, {len(data.get('smem99', {}))} for 99 KB archs")
    tiles.shipped.cache_clear()
    return "\n".join(lines)


def _dump_table(data: dict) -> str:
    """The table file's JSON: one entry per line, readable in a diff."""
    def block(d):
        if not d:
            return "{}"
        return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d.items()) + "\n }"
    head = {k: v for k, v in data.items() if k not in ("tiles", "smem99", "evidence_keys", "spill_ok")}
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items())
    for sec in ("evidence_keys", "spill_ok", "tiles", "smem99"):
        if sec in data:
            body += f",\n {json.dumps(sec)}: {block(data[sec])}"
    return "{\n" + body + "\n}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="ci", choices=("ci", "full"))
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--only", default=None, help="substring filter on the specialization name")
    ap.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                    help="compile in this many processes (default: the CPU count, at most 8)")
    ap.add_argument("--jobs-file", default=None, help="compile the [spec, config] pairs of this JSON file")
    ap.add_argument("--pick", action="store_true", help="search the tile tables (see the module docstring)")
    ap.add_argument("--arch", default="80,90", help="--pick: table archs")
    ap.add_argument("--keys", default=None, help="--pick: regex on 'sm<arch>/<key>'")
    ap.add_argument("--also", default=None, help="--pick: a second Python whose triton must agree")
    ap.add_argument("--resume", default=None, help="--pick: a partial result whose failed candidates are skipped")
    ap.add_argument("--write", nargs="*", default=None, metavar="PICK_JSON",
                    help="write the winners of these --pick results (or of this --pick) into kernels/tiles_sm*.json")
    args = ap.parse_args(argv)
    if args.write and not args.pick:
        picked = {}
        for path in args.write:
            with open(path) as f:
                for arch, keys in json.load(f).items():
                    picked.setdefault(arch, {}).update(keys)
        print(write_tables(picked))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")
    if args.pick:
        resume = None
        if args.resume:
            with open(args.resume) as f:
                resume = json.load(f)
        out = pick([int(a) for a in args.arch.split(",")], args.jobs, args.also, args.keys,
                   partial=args.json + ".partial" if args.json else None, resume=resume)
        if args.write is not None:
            print(write_tables(out))
    elif args.jobs_file:
        with open(args.jobs_file) as f:
            out = run_jobs([(s, c) for s, c in json.load(f)], args.jobs)
    else:
        specs = [s for s in spec_set(args.set) if not args.only or args.only in spec_name(s)]
        out = run_jobs(specs, args.jobs, echo=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
