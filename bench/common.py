"""What every benchmark shares: timing, peak memory, OOM handling, the result row, environment.

Timing: on CUDA ``triton.testing.do_bench`` (median of CUDA-event timings, cache flushed) when
triton is importable, else CUDA events; on CPU repeated ``time.perf_counter`` wall-clock after
one warm-up call, median of the repeats.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
what was allocated before the call. On CPU (Linux) the process's resident-set high-water mark
``VmHWM`` from ``/proc/self/status``, reset before the call by writing ``5`` to
``/proc/self/clear_refs``, minus the resident set before the call: the extra RSS the call needed at
its peak (torch's CPU allocator hands large blocks back to the OS, so this tracks live tensors:
during that call glibc's mmap threshold is fixed at 128 KiB; for the timed calls after it, at 32 MiB,
so that tensors reuse heap memory as in a long-running process instead of faulting fresh pages in
on every call). Where neither works the column says ``n/a``.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Result:
    """One measured (op, case, implementation, mode) cell."""

    op: str
    case: str                     # feature / configuration name
    impl: str                     # xtk | eager | sdpa | flex | F.rms_norm ...
    mode: str                     # fwd | fwd+bwd | step | generate
    params: dict = field(default_factory=dict)   # n, b, h, d, causal, dtype ...
    ms: Optional[float] = None    # median time per call
    peak_mb: Optional[float] = None
    flops: Optional[float] = None  # per call (attention: causal counted as half)
    bytes: Optional[float] = None  # per call, minimal traffic (norms / glu)
    tokens: Optional[float] = None  # per call (model / generation)
    status: str = "ok"            # ok | OOM | error: ... | skipped: ...
    note: str = ""
    compile_s: Optional[float] = None  # flex_attention: first-call (compile) time

    @property
    def tflops(self) -> Optional[float]:
        return self.flops / self.ms / 1e9 if self.flops and self.ms else None

    @property
    def gbps(self) -> Optional[float]:
        return self.bytes / self.ms / 1e6 if self.bytes and self.ms else None

    @property
    def tokens_per_s(self) -> Optional[float]:
        return self.tokens / self.ms * 1e3 if self.tokens and self.ms else None

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(tflops=self.tflops, gbps=self.gbps, tokens_per_s=self.tokens_per_s)
        return d


# ----------------------------------------------------------------------------- environment
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def device_slug(device: str) -> str:
    """A folder name for ``bench/results/``: e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-2t-intel-xeon-...``."""
    name = device_name(device).lower()
    if device == "cpu":
        name = f"cpu-{torch.get_num_threads()}t-" + name
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:60]


def environment(device: str) -> dict:
    env = {
        "device": device,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        import xtk
        env["xtk"] = xtk.__version__
    except Exception:
        pass
    return env


# ----------------------------------------------------------------------------- memory
@contextlib.contextmanager
def frozen_gc():
    """The objects alive now (torch, inductor, transformers: ~300k) moved out of the collector's
    reach for the block: each cell's ``gc.collect()`` then scans only what the cell made (0.14 s per
    collect before, two per cell: ~40 s of the quick CPU sweep's wall time). Unfrozen after, so
    that exit still frees them."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _proc_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _set_malloc(mmap_threshold: int) -> None:
    """glibc's mmap threshold (and trim threshold, twice it); a no-op where there is no glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)      # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 * mmap_threshold)  # M_TRIM_THRESHOLD
    except Exception:
        pass


def _fix_malloc_threshold() -> None:
    """For a peak-memory call: glibc raises its mmap threshold after large frees, after which freed
    tensors stay in the heap and never show in the resident set again; a small fixed threshold
    (128 KiB) keeps large blocks mmapped. Not for timing: every large tensor then costs fresh page
    faults on every call (an RMSNorm forward of 4096 x 1024 took 7.8 ms instead of 1.2), which a
    long-running process does not pay: ``_steady_malloc`` after the call."""
    _set_malloc(128 * 1024)


def _steady_malloc() -> None:
    """The timed calls: blocks up to 32 MiB reused from the heap (glibc's own ceiling for its
    dynamic threshold, where a training process settles), larger ones mmapped."""
    _set_malloc(32 * 1024 * 1024)


def _reset_hwm() -> bool:
    _fix_malloc_threshold()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``.mb`` = the extra memory the block needed at its peak (see module doc)."""

    def __init__(self, device: str):
        self.device = device
        self.mb: Optional[float] = None

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._ok = _reset_hwm()
            self._base = _proc_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            if self._ok and self._base is not None:
                hwm = _proc_kb("VmHWM")
                self.mb = None if hwm is None else max(0, hwm - self._base) / 1024
            _steady_malloc()
        return False


# ----------------------------------------------------------------------------- timing
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, min_reps: int = 3, min_time_s: float = 0.2,
            max_reps: int = 50) -> float:
    """Median milliseconds per call of ``fn`` (already warmed up by the caller)."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except Exception:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(max(min_reps, 10)):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
    return statistics.median(time_ms_samples(fn, min_reps, min_time_s, max_reps))


def time_ms_samples(fn, min_reps: int = 3, min_time_s: float = 0.2, max_reps: int = 50) -> list[float]:
    """Wall-clock milliseconds of repeated calls: at least ``min_reps``, more until ``min_time_s``."""
    times = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def measure(result: Result, make: Callable[[], Callable[[], object]], device: str, quick: bool = True) -> Result:
    """Fill ``result`` by timing the callable that ``make()`` returns: one warm-up call, one call under
    ``PeakMemory`` (also the first timing sample on CPU), then repeats; the median is kept.
    Out-of-memory becomes status 'OOM'; other errors 'error: ...'."""
    try:
        fn = make()
        fn()  # warm-up: lazy imports, thread pools, allocator caches, compilation
        _sync(device)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            first = (time.perf_counter() - t0) * 1e3
        result.peak_mb = mem.mb

        def call():
            fn()
            _sync(device)
        if device == "cuda":
            result.ms = time_ms(call, device)
        else:  # the measured call is the first sample
            more = time_ms_samples(call, min_reps=2 if quick else 4, min_time_s=0.1 if quick else 1.0)
            result.ms = statistics.median([first] + more)
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not crash
        result.status = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        result.ms = None
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def measure_interleaved(cells: list, device: str, quick: bool = True) -> None:
    """Fill each ``Result`` of ``cells`` = ``[(result, make)]`` as ``measure`` does, but with the
    samples taken round-robin (one call of each callable per round, after one warm-up and one
    peak-memory call each), so that load that comes and goes slows every implementation alike and
    their ratio holds; each callable's median is kept. A callable that fails drops out."""
    live = []
    for r, make in cells:
        fn = _first_calls(r, make, device)
        if fn is not None:
            live.append((r, fn))
    samples = {id(r): [] for r, _ in live}
    min_reps, min_time = (3, 0.3) if quick else (7, 2.0)
    t_end = time.perf_counter() + min_time
    rounds = 0
    while live and (rounds < min_reps or (time.perf_counter() < t_end and rounds < 50)):
        for r, fn in list(live):
            try:
                t0 = time.perf_counter()
                fn()
                _sync(device)
                samples[id(r)].append((time.perf_counter() - t0) * 1e3)
            except Exception as e:  # noqa: BLE001
                r.status, r.ms = _failure(e), None
                live.remove((r, fn))
        rounds += 1
    for r, _ in live:
        r.ms = statistics.median(samples[id(r)])
    gc.collect()


def _first_calls(r: Result, make, device: str):
    """The callable ``make()`` gives, after a warm-up call and a call under ``PeakMemory`` (into
    ``r.peak_mb``); None, with ``r.status`` set, when either fails."""
    try:
        fn = make()
        fn()
        _sync(device)
        with PeakMemory(device) as mem:
            fn()
            _sync(device)
        r.peak_mb = mem.mb
        return fn
    except Exception as e:  # noqa: BLE001
        r.status, r.ms = _failure(e), None
        return None


def _failure(e: BaseException) -> str:
    return "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _busy_loop(seconds: float) -> None:
    """One competing process: pure-Python arithmetic (one core busy, no torch: safe after fork) until
    killed or ``seconds`` have passed."""
    end, x = time.time() + seconds, 0
    while time.time() < end:
        for i in range(10000):
            x = (x * 31 + i) % 1000003


class BusyLoad:
    """Context manager: ``n`` competing processes (``_busy_loop``, one busy core each) while the
    block runs, stopped when it ends and at most ``max_seconds`` after they start either way: the
    'busy machine' rows (data-loader workers, a second job). ``n`` 0: nothing. Forked where the
    platform can (no re-import of the caller's main module); RuntimeError if they do not stay up."""

    def __init__(self, n: int, max_seconds: float = 900.0):
        self.n, self.max_seconds, self.procs = n, max_seconds, []

    def __enter__(self):
        if self.n:
            import multiprocessing as mp
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.procs = [ctx.Process(target=_busy_loop, args=(self.max_seconds,), daemon=True) for _ in range(self.n)]
            for p in self.procs:
                p.start()
            time.sleep(1.0)   # let them start spinning
            dead = [p.exitcode for p in self.procs if not p.is_alive()]
            if dead:
                self.__exit__()
                raise RuntimeError(f"BusyLoad: {len(dead)} of {self.n} competing processes exited at start "
                                   f"(exit codes {dead}); no busy row can be measured")
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(timeout=10)
        self.procs = []
        return False


def timed_step(fwd: Callable[[], torch.Tensor], grad: bool, leaves=(), go=None) -> Callable[[], object]:
    """The call a benchmark times: ``fwd()`` under ``no_grad`` (forward), or with ``grad`` the
    ``leaves``' gradients cleared, then ``fwd().backward(go)`` (forward+backward)."""
    if not grad:
        def step():
            with torch.no_grad():
                return fwd()
        return step

    def step():
        for t in leaves:
            t.grad = None
        fwd().backward(go)
    return step


def copy_call(nbytes: float, dtype, device: str) -> Callable[[], object]:
    """The 'copy' baseline of the elementwise ops: ``dst.copy_(src)`` moving ``nbytes`` (half read,
    half written), the bytes the row counts for the op, so that copy ms / op ms is the share of a
    plain copy's bandwidth the op reaches in the same run."""
    elem = torch.finfo(dtype).bits // 8
    src = torch.randn(max(1, int(nbytes) // (2 * elem))).to(device, dtype)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def sweep_ops(op: str, shapes, cases, modes, impls, make_call, row, device: str, full: bool, dtype,
              progress=None) -> list[Result]:
    """One measured ``Result`` per (shape, case, mode, impl), in that order, for the elementwise ops
    (norms, glu): ``make_call(impl, case, shape, mode, dtype, device)`` gives the timed callable,
    ``row(shape, case, mode)`` the ``(params, bytes)`` of the row (``dtype`` is added to params);
    ``progress`` is advanced once per cell."""
    results = []
    dtype_name = str(dtype).replace("torch.", "")
    for shape in shapes:
        for case in cases:
            for mode in modes:
                for impl in impls:
                    params, nbytes = row(shape, case, mode)
                    r = Result(op, case, impl, mode, dict(params, dtype=dtype_name), bytes=nbytes)
                    measure(r, lambda: make_call(impl, case, shape, mode, dtype, device), device, quick=not full)
                    results.append(r)
                    if progress:
                        progress()
    return results


def fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def dump_json(path: str, env: dict, results: list[Result], argv: list[str]) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "command": "python -m xtk bench " + " ".join(argv),
                   "results": [r.to_json() for r in results]}, f, indent=1)
