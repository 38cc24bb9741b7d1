"""gpucheck report: the performance targets of issue 11, the compiled kernels' resources, and the
files (``report.json``, ``report.md``, ``report.png``, ``tiles_tuned_sm<cc>.json``).

Targets (H100, bf16, n 4096, d 128, 16 heads; ratios from one run): forward with an in-kernel bias
>= 1.0x the fastest SDPA backend without bias; forward+backward >= 0.8x; >= 1.2x FlexAttention with
the same bias; top-k <= 2x the time without; >= 10x the eager path forward+backward; memory flat in
n at 16k tokens (b * n fixed) where eager runs out; RMSNorm and GLU >= 85% of copy bandwidth.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

from .common import Result, device_slug

SDPA = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn")
BIASES = ("alibi", "t5", "dtable")


def slug(device: str) -> str:
    return device_slug(device)


def _ms_at(results, impl, case, mode, causal, n=4096, d=128) -> Optional[float]:
    for r in results:
        p = r.params
        if (r.impl, r.case, r.mode, p.get("causal"), p.get("n"), p.get("d")) == (impl, case, mode, causal, n, d) and r.ms:
            return r.ms
    return None


def _best_sdpa(results, mode, causal, n=4096, d=128) -> Optional[float]:
    times = [t for t in (_ms_at(results, s, "none", mode, causal, n, d) for s in SDPA) if t]
    return min(times) if times else None


def _target(name, value, want, ok) -> dict:
    verdict = "n/a" if value is None else ("PASS" if ok(value) else "MISS")
    return dict(target=name, value=None if value is None else round(value, 3), want=want, verdict=verdict)


def attention_targets(results: list[Result], n: int = 4096, d: int = 128) -> list[dict]:
    """Ratios at the anchor shape (n 4096, d 128), causal and not; > 1 means xtk is faster."""
    out = []

    def _ms(*key):  # the anchor shape's cell
        return _ms_at(results, *key, n=n, d=d)
    for causal in (False, True):
        c = " causal" if causal else ""
        for mode, want in (("fwd", 1.0), ("fwd+bwd", 0.8)):
            sdpa = _best_sdpa(results, mode, causal, n, d)
            for bias in BIASES:
                x = _ms("xtk", bias, mode, causal)
                out.append(_target(f"{bias} {mode}{c} vs best SDPA without bias", sdpa / x if sdpa and x else None,
                                   f">= {want}x", lambda v, w=want: v >= w))
            for bias in ("alibi",) + BIASES[1:]:
                f, x = _ms("flex", bias, mode, causal), _ms("xtk", bias, mode, causal)
                out.append(_target(f"{bias} {mode}{c} vs FlexAttention", f / x if f and x else None, ">= 1.2x",
                                   lambda v: v >= 1.2))
            top, plain = _ms("xtk", "topk8", mode, causal), _ms("xtk", "none", mode, causal)
            out.append(_target(f"top-k {mode}{c} time / no top-k", top / plain if top and plain else None, "<= 2x",
                               lambda v: v <= 2.0))
        e, x = _ms("eager", "alibi", "fwd+bwd", causal), _ms("xtk", "alibi", "fwd+bwd", causal)
        out.append(_target(f"alibi fwd+bwd{c} vs eager", e / x if e and x else None, ">= 10x", lambda v: v >= 10))
    return out + [memory_target(results)]


def memory_target(results: list[Result]) -> dict:
    """xtk's forward+backward peak memory at n 16k over n 1k, 16k tokens each (linear memory: ~1)."""
    def peak(n):
        for r in results:
            if (r.impl, r.case, r.mode, r.params.get("n"), r.params.get("d")) == ("xtk", "alibi", "fwd+bwd", n, 128) \
                    and r.peak_mb:
                return r.peak_mb
        return None
    a, b = peak(1024), peak(16384)
    return _target("alibi fwd+bwd peak memory n16k / n1k at 16k tokens", b / a if a and b else None, "<= 1.5x",
                   lambda v: v <= 1.5)


def bandwidth_targets(rows: list[dict]) -> list[dict]:
    copy = next((r["gbps"] for r in rows if r["op"] == "copy" and r["gbps"]), None)
    out = []
    for r in rows:
        if r["op"] != "copy":
            v = r["gbps"] / copy if copy and r["gbps"] else None
            out.append(_target(f"{r['op']} forward GB/s / copy GB/s", v, ">= 0.85", lambda x: x >= 0.85))
    return out


def targets(results: list[Result], bandwidth: list[dict], anchor=(4096, 128)) -> list[dict]:
    return attention_targets(results, *anchor) + bandwidth_targets(bandwidth)


def compiled_kernels() -> list[dict]:
    """Registers, spills and shared memory of every attention kernel this process compiled or loaded."""
    try:
        from xtk.kernels import attention_bwd, attention_fwd, attention_qk
    except Exception:  # noqa: BLE001
        return []
    rows = []
    for fn in (attention_fwd._attn_fwd, attention_fwd._attn_topk_threshold, attention_bwd._attn_bwd_dkdv,
               attention_bwd._attn_bwd_dq, attention_qk._qk_rows):
        for entry in getattr(fn, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for key, kern in getattr(cache, "items", lambda: [])():
                meta = getattr(kern, "metadata", None)
                rows.append(dict(kernel=fn.__name__, regs=getattr(kern, "n_regs", None),
                                 spills=getattr(kern, "n_spills", None), shared=getattr(meta, "shared", None),
                                 warps=getattr(meta, "num_warps", None), stages=getattr(meta, "num_stages", None),
                                 key=re.sub(r"\s+", " ", str(key))[-400:]))
    return rows


# ----------------------------------------------------------------------------- files
def _md_cases(res) -> list[str]:
    bad = [c for c in res["cases"] if not c["ok"]]
    lines = [f"## Correctness: {len(res['cases']) - len(bad)} / {len(res['cases'])} cases pass (2x rule against fp64)", ""]
    for c in bad:
        why = c["error"] or "; ".join(x["why"] for x in c["checks"] if not x["ok"])
        lines.append(f"- FAIL `{c['name']}`: {why}")
    return lines + [""]


def _md_speed(res) -> list[str]:
    lines = ["## Speed (median ms; TFLOP/s with causal counted half; peak MB)", "",
             "| impl | feature | b h n d | causal | mode | ms | TFLOP/s | peak MB | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["speed"]:
        p = r["params"]
        ms = f"{r['ms']:.3f}" if r["ms"] else r["status"]
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else ""
        mem = f"{r['peak_mb']:.0f}" if r.get("peak_mb") else ""
        note = f"compile {r['compile_s']:.1f} s" if r.get("compile_s") else r.get("note", "")
        lines.append(f"| {r['impl']} | {r['case']} | {p['b']} {p['h']} {p['n']} {p['d']} | {int(p['causal'])} | "
                     f"{r['mode']} | {ms} | {tf} | {mem} | {note} |")
    lines += ["", "| op | GB/s | ms |", "|---|---|---|"]
    lines += [f"| {r['op']} {r['case']} | {r['gbps'] or 0:.0f} | {r['ms'] or 0:.3f} |" for r in res["bandwidth"]]
    return lines + [""]


def _md_targets(res) -> list[str]:
    lines = ["## Targets", "", "| target | value | want | verdict |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {t['want']} | {t['verdict']} |" for t in res["targets"]]
    return lines + [""]


def _md_tune(res) -> list[str]:
    lines = ["## Tile tuning (ms per candidate; winners in tiles_tuned_sm%d.json)" % res["arch"],
             "", "| class | kernel | d | tile (BM, BN, warps, stages) | ms |", "|---|---|---|---|---|"]
    lines += [f"| {t['cls']} | {t['kind']} | {t['d']} | {tuple(t['tile'])} | "
              + (f"{t['ms']:.3f}" if t["ms"] else t["status"]) + " |" for t in res["tune"]]
    spills = [k for k in res["kernels"] if k.get("spills")]
    lines += ["", f"Compiled kernels loaded by the main process: {len(res['kernels'])}, with spills: {len(spills)}"]
    lines += [f"- {k['kernel']} {k['warps']} warps {k['stages']} stages: {k['spills']} B spilled, {k['regs']} regs" for k in spills]
    return lines + [""]


def markdown(res) -> str:
    env = res["env"]
    head = [f"# xtk gpucheck: {env['device_name']} (sm_{res['arch']}), {env['date']}", "",
            f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, Python {env['python']}; "
            f"flags {' '.join(f'--{k}' for k, v in res['args'].items() if v is True) or '(none)'}; "
            f"compile {res['compile_s']:.0f} s, whole run {res['wall_s']:.0f} s"
            + (f"; {res['skipped_for_budget']} cells skipped past the time budget" if res["skipped_for_budget"] else ""),
            "", "```", res["info"].strip(), "```", ""]
    return "\n".join(head + _md_cases(res) + _md_targets(res) + _md_speed(res) + _md_tune(res))


def plot(res, path) -> Optional[str]:
    """Bars: xtk ms per feature against the best SDPA without bias (n 4096, d 128)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed"
    rows = [r for r in res["speed"] if r["ms"] and r["impl"] in ("xtk", "flex") + SDPA]
    if not rows:
        return "no timed rows"
    fig, ax = plt.subplots(figsize=(12, 5))
    labels = [f"{r['impl']}\n{r['case']}\n{r['mode']}{' c' if r['params']['causal'] else ''}" for r in rows]
    ax.bar(range(len(rows)), [r["ms"] for r in rows], color=["C0" if r["impl"] == "xtk" else "C1" for r in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=5, rotation=90)
    ax.set_ylabel("ms (median)")
    ax.set_title(f"xtk gpucheck, {res['env']['device_name']}: attention (blue xtk, orange baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def checkpoint(res, out: str) -> None:
    """The results so far into ``partial.json`` (a run killed by a lease's end still leaves them)."""
    with open(os.path.join(out, "partial.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)


def write(res, out: str) -> None:
    res["plot"] = plot(res, os.path.join(out, "report.png"))  # None, or why there is no plot
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(markdown(res))
    with open(os.path.join(out, f"tiles_tuned_sm{res['arch']}.json"), "w") as fh:
        json.dump(res["tuned_tiles"], fh, indent=1)
    if os.path.exists(os.path.join(out, "partial.json")):  # the whole report supersedes it
        os.remove(os.path.join(out, "partial.json"))


def print_verdicts(res, out: str) -> int:
    """One line per target and the correctness count; -> exit code (1 on a correctness failure)."""
    bad = [c for c in res["cases"] if not c["ok"]]
    print(f"\ngpucheck: correctness {len(res['cases']) - len(bad)}/{len(res['cases'])} "
          + ("PASS" if not bad else "FAIL"))
    for c in bad:
        print(f"  FAIL {c['name']}: {c['error'] or '; '.join(x['why'] for x in c['checks'] if not x['ok'])}"[:400])
    for t in res["targets"]:
        print(f"  {t['verdict']:4s} {t['target']}: {t['value']} (want {t['want']})")
    print(f"gpucheck: compile {res['compile_s']:.0f} s, whole run {res['wall_s']:.0f} s; report in {out}")
    return 1 if bad else 0
