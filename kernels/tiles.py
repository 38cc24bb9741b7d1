"""Tile configs of the attention kernels, as data: ``tiles_sm80.json`` and ``tiles_sm90.json`` beside this file.

A config is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for one kernel kind, specialization
class, precision and padded head dim, stored under the key ``"<kind>/<cls>/<precision>/d<bd>"``:

- kind: ``fwd`` | ``thr`` (the top-k threshold pass for top-k buffers ``K2 = next_pow2(topk) <=
  min(BLOCK_N, 32)``) | ``thrwide`` (the threshold pass for wider buffers, up to MAX_TOPK = 128:
  BLOCK_N >= 128) | ``dkdv`` | ``dq`` | ``decode`` (the split-KV decode kernel: classes ``posbias``,
  which serves ``plain`` too, and ``qk``; BLOCK_M is its most query rows per program. No candidate
  compiles ``decode/qk/ieee`` spill-free at d256 (sm_80, sm_90) nor at d128 on sm_90 (800 B to 60
  KB spilled), nor ``decode/posbias/ieee/d256`` on sm_80 for every CI specialization under both
  Tritons (12 B at best), 2026-11-27: those keys are left out and their launches refused -- exact
  fp32 there runs the reference path);
- cls: the specialization class (``spec_class``), lightest first: ``plain`` < ``posbias`` <
  ``dense`` < ``qk`` < ``heavy``. Each class's entry was compiled (``kernels/aot.py --pick``)
  with the heaviest switch combinations of its own class *and every lighter one* (a ``heavy``
  entry also holds ALiBi + a bool mask, a dense float bias + a float mask, a distance table, and
  their gradients in dq), so a lookup that finds no entry for its class may fall back to the
  next heavier class -- never to a lighter one, whose tiles were never checked with its switches.
  One exception: top-k without a dense bias or mask is ``posbias`` (2026-11-28; it was ``heavy``,
  whose small tiles made the top-k forward 2.5x and its dK/dV and dQ 3.8x the plain kernels on an
  H200) and ``dense`` does not hold it: every 16-bit and TF32 table has its own ``posbias``
  entries, exact fp32 falls back to ``heavy``, and an entry ``dense`` shares with ``posbias`` is
  compiled with both classes' representatives (``kernels/aot.py``).
  ``qk`` (in-kernel QK features) is the decode kernel's only: fwd, thr, dkdv and dq take q' / k'
  from the row kernel (``attention_qk``), so QK features add nothing to their class (the
  learned QK-norm scale's gradient takes the dq kernel's ``heavy`` tile: ``dq_class``);
- precision: ``16bit`` (fp16/bf16 inputs), ``tf32`` (fp32 inputs with
  ``torch.backends.cuda.matmul.allow_tf32``: tensor cores on 4-byte operands, so twice the shared
  memory of 16 bit and tiles of their own), ``ieee`` (fp32 inputs, exact products: FMA tiles, no
  tensor cores; the table holds ``plain`` and ``heavy`` only, the classes between fall back to
  ``heavy``: register-bound FMA tiles gain little from the lighter switches);
- bd: ``max(32, next_pow2(max(d, dv)))``, one of 32, 64, 128, 256.

TF32 on sm_90: a TF32 ``tl.dot`` whose operand came out of the in-kernel rotary (the q'/k' tiles
of the former ``qk`` and ``heavy`` classes of fwd/dkdv/dq) did not compile in its wgmma form under
triton 3.6 or 3.9 (``LLVM ERROR: Illegal shared layout`` in TritonGPUOptimizeDotOperands, issue
11); the search (``kernels/aot.py --pick`` skips candidates that fail to compile) gave the TF32
``heavy`` entries tiles of at most 32 rows in every dot. Since the QK features moved to the row
kernel those entries are merely conservative (not re-picked); the decode kernel keeps its own.

Each file holds ``arch``, ``tiles`` (the entries), ``evidence`` (the source of every entry not
named in ``evidence_keys``: "aot no-spill 3.6+3.9", the largest candidate that compiled with no
spill and within shared memory under both Tritons) and ``evidence_keys`` (entries with another
source: an H100 timing, or a key where no candidate compiles spill-free and the least spill
ships), and ``spill_ok`` (the spill bytes CI accepts for exactly those entries). ``tiles_sm80.json``
serves sm_80 and sm_87 (163 KB shared memory per block) and, through its ``smem99`` entries
(which replace ``tiles`` there), sm_86 and sm_89 (99 KB per block); an ``smem99`` entry ``null``
marks a key no tile fits there (fp32 top-k > 32 at head dim 256: the K tile alone of the 128-wide
threshold pass is 128 KB): those launches are refused (``refusal``, ``UnsupportedConfig``). Other archs are refused
(``UnsupportedArch``, raised by ``config``, so the launcher stops before any launch with a message
that names the supported archs): nothing below sm_80 (no bf16 tensor cores) nor sm_100/sm_120
(other shared memory and MMA units) has been compiled or timed.

Override: ``XTK_TILES=/path/to.json`` in the same format (``arch`` plus a ``tiles`` dict holding
any subset of the keys); for that arch its entries replace the shipped ones. A malformed file
raises ``TileConfigError`` naming the file and the key. Under ``TRITON_INTERPRET=1`` every kernel
runs 32x32 tiles (the interpreter's speed) unless ``XTK_INTERPRET_TILES=sm80|sm90`` asks for the
shipped table of that arch (tests/test_shipped_tiles.py).

Imports only the standard library (kernels/aot.py runs in a venv with nothing but triton).
"""
from __future__ import annotations

import functools
import json
import os
import re

from . import kinds

CLASSES = ("plain", "posbias", "dense", "qk", "heavy")  # lightest first: spec_class picks the heaviest that applies
ATTN_CLASSES = ("plain", "posbias", "dense", "heavy")  # those of fwd/thr/dkdv/dq (qk: the decode kernel only)
KINDS = ("fwd", "thr", "thrwide", "dkdv", "dq", "decode")
PRECISIONS = ("16bit", "tf32", "ieee")
HEAD_DIMS = (32, 64, 128, 256)
MAX_TOPK = 128  # the launcher's limit: thrwide's BLOCK_N covers the widest top-k buffer
THR_K2 = 32  # thr entries hold top-k buffers up to this (and BLOCK_N); wider ones take thrwide
SUPPORTED_ARCHS = (80, 86, 87, 89, 90)
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block
INTERPRETER_TILE = (32, 32, 4, 1)
_KEY = re.compile(r"^(fwd|thr|thrwide|dkdv|dq|decode)/(plain|posbias|dense|qk|heavy)/(16bit|tf32|ieee)/d(32|64|128|256)$")
_HERE = os.path.dirname(os.path.abspath(__file__))

# the kernels' switch values (kernels/attention_common.py), repeated here so this module needs no triton
_BIAS_POS = kinds.POSITIONAL_BIAS    # ALiBi, distance table
_BIAS_DENSE = kinds.DENSE_BIAS       # dense float bias, dense bool keep-mask


class TileConfigError(ValueError):
    """A tile table (shipped or ``XTK_TILES``) that is malformed or lacks an entry."""


class UnsupportedArch(RuntimeError):
    """The GPU architecture has no tile table: the launcher refuses it."""


class UnsupportedConfig(TileConfigError):
    """No tile of this key fits the architecture's shared memory (an ``smem99`` entry ``null``)."""


# ----------------------------------------------------------------------------- classes

def spec_class(bias_kind: int, mask_kind: int, has_topk: bool, has_dropout: bool, qk: bool = False) -> str:
    """The specialization class of one launch: the heaviest that applies, in the order
    ``plain < posbias < dense < qk < heavy``.

    bias_kind: BIAS_* (0 none, 1 ALiBi, 2 distance table, 3 dense float, 4 dense bool);
    mask_kind: MASK_* (0 none, 1 float, 2 bool); qk: QK-norm / dim scales / rotary in-kernel (the
    decode kernel; the other kernels take q' / k' from the row kernel and leave it False).
    heavy: dropout, or top-k with a dense bias or an attn_mask; qk: QK features; dense: a dense
    bias or any attn_mask; posbias: ALiBi or a distance table (T5 included), or top-k without a
    dense bias or mask (its kernels add a row of thresholds and a select: the posbias entries were
    picked with it); plain: none of these."""
    if has_dropout:
        return "heavy"
    if qk:
        return "qk"
    if bias_kind in _BIAS_DENSE or mask_kind:
        return "heavy" if has_topk else "dense"
    if bias_kind in _BIAS_POS or has_topk:
        return "posbias"
    if bias_kind:
        raise TileConfigError(f"unknown bias_kind {bias_kind}")
    return "plain"


def dq_class(cls: str, need_dlsc: bool) -> str:
    """The dQ kernel's class: ``heavy`` when it forms a learned QK-norm scale's gradient (NEED_DLSC,
    one more (BLOCK_M, BLOCK_N) fp32 tile live), else the launch's class. The lighter classes' dq
    tiles spill with it (AOT 2026-11-28: 24-272 B, e.g. sm_90 TF32 d128 plain, sm_90 16-bit d128
    with a distance table); the heavy ones were picked with it among their representatives."""
    return "heavy" if need_dlsc else cls


def precision_of(kernel_precision: str, element_size: int) -> str:
    """Table precision of a launch: '16bit' for 2-byte inputs, else the kernels' PRECISION
    ('tf32' | 'ieee') of fp32 inputs."""
    return "16bit" if element_size == 2 else kernel_precision


def padded_head_dim(d: int, dv: int) -> int:
    """The table's head dim: max(32, next power of two >= max(d, dv)); at most 256."""
    bd = 32
    while bd < max(d, dv):
        bd *= 2
    if bd > HEAD_DIMS[-1]:
        raise TileConfigError(f"head dim {max(d, dv)} > {HEAD_DIMS[-1]}: no tile table")
    return bd


def block_d(d: int) -> int:
    """The kernels' BLOCK_D for head dim ``d``: max(16, next power of two >= d)."""
    b = 16
    while b < d:
        b *= 2
    return b


def key(kind: str, cls: str, precision: str, bd: int) -> str:
    """Table key ``"<kind>/<cls>/<precision>/d<bd>"``."""
    return f"{kind}/{cls}/{precision}/d{bd}"


# ----------------------------------------------------------------------------- files

def table_arch(arch: int) -> int:
    """The shipped table serving compute capability ``arch`` (80 or 90); raises UnsupportedArch."""
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedArch(
            f"xtk's Triton attention has no tile table for sm_{arch}: supported are "
            f"{', '.join(f'sm_{a}' for a in SUPPORTED_ARCHS)} (below sm_80 the tensor-core paths are "
            f"missing; sm_100/sm_120 were never compiled or timed). Use another backend "
            f"(xtk.attention(..., backend='chunked'))")
    return 90 if arch >= 90 else 80


def _check_entry(path: str, k: str, v) -> tuple:
    """One validated entry ``(BM, BN, warps, stages)``; raises TileConfigError naming the file and key."""
    if not _KEY.match(k):
        raise TileConfigError(f"{path}: bad key {k!r} (want '<kind>/<cls>/<precision>/d<32|64|128|256>' with kind in "
                              f"{KINDS}, cls in {CLASSES}, precision in {PRECISIONS})")
    ok = isinstance(v, (list, tuple)) and len(v) == 4 and all(type(x) is int for x in v)
    if ok:
        bm, bn, warps, stages = v
        pow2 = all(x >= 1 and x & (x - 1) == 0 for x in (bm, bn, warps))
        ok = pow2 and bm >= 16 and bn >= 16 and warps <= 16 and 1 <= stages <= 8
    if not ok:
        raise TileConfigError(f"{path}: key {k!r}: value {v!r} is not [BLOCK_M, BLOCK_N, num_warps, num_stages] "
                              f"(powers of two, blocks >= 16, 1-16 warps, 1-8 stages)")
    if k.startswith("thrwide/") and v[1] < MAX_TOPK:
        raise TileConfigError(f"{path}: key {k!r}: thrwide needs BLOCK_N >= {MAX_TOPK} (the widest top-k buffer)")
    return tuple(v)


def _parse(path: str, text: str, sections=("tiles",)) -> dict:
    """``{"arch": int, section: {key: (BM, BN, warps, stages)}}`` of one table file's text."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise TileConfigError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("arch"), int) or data["arch"] not in SUPPORTED_ARCHS:
        raise TileConfigError(f"{path}: key 'arch': want one of {SUPPORTED_ARCHS}, got "
                              f"{data.get('arch') if isinstance(data, dict) else data!r}")
    out = {"arch": data["arch"]}
    for sec in sections:
        entries = data.get(sec, {})
        if not isinstance(entries, dict):
            raise TileConfigError(f"{path}: key {sec!r}: want an object of entries")
        out[sec] = {k: None if v is None and sec == "smem99" else _check_entry(path, k, v)
                    for k, v in entries.items()}
    return out


@functools.lru_cache(maxsize=None)
def shipped(arch: int) -> dict:
    """The shipped table file of table arch 80 or 90, parsed: arch, tiles, smem99 (sm80 only),
    spill_ok (key -> the spill bytes ptxas reports for that entry and CI accepts: entries timed
    faster than every spill-free tile, or keys no candidate compiles spill-free; see evidence_keys)."""
    path = os.path.join(_HERE, f"tiles_sm{arch}.json")
    with open(path) as f:
        text = f.read()
    out = _parse(path, text, ("tiles", "smem99"))
    spill_ok = json.loads(text).get("spill_ok", {})
    for k, v in spill_ok.items():
        if not _KEY.match(k) or type(v) is not int or v < 0:
            raise TileConfigError(f"{path}: spill_ok key {k!r}: want a table key and a byte count, got {v!r}")
    out["spill_ok"] = spill_ok
    return out


@functools.lru_cache(maxsize=8)
def _override_file(path: str, mtime: float) -> dict:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise TileConfigError(f"XTK_TILES={path}: cannot read: {e}") from None
    return _parse(path, text)


def override(arch: int) -> dict:
    """Entries of the ``XTK_TILES`` file for compute capability ``arch`` ({} without one, or for another arch)."""
    path = os.environ.get("XTK_TILES")
    if not path:
        return {}
    try:
        mtime = os.path.getmtime(path)
    except OSError as e:
        raise TileConfigError(f"XTK_TILES={path}: cannot read: {e}") from None
    data = _override_file(path, mtime)
    return data["tiles"] if data["arch"] == arch else {}


def entries(arch: int) -> list[dict]:
    """The tables consulted for compute capability ``arch``, first match wins: XTK_TILES, then
    (sm_86 / sm_89) the sm80 file's 99 KB entries, then the shipped table."""
    ta = table_arch(arch)
    tables = [override(arch)]
    if ta == 80 and SMEM_LIMIT[arch] < SMEM_LIMIT[80]:
        tables.append(shipped(80)["smem99"])
    tables.append(shipped(ta)["tiles"])
    return tables


def lookup(kind: str, arch: int, bd: int, precision: str, cls: str) -> tuple[str, tuple]:
    """(key found, entry) for ``cls`` or, where it has no entry, the next heavier class."""
    if cls not in CLASSES or precision not in PRECISIONS or kind not in KINDS:
        raise TileConfigError(f"no tiles for kind={kind!r} cls={cls!r} precision={precision!r}")
    tables = entries(arch)
    for c in CLASSES[CLASSES.index(cls):]:
        k = key(kind, c, precision, bd)
        for t in tables:
            if k in t:
                if t[k] is None:
                    raise UnsupportedConfig(
                        f"sm_{arch}: no Triton attention tile for {k} fits {SMEM_LIMIT[arch] // 1024} KB of shared "
                        f"memory per block; use 16-bit inputs, top-k <= {THR_K2}, or another backend "
                        f"(xtk.attention(..., backend='chunked'))")
                return k, t[k]
    raise TileConfigError(f"sm_{arch}: no entry for {key(kind, cls, precision, bd)} nor any heavier class")


# ----------------------------------------------------------------------------- the launcher's entry point

def _interpreter_arch():
    """None for the interpreter's 32x32 tiles, else the arch (80, 90) named by XTK_INTERPRET_TILES."""
    want = os.environ.get("XTK_INTERPRET_TILES", "")
    if not want:
        return None
    m = re.fullmatch(r"sm_?(\d+)", want)
    if not m:
        raise TileConfigError(f"XTK_INTERPRET_TILES={want!r}: want sm80 or sm90")
    return int(m.group(1))


def config(kind: str, d: int, dv: int, arch: int = 90, topk: int = 0, precision: str = "16bit",
           cls: str = "plain") -> dict:
    """Tile config of one kernel launch: dict(BLOCK_M, BLOCK_N, num_warps, num_stages).

    kind: 'fwd' | 'thr' | 'dkdv' | 'dq'; d, dv: head dims of q/k and v; arch: compute capability
    (an unsupported one raises UnsupportedArch); topk: the top-k (thr: a buffer K2 =
    next_pow2(topk) past min(BLOCK_N, THR_K2) takes the 'thrwide' entry); precision: '16bit' |
    'tf32' | 'ieee'; cls: spec_class(...)."""
    bd = padded_head_dim(d, dv)
    k2 = 1 << max(0, topk - 1).bit_length()  # the top-k buffer: next power of two >= topk
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        iarch = _interpreter_arch()
        if iarch is None:
            bm, bn, warps, stages = INTERPRETER_TILE
            if kind == "thr":
                bn = max(bn, k2)
            return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        arch = iarch
    _, (bm, bn, warps, stages) = lookup(kind, arch, bd, precision, cls)
    if kind == "thr" and k2 > min(bn, THR_K2):
        _, (bm, bn, warps, stages) = lookup("thrwide", arch, bd, precision, cls)
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def refusal(arch: int, d: int, dv: int, topk: int, precision: str):
    """None when shipped tiles can run attention of these sizes on compute capability ``arch``,
    else why not (for the backend's reasons: ``auto`` moves on, a forced backend raises). Only the
    architecture and the top-k threshold pass (class ``heavy``) can be refused."""
    why = unsupported_reason(arch)
    if why is None and topk:
        try:
            config("thr", d, dv, arch, topk, precision, "heavy")
        except UnsupportedConfig as e:
            why = str(e)
    return why


def unsupported_reason(arch: int):
    """None when ``arch`` has a tile table, else the refusal message (for a backend's reasons list)."""
    try:
        table_arch(arch)
    except UnsupportedArch as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- candidates

# (BLOCK_M, BLOCK_N, num_warps, num_stages), largest first; within one tile the variant measured
# or expected faster first (H100 sweep of 2026-11-27: 8 warps for 128-row tiles, 4 for 64; dK/dV
# and dQ best with 2 stages; 64x128 and 128x128 dK/dV 1.7x slower, so left out).
_TENSOR_CORE = {
    "fwd": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 32, 8, 2), (128, 32, 4, 3),
            (64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 8, 1),
            (32, 32, 4, 2), (32, 32, 8, 2), (32, 32, 8, 1), (32, 16, 4, 1), (32, 16, 8, 1), (16, 32, 4, 1),
            (16, 16, 4, 1), (16, 16, 8, 1)],
    "dkdv": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 1), (32, 64, 4, 2), (32, 64, 8, 2),
             (32, 64, 8, 1), (64, 32, 4, 2), (64, 32, 8, 1), (32, 32, 4, 2), (32, 32, 8, 2), (32, 32, 8, 1),
             (16, 64, 8, 1), (16, 32, 4, 1), (16, 32, 8, 1), (32, 16, 8, 1), (16, 16, 4, 1), (16, 16, 8, 1)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 1),
           (64, 16, 8, 1), (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2), (32, 32, 8, 1), (32, 16, 4, 1),
           (32, 16, 8, 1), (16, 32, 8, 1), (16, 16, 4, 1), (16, 16, 8, 1)],
    "thr": [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2),
            (32, 32, 8, 1), (32, 16, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1), (16, 16, 8, 1)],
    "thrwide": [(32, 128, 8, 1), (16, 128, 8, 1), (16, 128, 4, 1), (16, 128, 16, 1)],  # 64 rows spill
    # decode: BLOCK_M is the most query rows of one kv head per program (the launcher cuts it to the
    # group's rows, 16 for a 1-row decode of 8 query heads per kv head or fewer)
    "decode": [(64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2),
               (16, 32, 4, 1), (16, 16, 4, 1), (32, 64, 8, 2), (16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 8, 1),
               (16, 16, 8, 1)],  # 8 warps last: the in-kernel QK features of a wide k tile at large head dims
}
# fp32 with exact products: FMA on CUDA cores, register-bound, so small tiles; ptxas spills a few
# bytes at some of them and not at larger ones (not monotone in the tile), hence the long lists
_FMA = {
    "fwd": [(64, 32, 4, 2), (64, 32, 4, 1), (64, 32, 8, 1), (32, 32, 4, 2), (32, 32, 4, 1), (32, 32, 8, 1),
            (32, 32, 2, 1), (32, 16, 4, 1), (32, 16, 8, 1), (32, 16, 2, 1), (16, 32, 4, 1), (16, 16, 4, 1),
            (16, 16, 8, 1), (16, 16, 2, 1)],
    "dkdv": [(64, 32, 4, 1), (32, 64, 4, 1), (32, 32, 4, 1), (32, 32, 8, 1), (32, 32, 2, 1), (32, 16, 4, 1),
             (32, 16, 8, 1), (16, 32, 4, 1), (16, 32, 8, 1), (16, 16, 4, 1), (16, 16, 8, 1), (16, 16, 2, 1)],
    "dq": [(64, 32, 4, 1), (32, 32, 4, 1), (32, 32, 8, 1), (32, 32, 2, 1), (32, 16, 4, 1), (32, 16, 8, 1),
           (16, 32, 8, 1), (16, 16, 4, 1), (16, 16, 8, 1), (16, 16, 2, 1)],
    "thr": [(32, 32, 4, 1), (32, 32, 8, 1), (32, 32, 2, 1), (32, 16, 4, 1), (32, 16, 8, 1), (16, 16, 4, 1),
            (16, 16, 8, 1), (16, 16, 2, 1)],
    "thrwide": [(16, 128, 8, 1), (16, 128, 4, 1), (16, 128, 16, 1)],
    "decode": [(32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1), (32, 32, 8, 1),
               (16, 32, 8, 1), (16, 16, 8, 1), (16, 32, 2, 1), (16, 16, 2, 1)],
}


def candidates(kind: str, arch: int, bd: int, precision: str, cls: str = "plain") -> list[tuple]:
    """Tiles worth timing on a GPU for one key, largest first: those kernels/aot.py --pick
    compiles (the shipped entry is the first that compiles spill-free and fits shared memory
    under both Triton versions, or a timed winner). ``arch`` and ``cls`` are checked but do not
    prune here: the compile decides."""
    table_arch(arch)
    if kind not in KINDS or precision not in PRECISIONS or cls not in CLASSES or bd not in HEAD_DIMS:
        raise TileConfigError(f"no candidates for kind={kind!r} bd={bd} precision={precision!r} cls={cls!r}")
    return list((_FMA if precision == "ieee" else _TENSOR_CORE)[kind])
