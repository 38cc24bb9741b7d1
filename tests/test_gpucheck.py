"""``python -m xtk gpucheck``: its plumbing on CPU (``--dry-run``: the interpreter, tiny sizes, every
phase once), and its correctness sweep can fail (a broken kernel is reported, and exits 1)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from xtk.bench import gpucheck_cases, gpucheck_report, gpucheck_speed


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "XTK_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "xtk", "gpucheck", "--dry-run", "--out", str(out), "--jobs", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc, out


def test_dry_run_writes_every_file_and_runs_every_phase(dry_run):
    proc, out = dry_run
    res = json.loads((out / "report.json").read_text())
    png = [] if res["plot"] else ["report.png"]  # res["plot"]: why there is no plot (matplotlib missing)
    assert sorted(os.listdir(out)) == sorted(["report.json", "report.md", "tiles_tuned_sm90.json"] + png), proc.stderr
    assert res["compile_s"] > 0
    kernel_cases = [c for c in res["cases"] if not c["name"].startswith(("ext", "extension", "nan-rule"))]
    assert len(kernel_cases) == len(gpucheck_cases.cases(False, True)) and all(c["ok"] for c in kernel_cases), \
        [c for c in kernel_cases if not c["ok"]]
    nan_cases = [c for c in res["cases"] if c["name"].startswith("nan-rule")]
    assert len(nan_cases) == len(gpucheck_cases.NAN_FEATURES) and all(c["ok"] for c in nan_cases), nan_cases
    assert len(res["speed"]) == len(gpucheck_speed.cells(False, True))
    assert all(r["ms"] for r in res["speed"] if r["impl"] in ("xtk", "eager")), res["speed"]
    assert {r["op"] for r in res["bandwidth"]} == {"copy", "rms_norm", "glu"}
    assert res["tune"] and all(t["ms"] for t in res["tune"])
    tuned = json.loads((out / "tiles_tuned_sm90.json").read_text())
    assert tuned["arch"] == 90 and tuned["tiles"]
    assert any(t["verdict"] != "n/a" for t in res["targets"]), res["targets"]
    assert "# xtk gpucheck" in (out / "report.md").read_text()
    ext_ok = all(c["ok"] for c in res["cases"] if c["name"].startswith(("ext", "extension")))
    assert proc.returncode == (0 if ext_ok else 1), proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_broken_kernel_fails_the_check(monkeypatch):
    """The correctness sweep can fail: perturb the kernel's output and the case is reported."""
    from xtk.kernels import attention_op
    real = attention_op._forward

    def broken(*args, **kwargs):
        out, lse, thr = real(*args, **kwargs)
        return out * 1.01, lse, thr
    monkeypatch.setattr(attention_op, "_forward", broken)
    case = gpucheck_cases.cases(False, True)[1]
    verdict = gpucheck_cases.run_case(case, "cpu")
    assert not verdict["ok"] and any(not c["ok"] and c["name"] == "out" for c in verdict["checks"]), verdict


def test_the_nan_rule_cases_can_fail(monkeypatch):
    """Without the guard twins (forward twin off, the backward's flag forced to 0) every NaN-rule
    case reports the gradients the masked poison reaches."""
    from xtk.kernels import attention_op
    real_flag = attention_op.nan_flag
    monkeypatch.setattr(attention_op, "fwd_guard", lambda *a: 0)
    monkeypatch.setattr(attention_op, "nan_flag", lambda *ts: real_flag(*ts) * 0)
    verdicts = gpucheck_cases.nan_rule_cases("cpu", True)
    assert verdicts and not any(v["ok"] for v in verdicts), verdicts
    assert all(any(c["name"] == "dq" and not c["ok"] for c in v["checks"]) for v in verdicts)


def test_targets_read_the_anchor_cells():
    """Ratios come from the anchor shape's cells: time(baseline) / time(xtk)."""
    from xtk.bench.common import Result
    p = dict(b=1, h=2, n=32, d=16, causal=False)
    rows = [Result("attention", "alibi", "xtk", "fwd", p, ms=2.0), Result("attention", "none", "sdpa-flash", "fwd", p, ms=1.0),
            Result("attention", "alibi", "flex", "fwd", p, ms=3.0)]
    got = {t["target"]: t for t in gpucheck_report.attention_targets(rows, 32, 16)}
    assert got["alibi fwd vs best SDPA without bias"]["value"] == 0.5
    assert got["alibi fwd vs best SDPA without bias"]["verdict"] == "MISS"
    assert got["alibi fwd vs FlexAttention"]["value"] == 1.5 and got["alibi fwd vs FlexAttention"]["verdict"] == "PASS"
    assert got["t5 fwd vs FlexAttention"]["verdict"] == "n/a"


def test_tune_spec_names_classes_features_and_dims():
    """``--tune 'posbias:topk8,plain@64'``: those classes, top-k standing for posbias, d64 only, the
    shipped tile among the candidates; an unknown class or feature is refused by name (qk: the decode
    kernel's; heavy: none of the bench's features launches it since top-k alone is posbias)."""
    cells = gpucheck_speed.tune_cells(False, False, 90, "posbias:topk8,plain@64")
    assert {(c[0], c[4]) for c in cells} == {("posbias", "topk8"), ("plain", "none")}
    assert {c[2] for c in cells} == {64}
    shipped = gpucheck_speed._shipped_tile(90, "dq", "posbias", 64)
    assert shipped and ("posbias", "dq", 64, shipped, "topk8") in cells
    for bad in ("nosuch", "posbias:nosuch", "qk", "heavy"):
        with pytest.raises(ValueError, match="--tune"):
            gpucheck_speed.tune_cells(False, False, 90, bad)


def test_full_run_times_the_anchor_and_memory_cells_first():
    """A full run cut by its budget still has the targets' cells: the anchor shape's come first, then
    the memory target's (xtk and eager ALiBi forward+backward at n 1k and 16k, d 128), then the
    anchor's slow baselines (eager and SDPA T5 forward+backward: ~2.5 s a step on an H200)."""
    cells = gpucheck_speed.cells(False, False)
    anchor = gpucheck_speed.shapes(True, False)[0]
    slow = {("eager", "t5", anchor, causal, "fwd+bwd") for causal in (False, True)}
    slow |= {("sdpa", "t5", anchor, causal, "fwd+bwd") for causal in (False, True)}
    n_anchor = sum(c[2] == anchor for c in cells) - len(slow)
    assert n_anchor > 0 and all(c[2] == anchor and c not in slow for c in cells[:n_anchor])
    memory = cells[n_anchor:n_anchor + 4]
    assert {(c[0], c[1], c[2][2], c[2][3], c[4]) for c in memory} == \
        {(impl, "alibi", n, 128, "fwd+bwd") for impl in ("xtk", "eager") for n in (1024, 16384)}
    assert set(cells[n_anchor + 4:n_anchor + 8]) == slow
    assert sorted(cells, key=str) == sorted(set(cells), key=str)  # reordered, none lost or repeated


def test_compile_shards_start_no_job_past_their_deadline(monkeypatch):
    """--warm-until: a shard hands out jobs only until then (what is left compiles on first use)."""
    from xtk.bench import gpucheck
    plan = gpucheck.Plan(gpucheck.parse(["--dry-run"]))
    ran = []
    monkeypatch.setattr(gpucheck, "_warm_one", lambda plan, what, item: ran.append(what))
    gpucheck.warm_shard(plan, "0/1", until=0.0)
    assert ran == []
    gpucheck.warm_shard(plan, "0/1", until=None)
    assert len(ran) == len(plan.warm_jobs())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the dry run launches on CPU tensors: the interpreter (tests/conftest.py sets it without CUDA)")
def test_dkdv_split_bench_dry_run(monkeypatch, capsys):
    """bench/profile_dkdv_split.py's plumbing on CPU (the interpreter, a stand-in 132-SM GPU): both
    calls of every cell run, the split is taken where the grid is small and not where it fills."""
    from xtk.bench import profile_dkdv_split
    from xtk.kernels import attention_op
    monkeypatch.setattr(attention_op, "sm_count", attention_op.sm_count)  # the dry run replaces it: restored after
    profile_dkdv_split.main(["--dry-run", "--n", "4096", "--d", "128"])  # the GPU run's flags parse too
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| b")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("b1 h4 hk1 n40 d16 full", "4"), ("b1 h4 hk1 n40 d16 causal", "4"),
        ("b2 h4 hk4 n40 d16 full", "1"), ("b2 h4 hk4 n40 d16 causal", "1")]
