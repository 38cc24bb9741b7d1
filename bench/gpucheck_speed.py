"""gpucheck speed and tile tuning.

Speed cells ``(impl, feature, (b, h, n, d), causal, mode)``: xtk (auto backend) against what a
user would otherwise run -- SDPA with no bias through each of its CUDA backends (flash, efficient,
cuDNN: the speed of light), SDPA with the bias materialized as a dense mask, FlexAttention compiled
with the bias as ``score_mod`` (first-call compile time kept apart), and the eager path. Timing:
``bench.common.measure`` (``triton.testing.do_bench`` median on CUDA). RMSNorm and GLU forward are
timed against a device-to-device copy of the same bytes in the same run (GB/s, read + write).

Tuning: for each kernel kind and specialization class, each candidate tile (``CANDIDATES``) is
timed on a representative shape with the other kernels at their shipped tiles; the fastest that
ran is the winner, written as ``{arch, evidence, evidence_keys, tiles: {"<kind>/<class>/16bit/d<bd>":
[BLOCK_M, BLOCK_N, warps, stages]}}`` (the launcher's pinned tables are updated from it by hand).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import bench_attention as ba
from . import bench_glu, bench_norm
from .common import Result, measure

XTK_FEATURES = ["none", "alibi", "t5", "dtable", "topk8", "qknorm_rotary"]
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}
FLEX_FEATURES = ["none", "alibi", "t5", "dtable"]
# the specialization class each tuning feature stands for
# (QK-norm + rotary is no class of these kernels: the row kernel applies it before them)
# cls -> the feature that stands for it; heavy (dropout, or top-k with a dense bias or mask) has none
# among bench_attention's features since top-k alone became posbias (kernels/tiles.py spec_class)
TUNE_FEATURES = {"plain": "none", "posbias": "alibi"}


def shapes(quick: bool, dry: bool):
    """(b, h, n, d): 16k tokens per shape (b * n), 16 heads."""
    if dry:
        return [(1, 2, 32, 32)]
    if quick:
        return [(4, 16, 4096, 128)]
    return [(16384 // n, 16, n, d) for d in (64, 128) for n in (1024, 4096, 16384)]


def cells(quick: bool, dry: bool) -> list[tuple]:
    """Every timed attention cell, in the order they are timed (a run cut by its time budget keeps
    the first): the anchor shape's cells (the targets read them), then the memory target's, then
    the anchor's slow baselines, then the rest of the grid (``_priority``). Quick: the anchor shape
    alone, xtk's features, SDPA's backends, flex and eager with ALiBi."""
    out = []
    for shape in shapes(quick, dry):
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                out += [("xtk", f, shape, causal, mode) for f in XTK_FEATURES]
                out += [(impl, "none", shape, causal, mode) for impl in SDPA_BACKENDS]
                flex = ["alibi"] if quick or dry else FLEX_FEATURES
                out += [("flex", f, shape, causal, mode) for f in flex]
                eager = ["alibi"] if quick or dry else ["none", "alibi", "t5"]
                out += [("eager", f, shape, causal, mode) for f in eager]
                if not (quick or dry):
                    out += [("sdpa", f, shape, causal, mode) for f in ("alibi", "t5")]
    anchor = shapes(True, dry)[0]
    return sorted(out, key=lambda cell: _priority(cell, anchor))  # stable: grid order within


def _priority(cell, anchor) -> int:
    """0: the anchor shape's cells; 1: the memory target's (ALiBi forward+backward, xtk and eager, at
    head dim 128, non-causal: ``gpucheck_report.memory_target``); 2: the anchor's slow baselines (eager
    and SDPA T5 forward+backward: ~2.5 s a step on an H200, the gather's backward over (b, h, n, n);
    timed first, they kept the first full run from the memory target); 3: the rest."""
    impl, feature, shape, causal, mode = cell
    slow = impl in ("eager", "sdpa") and feature == "t5" and mode == "fwd+bwd"
    if shape == anchor and not slow:
        return 0
    memory = impl in ("xtk", "eager") and feature == "alibi" and mode == "fwd+bwd" and not causal
    if memory and shape[3] == anchor[3]:
        return 1
    return 2 if shape == anchor else 3


def make_call(cell, dtype, device):
    """-> (zero-argument callable running one step, or None, reason)."""
    impl, feature, shape, causal, mode = cell
    if impl not in SDPA_BACKENDS:
        if impl == "flex" and device != "cuda":
            return None, "flex_attention is measured on CUDA only"
        return ba.make_call(impl, feature, shape, causal, mode, dtype, device)
    if device != "cuda":
        return None, "SDPA backends are measured on CUDA only"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    call, why = ba.make_call("sdpa-nobias", "none", shape, causal, mode, dtype, device)
    backend = getattr(SDPBackend, SDPA_BACKENDS[impl])

    def run():
        with sdpa_kernel(backend):
            return call()
    return run, why


def time_cell(cell, dtype, device) -> Result:
    impl, feature, shape, causal, mode = cell
    b, h, n, d = shape
    r = Result("attention", feature, impl, mode, dict(b=b, h=h, n=n, d=d, causal=causal,
                                                       dtype=str(dtype).replace("torch.", "")),
               flops=ba.flops(b, h, n, d, causal, mode))
    call, why = make_call(cell, dtype, device)
    if call is None:
        r.status = "skipped: " + why
        return r
    return measure(r, lambda: call, device, quick=True)


# ----------------------------------------------------------------------------- bandwidth
def bandwidth_cells(dry: bool):
    """(op, case) rows timed against a copy of the same bytes: forward, bf16 (fp32 in a dry run)."""
    return [("copy", "copy"), ("rms_norm", "rms_norm"), ("glu", "gelu")]


def time_bandwidth(cell, dtype, device, dry: bool) -> Result:
    """GB/s of one forward pass (bytes read + written), against ``copy`` of the same input size."""
    op, case = cell
    tokens, dim = (64, 64) if dry else (16384, 4096)
    elem = torch.finfo(dtype).bits // 8
    if op == "copy":
        x = torch.randn(tokens, dim, device=device, dtype=dtype)
        y = torch.empty_like(x)
        r = Result("copy", "copy", "torch", "fwd", dict(tokens=tokens, dim=dim), bytes=2.0 * x.numel() * elem)
        return measure(r, lambda: (lambda: y.copy_(x)), device)
    if op == "rms_norm":
        r = Result(op, case, "xtk", "fwd", dict(tokens=tokens, dim=dim), bytes=2.0 * tokens * dim * elem + dim * elem)
        return measure(r, lambda: bench_norm.make_call("xtk", case, (tokens, dim), "fwd", dtype, device), device)
    r = Result(op, case, "xtk", "fwd", dict(tokens=tokens, inner=dim // 2), bytes=1.5 * tokens * dim * elem)
    return measure(r, lambda: bench_glu.make_call("xtk", case, (tokens, dim // 2), "fwd", dtype, device), device)


# ----------------------------------------------------------------------------- tuning
@contextlib.contextmanager
def override_tile(kind: str, tile: tuple):
    """Within the block, the launcher uses ``tile`` (BLOCK_M, BLOCK_N, warps, stages) for ``kind``."""
    from xtk.kernels import attention_op
    shipped = attention_op.config
    bm, bn, warps, stages = tile

    def patched(k, *args, **kwargs):
        if k == kind:
            return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        return shipped(k, *args, **kwargs)
    attention_op.config = patched
    try:
        yield
    finally:
        attention_op.config = shipped


# Candidate tiles (BLOCK_M, BLOCK_N, warps, stages) per kernel, largest first: the H100 first-light
# sweep's set (bench/results/nvidia-h100-80gb-hbm3/2026-11-27-firstlight).
CANDIDATES = {
    "fwd": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3),
            (64, 64, 4, 3), (64, 32, 8, 2)],
    "dkdv": [(128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (32, 128, 4, 2),
             (32, 64, 4, 2), (32, 64, 8, 1)],
    "dq": [(128, 64, 8, 2), (128, 64, 4, 2), (128, 32, 8, 2), (64, 128, 8, 2), (64, 64, 8, 3), (64, 64, 4, 2),
           (64, 32, 4, 2)],
}


def tune_cells(quick: bool, dry: bool, arch: int, spec: Optional[str] = None) -> list[tuple]:
    """(cls, kind, d, tile, feature) for every candidate tile, the shipped one included.

    Default: quick, the first 6 of plain and posbias at d128; otherwise every class of
    ``TUNE_FEATURES`` at d64 and d128. ``spec`` ("posbias:topk8,plain@128"): the classes to tune, each
    optionally with the feature that stands for it, then ``@`` and the head dims."""
    classes = {c: TUNE_FEATURES[c] for c in (["plain", "posbias"] if quick or dry else TUNE_FEATURES)}
    dims = (32,) if dry else (128,) if quick else (64, 128)
    if spec:
        names, _, dim_text = spec.partition("@")
        classes = dict((c.split(":") + [TUNE_FEATURES.get(c)])[:2] for c in names.split(","))
        unknown = [c for c, f in classes.items() if c not in TUNE_FEATURES or f not in ba.FEATURES]
        if unknown:
            raise ValueError(f"--tune {spec!r}: expected classes from {sorted(TUNE_FEATURES)}, each optionally "
                             f"':<feature>' from {ba.FEATURES}; got {unknown}")
        dims = tuple(int(x) for x in dim_text.split(",")) if dim_text else dims
    out = []
    for d in dims:
        for cls, feature in classes.items():
            for kind in ("fwd", "dkdv", "dq"):
                cands = CANDIDATES[kind][:1] if dry else CANDIDATES[kind][:6] if quick and not spec else CANDIDATES[kind]
                shipped = _shipped_tile(arch, kind, cls, d)
                cands = cands + ([shipped] if shipped and shipped not in cands and not dry else [])
                out += [(cls, kind, d, t, feature) for t in cands]
    return out


def _shipped_tile(arch: int, kind: str, cls: str, d: int) -> Optional[tuple]:
    """The tile the launcher ships for one 16-bit key (None where the table has none)."""
    from xtk.kernels import tiles
    try:
        return tuple(tiles.lookup(kind, arch, d, "16bit", cls)[1])
    except Exception:
        return None


def tune_call(cell, dtype, device, dry: bool):
    cls, kind, d, tile, feature = cell
    shape = (1, 2, 32, d) if dry else (4, 16, 4096, d)
    mode = "fwd" if kind == "fwd" else "fwd+bwd"
    call, _ = ba.make_call("xtk", feature, shape, False, mode, dtype, device)

    def run():
        with override_tile(kind, tile):
            return call()
    return run


def time_tune(cell, dtype, device, dry: bool) -> dict:
    cls, kind, d, tile, feature = cell
    r = Result("tune", cls, "xtk", kind, dict(d=d, tile=list(tile), feature=feature))
    measure(r, lambda: tune_call(cell, dtype, device, dry), device)
    return dict(cls=cls, kind=kind, d=d, tile=list(tile), feature=feature, ms=r.ms, status=r.status)


def winners(rows: list[dict], arch: int, source: str) -> dict:
    """Fastest tile per (kind, cls, d) among the rows that ran -> a tiles file (``XTK_TILES`` format:
    arch, evidence, evidence_keys with each winner's time, tiles)."""
    best: dict = {}
    for r in rows:
        if r["ms"] is None:
            continue
        key = f"{r['kind']}/{r['cls']}/16bit/d{max(32, r['d'])}"
        if key not in best or r["ms"] < best[key][1]:
            best[key] = (r["tile"], r["ms"])
    return dict(arch=arch, evidence=source,
                evidence_keys={k: f"{source}: {v[1]:.4f} ms at b4 h16 n4096" for k, v in sorted(best.items())},
                tiles={k: v[0] for k, v in sorted(best.items())})


def speed_ratio(results: list[Result], num: tuple, den: tuple) -> Optional[float]:
    """time(den cell) / time(num cell): > 1 means the num cell is faster. Cells by (impl, case, mode, causal, n, d)."""
    def ms(key):
        for r in results:
            p = r.params
            if (r.impl, r.case, r.mode, p.get("causal"), p.get("n"), p.get("d")) == key and r.ms:
                return r.ms
        return None
    a, b = ms(num), ms(den)
    return b / a if a and b else None
