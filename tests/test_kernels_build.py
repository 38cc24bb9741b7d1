"""AOT compile of the Triton attention kernels for sm_80/86 and sm_90, under two Tritons (no GPU needed).

Runs kernels/aot.py's CI covering set in a subprocess (the interpreter switch conftest.py sets must
be off for a real compile; aot.py gives each compile a fresh cache so ptxas prints its log) twice:
under the CI's triton (``python -m xtk.kernels.aot``, the installed package) and under triton 3.6.0,
the GPU image's (``python -m kernels.aot`` from the repo root in a venv holding nothing but
``triton==3.6.0``: the AOT compile needs no torch; created once under ``~/.cache/xtk``). Asserts for
every specialization: it compiles, its shared memory fits every arch its table entry serves
(163 KB sm_80/87, 99 KB sm_86/89, 227 KB sm_90), ptxas reports no spill, 16-bit and TF32 use
tensor cores (not the decode combine: a weighted sum, no dot); and that the set compiles every
entry of both shipped tables (each precision, head dim, class) and every switch value.
``XTK_FULL_TESTS=1`` compiles every class representative of every key (kernels/aot.py --set full). ``XTK_TRITON_VERSIONS=ci`` skips the 3.6 pass.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import XTK_CACHE

FULL = os.environ.get("XTK_FULL_TESTS") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TRITON = "3.6.0"  # the GPU machines' triton
VERSIONS = os.environ.get("XTK_TRITON_VERSIONS", f"ci,{GPU_TRITON}").split(",")
QK = ("HAS_NORM", "HAS_DSCALE", "HAS_ROT")


def triton_venv(version: str) -> str:
    """The python of a venv holding only ``triton==version`` (created once, reused while it imports)."""
    venv = os.path.join(XTK_CACHE, f"venv-triton-{version}")
    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", f"import triton; assert triton.__version__ == {version!r}"]
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True, timeout=300)
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"triton=={version}", "numpy<2.4"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"pip install triton=={version}: {proc.stderr[-3000:]}"
    subprocess.run(check, check=True)
    return python


@pytest.fixture(scope="module", params=VERSIONS)
def aot_results(request, tmp_path_factory):
    import triton  # noqa: F401  (a hard dependency: fail, do not skip, if it is missing)
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "XTK_TILES", "TRITON_CACHE_DIR")}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION="1")
    out = tmp / "aot.json"
    if request.param == "ci":
        cmd = [sys.executable, "-m", "xtk.kernels.aot"]
    else:
        cmd = [triton_venv(request.param), "-m", "kernels.aot"]
        env["PYTHONPATH"] = ROOT
    cmd += ["--set", "full" if FULL else "ci", "--jobs", str(min(os.cpu_count() or 1, 8)), "--json", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results, "no specialization compiled"
    if request.param != "ci":
        assert {r["triton"] for r in results} == {request.param}
    return results


def _ok(results):
    return [r for r in results if "error" not in r]


def test_every_specialization_compiles(aot_results):
    errors = [f"{r['triton']} {r['name']} {r['config']}: {r['error'].splitlines()[0] if r['error'] else ''}"
              for r in aot_results if "error" in r]
    assert not errors, "\n".join(errors)


def test_shared_memory_fits(aot_results):
    over = [f"{r['triton']} {r['name']} {r['config']}: {r['shared']} B > {r['smem_limit']} B"
            for r in _ok(aot_results) if r["shared"] > r["smem_limit"]]
    assert not over, "\n".join(over)


def _allowed_spill(r) -> int:
    """Spill bytes a shipped entry may show: the table file's ``spill_ok`` (the sm_90 16-bit d128 plain
    dK/dV tile timed fastest on the H100 although it spills; keys where no candidate compiles
    spill-free), each explained in the file's evidence_keys; a flagged NaN-rule guard twin's (it
    runs only on inputs holding NaN/inf: recorded in the results, not refused). 0 for everything else."""
    from xtk.kernels import aot, tiles
    if aot.twin_spill_ok(r["spec"]):
        return float("inf")
    if not r.get("key"):
        return 0
    return tiles.shipped(90 if r["spec"]["cc"] >= 90 else 80)["spill_ok"].get(r["key"], 0)


def test_ptxas_reports_no_spills(aot_results):
    ok = _ok(aot_results)
    missing = [r["name"] for r in ok if not r["ptxas_log_found"]]
    assert not missing, f"no ptxas log (cached kernel?): {missing}"
    spills = [f"{r['triton']} {r['name']} ({r['config']}): {r['spill_bytes']} B spilled, {r['registers']} registers"
              for r in ok if (r["spill_bytes"] or 0) > _allowed_spill(r)]
    assert not spills, "\n".join(spills)


def test_tensor_cores_used(aot_results):
    """16-bit and TF32 specializations use tensor cores: ``wgmma`` on sm_90 wherever the tile has
    64-row blocks at 16 bit (Triton's wgmma needs M >= 64), ``mma.sync`` otherwise (sm_80/86, and
    the sm_90 tiles of 16-32 rows: the TF32 heavy tiles, see kernels/tiles.py, and the
    heavy classes at large head dims). fp32 with exact products runs FMA."""
    bad = []
    for r in _ok(aot_results):
        s, cfg = r["spec"], r["config"]
        if s["precision"] == "ieee" or s["kind"] in ("combine", "qkrows"):  # weighted sums / row math, no dot
            continue
        if s["switches"].get("NAN_GUARD") == 2:  # the forward's empty-row twin: loads and stores, no dot
            continue
        wgmma_expected = s["cc"] >= 90 and s["precision"] == "16bit" and cfg["BLOCK_M"] >= 64 and s["kind"] != "dkdv"
        if not (r["tensor_cores"] or r["mma_sync"]) or (wgmma_expected and not r["tensor_cores"]):
            bad.append(f"{r['triton']} {r['name']} {cfg}")
    assert not bad, "no wgmma (sm_90) / mma.sync:\n" + "\n".join(bad)


def _table_entries():
    """(cc, kind, precision, bd, (BLOCK_M, BLOCK_N, warps, stages)) of every shipped entry (cc 86: the 99 KB ones)."""
    from xtk.kernels import tiles
    out = set()
    for arch in (80, 90):
        data = tiles.shipped(arch)
        for sec, cc in (("tiles", arch), ("smem99", 86)):
            for k, v in data.get(sec, {}).items():
                if v is None:
                    continue  # refused on 99 KB archs: nothing ships
                kind, _, prec, bd = k.split("/")
                out.add((cc, "thr" if kind == "thrwide" else kind, prec, int(bd[1:]), tuple(v)))
    return out


def test_set_compiles_every_shipped_entry(aot_results):
    """Every tile of both tables (each kind, precision, head dim and class) was compiled here."""
    seen = {(r["spec"]["cc"], r["spec"]["kind"], r["spec"]["precision"], r["spec"]["d"],
             tuple(r["config"][n] for n in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")))
            for r in aot_results if r["spec"]["kind"] != "qkrows"}  # the row kernel: a fixed tile, no table
    missing = sorted(_table_entries() - seen)
    assert not missing, missing


def test_set_covers_every_switch_kernel_arch_and_precision(aot_results):
    specs = [r["spec"] for r in aot_results]
    assert {s["kind"] for s in specs} == {"fwd", "thr", "dkdv", "dq", "decode", "combine", "qkrows"}
    assert {80, 90} <= {s["cc"] for s in specs}
    assert {32, 64, 128, 256} <= {s["d"] for s in specs}
    assert {"float16", "bfloat16", "float32"} <= {s["dtype"] for s in specs}
    assert {"16bit", "tf32", "ieee"} == {s["precision"] for s in specs}
    seen = {(k, v) for s in specs for k, v in s["switches"].items()}
    for need in [("IS_CAUSAL", 1), ("BIAS_KIND", 1), ("BIAS_KIND", 2), ("BIAS_KIND", 3), ("BIAS_KIND", 4),
                 ("MASK_KIND", 1), ("MASK_KIND", 2), ("HAS_TOPK", 1), ("HAS_DROPOUT", 1), ("NEED_DSLOPE", 1),
                 ("NEED_DTAB", 1), ("NEED_DS", 1), ("NEED_DLSC", 1), ("HAS_NORM", 1), ("GROUPS", 2), ("HAS_DSCALE", 1),
                 ("HAS_ROT", 1), ("HAS_XPOS", 1)]:
        assert need in seen, need
    # the heaviest switches (a position bias or dense bias, a float mask, top-k, dropout) in each kernel
    # the QK row kernel: forward and backward, q and k rows, every feature, each dtype, packed batches
    rows = [s for s in specs if s["kind"] == "qkrows"]
    for cc in (80, 90):
        for backward, is_key in ((0, 0), (0, 1), (1, 0), (1, 1)):
            assert any(s["cc"] == cc and s["switches"].get("BACKWARD", 0) == backward and s["switches"].get("IS_KEY", 0)
                       == is_key and all(s["switches"].get(n) for n in QK + ("HAS_XPOS",)) for s in rows)
        assert {s["dtype"] for s in rows if s["cc"] == cc} == {"float16", "bfloat16", "float32"}
        assert {s["d"] for s in rows if s["cc"] == cc} == {32, 64, 128, 256}
        assert any(s["cc"] == cc and s["switches"].get("VARLEN") for s in rows)
    for kind in ("fwd", "dkdv", "dq"):
        for cc in (80, 90):
            sw = [s["switches"] for s in specs if s["kind"] == kind and s["cc"] == cc]
            assert any(w.get("BIAS_KIND") and w.get("MASK_KIND") and w.get("HAS_DROPOUT") and w.get("HAS_TOPK")
                       for w in sw), (kind, cc)
    # the learned QK-norm scale's gradient (NEED_DLSC) with each class's switches, at the dq kernel's
    # heavy tile (tiles.dq_class), TF32 included
    from xtk.kernels import aot
    dlsc = [s for s in specs if s["kind"] == "dq" and s["switches"].get("NEED_DLSC")]
    assert {aot.spec_cls(s) for s in dlsc} == {"heavy"}
    assert {0, 1, 2} <= {s["switches"].get("BIAS_KIND", 0) for s in dlsc}
    assert any(s["switches"].get("MASK_KIND") for s in dlsc)
    assert {80, 90} <= {s["cc"] for s in dlsc if s["precision"] == "tf32"}
    assert any(s["kind"] == "thr" and s.get("topk") == 128 for s in specs)
    # the NaN rule's guard twins: each kernel's flagged twin on both archs, the forward's empty-row twin
    for kind in ("fwd", "dkdv", "dq"):
        for cc in (80, 90):
            assert any(s["kind"] == kind and s["cc"] == cc and s["switches"].get("NAN_GUARD") == 1 for s in specs)
    assert any(s["kind"] == "thr" and s["switches"].get("NAN_GUARD") == 1 for s in specs)
    assert {80, 90} <= {s["cc"] for s in specs if s["kind"] == "fwd" and s["switches"].get("NAN_GUARD") == 2}
    # dK/dV's GQA-group split (GROUP_SPLIT): at every 16-bit dK/dV entry, and TF32 / fp32 at head dim 128,
    # with the everyday kernel's representatives
    plain_kv = {(s["cc"], s["d"], s["precision"], json.dumps(s["switches"], sort_keys=True)) for s in specs
                if s["kind"] == "dkdv" and not s["switches"].get("GROUP_SPLIT")}
    split_kv = {(s["cc"], s["d"], s["precision"], json.dumps({k: v for k, v in s["switches"].items() if k != "GROUP_SPLIT"},
                                                              sort_keys=True))
                for s in specs if s["kind"] == "dkdv" and s["switches"].get("GROUP_SPLIT")}
    want = {(cc, d, p) for cc, d, p, _ in plain_kv if p == "16bit" or d == 128}
    assert split_kv <= plain_kv and {(cc, d, p) for cc, d, p, _ in split_kv} == want
    assert {80, 86, 90} <= {cc for cc, _, _ in want} and {"16bit", "tf32", "ieee"} == {p for _, _, p in want}
    # the packed-batch switch (attention_varlen's one launch) in the four kernels on both archs
    for kind in ("fwd", "thr", "dkdv", "dq"):
        for cc in (80, 90):
            assert any(s["kind"] == kind and s["cc"] == cc and s["switches"].get("VARLEN") for s in specs), (kind, cc)
    # the decode kernel (issue 14): every switch it has, both cache layouts, on both archs
    dec = [s for s in specs if s["kind"] == "decode"]
    dec_seen = {(k, v) for s in dec for k, v in s["switches"].items()}
    for need in [("IS_CAUSAL", 1), ("BIAS_KIND", 1), ("BIAS_KIND", 2), ("HAS_NORM", 1), ("HAS_DSCALE", 1), ("HAS_ROT", 1),
                 ("HAS_XPOS", 1), ("GQA_REPEAT", 1), ("PAGED", 1), ("TOPK_PASS", 1), ("TOPK_PASS", 2)]:
        assert need in dec_seen, need
    for cc in (80, 90):
        assert {s["precision"] for s in dec if s["cc"] == cc} == {"16bit", "tf32", "ieee"}
        assert any(not s["switches"].get("PAGED") for s in dec if s["cc"] == cc)
        assert {s["d"] for s in specs if s["kind"] == "combine" and s["cc"] == cc} == {32, 64, 128, 256}
