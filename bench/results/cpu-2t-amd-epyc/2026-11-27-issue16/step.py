"""xtk / x-transformers training-step ratio, interleaved (issue 16's measurement)."""
import sys, torch
from xtk.bench import bench_model
from xtk.bench.common import Result, measure_interleaved, BusyLoad


def main():
    torch.set_num_threads(2)
    n = int(sys.argv[1]); cases = sys.argv[2].split(","); busy = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    cfg = bench_model.config("cpu", False, dict(dim=256, depth=4, batch=2, seq=n, vocab=256))
    for case in cases:
        model, AR, xt = bench_model.build(case, cfg, "cpu", torch.float32)
        rows = [(Result("model", case, i, "step"), (lambda i=i: bench_model.make_call(i, case, "step", cfg, "cpu", torch.float32, model, AR, xt)))
                for i in ("xtk", "x-transformers")]
        with BusyLoad(busy):
            measure_interleaved(rows, "cpu", quick=False)
        a, b = rows[0][0].ms, rows[1][0].ms
        print(f"n={n} {case} busy={busy}: xtk {a:.0f} ms, x-transformers {b:.0f} ms, ratio {a/b:.2f}", flush=True)


if __name__ == "__main__":
    main()
