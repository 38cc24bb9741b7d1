"""AOT compile of the Triton attention kernels for sm_80 and sm_90 (no GPU needed).

Runs ``python -m xtk.kernels.aot`` in a subprocess: the interpreter switch that conftest.py sets
for the other tests must be off for a real compile, and the ptxas log (registers, spills) is
only printed with ``TRITON_DUMP_PTXAS_LOG=1`` and a fresh ``TRITON_CACHE_DIR``. Asserts, for
every specialization of the set the launcher can select: it compiles, its shared memory fits
(163 KB sm_80, 227 KB sm_90), ptxas reports no spill, and the PTX uses tensor cores. The CI set
takes about 4 minutes; ``XTK_FULL_TESTS=1`` compiles the full set.
"""
import json
import os
import subprocess
import sys

import pytest

FULL = os.environ.get("XTK_FULL_TESTS") == "1"


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    import triton  # noqa: F401  (a hard dependency: fail, do not skip, if it is missing)
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION="1")
    out = tmp / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "xtk.kernels.aot", "--set", "full" if FULL else "ci",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results, "no specialization compiled"
    return results


def test_every_specialization_compiles(aot_results):
    errors = [f"{r['name']}: {r['error']}" for r in aot_results if "error" in r]
    assert not errors, "\n".join(errors)


def test_shared_memory_fits(aot_results):
    over = [f"{r['name']}: {r['shared']} B > {r['smem_limit']} B" for r in aot_results
            if "error" not in r and r["shared"] > r["smem_limit"]]
    assert not over, "\n".join(over)


# Known, bounded spills (bytes, measured): the dK/dV kernel at head dim 256 with every QK feature AND
# causal + ALiBi + bool mask + top-k + dropout. No tile config of 16-32 rows / 8 warps compiled it
# spill-free (tiles of 16x16 that fit it spill on the QK switches alone: ptxas caps them at 128
# registers); open work, listed in the closing note of issue 3.
KNOWN_SPILLS = {
    ("dkdv", 80, 256, "heavy+qk"): 168,
    ("dkdv", 90, 256, "heavy+qk"): 16,
}


def _known_spill(spec):
    sw = spec["switches"]
    heavy_qk = all(sw.get(n) for n in ("IS_CAUSAL", "BIAS_KIND", "MASK_KIND", "HAS_TOPK", "HAS_DROPOUT",
                                       "HAS_NORM", "HAS_DSCALE", "HAS_ROT", "HAS_XPOS"))
    return KNOWN_SPILLS.get((spec["kind"], spec["cc"], spec["d"], "heavy+qk" if heavy_qk else ""), 0)


def test_ptxas_reports_no_spills(aot_results):
    ok = [r for r in aot_results if "error" not in r]
    missing = [r["name"] for r in ok if not r["ptxas_log_found"]]
    assert not missing, f"no ptxas log (cached kernel?): {missing}"
    spills = [f"{r['name']} ({r['config']}): {r['spill_bytes']} B spilled, {r['registers']} registers"
              for r in ok if r["spill_bytes"] and r["spill_bytes"] > _known_spill(r["spec"])]
    assert not spills, "\n".join(spills)


def _uses_qk(spec):
    return any(spec["switches"].get(n) for n in ("HAS_NORM", "HAS_DSCALE", "HAS_ROT"))


def test_tensor_cores_used(aot_results):
    """Every 16-bit attention specialization; fp32 uses IEEE products (FMA) unless TF32 is allowed.
    One documented exception: at head dim 256 on sm_90 the backward kernels (dkdv, dq), and the
    forward with in-kernel QK features, run tiles of 16-32 rows (64-row wgmma tiles spill there),
    so they use mma.sync tensor cores."""
    def ok(r):
        if r["tensor_cores"]:
            return True
        s = r["spec"]
        small_tiles = s["d"] > 128 and (s["kind"] in ("dkdv", "dq") or (s["kind"] == "fwd" and _uses_qk(s)))
        return small_tiles and s["cc"] >= 90 and r.get("mma_sync")
    plain = [r["name"] for r in aot_results if "error" not in r and r["spec"]["dtype"] != "float32" and not ok(r)]
    assert not plain, f"no wgmma (sm_90) / mma.sync (sm_80) in: {plain}"


def test_set_covers_every_switch_kernel_arch_and_head_dim(aot_results):
    specs = [r["spec"] for r in aot_results]
    assert {s["kind"] for s in specs} == {"fwd", "thr", "dkdv", "dq"}
    assert {s["cc"] for s in specs} == {80, 90}
    assert {32, 64, 128} <= {s["d"] for s in specs}
    assert {"float16", "bfloat16", "float32"} <= {s["dtype"] for s in specs}
    seen = {(k, v) for s in specs for k, v in s["switches"].items()}
    for need in [("IS_CAUSAL", 1), ("BIAS_KIND", 1), ("BIAS_KIND", 2), ("BIAS_KIND", 3), ("BIAS_KIND", 4),
                 ("MASK_KIND", 1), ("MASK_KIND", 2), ("HAS_TOPK", 1), ("HAS_DROPOUT", 1), ("NEED_DSLOPE", 1),
                 ("NEED_DTAB", 1), ("NEED_DS", 1), ("NEED_DLSC", 1), ("HAS_NORM", 1), ("GROUPS", 2), ("HAS_DSCALE", 1),
                 ("HAS_ROT", 1), ("HAS_XPOS", 1)]:
        assert need in seen, need
    # the in-kernel QK features in every kernel, alone with the heaviest switches, on both archs
    for kind in ("fwd", "thr", "dkdv", "dq"):
        assert any(s["kind"] == kind and _uses_qk(s) for s in specs), kind
    for kind in ("fwd", "dkdv", "dq"):
        for cc in (80, 90):
            assert any(s["kind"] == kind and s["cc"] == cc and _uses_qk(s) and s["switches"].get("HAS_DROPOUT")
                       and s["switches"].get("HAS_TOPK") for s in specs), (kind, cc)
            # ... at the largest head dim and with fp32 (IEEE FMA tiles)
            assert any(s["kind"] == kind and s["cc"] == cc and _uses_qk(s) and s["d"] == 256 for s in specs), (kind, cc)
            assert any(s["kind"] == kind and s["cc"] == cc and _uses_qk(s) and s["dtype"] == "float32"
                       for s in specs), (kind, cc)
    assert any(s["kind"] == "dq" and s["switches"].get("NEED_DLSC") for s in specs)
