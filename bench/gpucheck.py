"""``python -m xtk gpucheck``: one command that proves the kernels on a GPU and measures them.

    python -m xtk gpucheck --quick --out DIR     # a few minutes on an H100
    python -m xtk gpucheck --out DIR             # the whole check (about 6 minutes on an H100)
    python -m xtk gpucheck --dry-run --out DIR   # CPU: the interpreter, tiny sizes, every code path once

Phases: environment (``xtk info``); compilation of everything the run needs, in ``--jobs``
parallel processes (Triton's and inductor's on-disk caches carry it to the main process; its
wall time is reported); correctness (gpucheck_cases: the compiled kernels against the fp64
oracle, 2x rule, values and every gradient; the extension's RMSNorm/GLU; a device-guard case on
a second GPU); speed and tile tuning (gpucheck_speed), cut short past ``--budget-s``. Writes
``report.json``, ``report.md``, ``report.png`` and ``tiles_tuned_sm<cc>.json`` into ``--out``
(``partial.json`` after correctness and after speed, until the whole report replaces it),
prints a verdict per target, and exits 1 on any correctness failure (speed misses do not fail).
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time

import torch

from . import gpucheck_cases as gc_cases
from . import gpucheck_report as report
from . import gpucheck_speed as speed
from .common import Result, environment


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m xtk gpucheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: gpucheck-<device>-<date> here)")
    p.add_argument("--quick", action="store_true", help="covering subsets: fits a short GPU lease")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes: checks the plumbing")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: cores - 2; 0: none)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop timing/tuning past this many seconds from start (default 330, quick 200)")
    p.add_argument("--no-tune", action="store_true", help="skip the tile tuning phase")
    p.add_argument("--tune", default=None, metavar="CLASSES[@DIMS]",
                   help="tune these classes (optionally class:feature) at these head dims, e.g. 'posbias:topk8,plain@128'")
    p.add_argument("--warm-shard", default=None, help=argparse.SUPPRESS)  # internal: compile shard I/N
    p.add_argument("--warm-until", type=float, default=None, help=argparse.SUPPRESS)  # internal: epoch seconds
    return p.parse_args(argv)


class Plan:
    """Everything one run does, derived from the flags alone (the compile shards rebuild it)."""

    def __init__(self, args):
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        self.arch = 90 if self.dry else _arch()
        self.cases = gc_cases.cases(args.quick, self.dry)
        self.cells = speed.cells(args.quick, self.dry)
        self.tune = [] if args.no_tune else speed.tune_cells(args.quick, self.dry, self.arch, args.tune)

    def warm_jobs(self):
        """(what, item) of every compile: kernel cases, xtk/flex speed cells, tuning candidates."""
        return ([("case", c) for c in self.cases] + [("cell", c) for c in self.cells if c[0] in ("xtk", "flex")]
                + [("tune", c) for c in self.tune])


def _arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _warm_one(plan, what, item):
    if what == "case":
        gc_cases.run_case(item, plan.device, warm_only=True)
        return
    call = (speed.make_call(item, plan.dtype, plan.device)[0] if what == "cell"
            else speed.tune_call(item, plan.dtype, plan.device, plan.dry))
    if call is not None:
        call()


# Shares of --budget-s: compilation hands out no job past COMPILE_SHARE of it (what is left compiles
# on first use, inside its phase); in the full run the speed phase times no cell past SPEED_SHARE (its
# 432 cells would leave tuning nothing; --quick's 44 take what they need), tuning stops at the whole
# budget. With the correctness sweep (never cut) the run ends near the budget.
COMPILE_SHARE, SPEED_SHARE = 0.35, 0.75


def warm_shard(plan, shard: str, until: float = None) -> int:
    """Run (compile) each job of shard I/N once, in the plan's order, none started past ``until``
    (epoch seconds); errors are left to the measured run to report."""
    i, n = (int(x) for x in shard.split("/"))
    for j, (what, item) in enumerate(plan.warm_jobs()):
        if until is not None and time.time() > until:
            break
        if j % n == i:
            try:
                _warm_one(plan, what, item)
            except Exception as e:  # noqa: BLE001
                print(f"warm {what} {item}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            if plan.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    return 0


def compile_all(argv, jobs: int, until: float) -> float:
    """Compile in ``jobs`` processes (the same flags plus --warm-shard), none starting a job past
    ``until`` (epoch seconds); -> wall seconds."""
    t0 = time.perf_counter()
    if jobs > 0:
        procs = [subprocess.Popen([sys.executable, "-m", "xtk.bench.gpucheck", *argv, "--warm-shard", f"{i}/{jobs}",
                                   "--warm-until", repr(until)], stdout=subprocess.DEVNULL) for i in range(jobs)]
        for p in procs:
            p.wait()
    return time.perf_counter() - t0


def _bar(total, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=2.0)


def run_phase(items, fn, desc, deadline=None):
    """[fn(item)] with a progress bar; items past ``deadline`` (perf_counter) give None."""
    bar, out = _bar(len(items), desc), []
    for item in items:
        out.append(fn(item) if deadline is None or time.perf_counter() < deadline else None)
        if bar:
            bar.update()
    if bar:
        bar.close()
    return out


def _info() -> str:
    from xtk.__main__ import info
    buf = io.StringIO()
    info(buf)
    return buf.getvalue()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # triton reads TRITON_INTERPRET when xtk (and so triton) is first imported: start afresh with it
        env = dict(os.environ, TRITON_INTERPRET="1", XTK_BACKEND="triton")  # XTK_BACKEND: attention only
        return subprocess.call([sys.executable, "-m", "xtk.bench.gpucheck", *argv], env=env)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpucheck: no CUDA device here (use --dry-run to check the plumbing on CPU)", file=sys.stderr)
        return 2
    plan = Plan(args)
    if args.warm_shard:
        return warm_shard(plan, args.warm_shard, args.warm_until)
    t_start = time.perf_counter()
    budget = args.budget_s or (200.0 if args.quick else 330.0)
    out = args.out or f"gpucheck-{report.slug(plan.device)}-{time.strftime('%Y%m%d-%H%M')}"
    os.makedirs(out, exist_ok=True)
    jobs = args.jobs if args.jobs is not None else (2 if plan.dry else max(1, (os.cpu_count() or 4) - 2))
    res = dict(env=environment(plan.device), info=_info(), args=vars(args), arch=plan.arch)
    print(res["info"], flush=True)
    res["compile_s"] = compile_all(argv, jobs, time.time() + COMPILE_SHARE * budget)
    print(f"gpucheck: compiled {len(plan.warm_jobs())} jobs in {jobs} processes: {res['compile_s']:.1f} s", flush=True)
    res["cases"] = run_phase(plan.cases, lambda c: gc_cases.run_case(c, plan.device), "correctness")
    res["cases"] += gc_cases.nan_rule_cases(plan.device, plan.dry)
    res["cases"] += gc_cases.ext_cases(plan.device, plan.dry) + ([] if plan.dry else gc_cases.device_guard_case())
    res["tf32_rounding"] = gc_cases.TF32_ROUNDING.get(str(plan.device), "not probed")  # how tl.dot reads fp32
    res["correctness_done_s"] = time.perf_counter() - t_start
    report.checkpoint(res, out)
    deadline = t_start + budget
    speed_deadline = t_start + budget * (SPEED_SHARE if plan.tune and not args.quick else 1.0)
    timed = run_phase(plan.cells, lambda c: speed.time_cell(c, plan.dtype, plan.device), "speed", speed_deadline)
    res["speed"] = [r.to_json() for r in timed if r is not None]
    bw = [speed.time_bandwidth(c, plan.dtype, plan.device, plan.dry) for c in speed.bandwidth_cells(plan.dry)]
    res["bandwidth"] = [r.to_json() for r in bw]
    res["speed_done_s"] = time.perf_counter() - t_start
    report.checkpoint(res, out)
    tuned = run_phase(plan.tune, lambda c: speed.time_tune(c, plan.dtype, plan.device, plan.dry), "tune", deadline)
    res["tune"] = [t for t in tuned if t is not None]
    res["tuned_tiles"] = speed.winners(res["tune"], plan.arch, f"gpucheck {res['env']['date']} {res['env']['device_name']}")
    res["skipped_for_budget"] = sum(r is None for r in timed) + sum(t is None for t in tuned)
    res["kernels"] = report.compiled_kernels()
    anchor = speed.shapes(True, plan.dry)[0]  # (b, h, n, d) of the targets
    res["targets"] = report.targets([Result(**_result_fields(r)) for r in res["speed"]], res["bandwidth"], anchor[2:])
    res["wall_s"] = time.perf_counter() - t_start
    report.write(res, out)
    return report.print_verdicts(res, out)


def _result_fields(row: dict) -> dict:
    keys = Result.__dataclass_fields__
    return {k: v for k, v in row.items() if k in keys}


if __name__ == "__main__":
    sys.exit(main())
