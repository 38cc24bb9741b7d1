"""xtk / x-transformers training-step ratio, interleaved (issue 16), with the chunk loop as 'before'.

python step.py N CASES BUSY [BATCH [quick]]   e.g.  python step.py 1024 alibi,t5 2

Three implementations per row, timed round-robin (bench/common.py measure_interleaved):
  ext   xtk as shipped (the chunked backend's one-region extension attention where it applies)
  loop  xtk with the extension's attention off (attention_chunked.USE_EXT = False): the chunk loop
        of torch ops the backend ran before this change (everything else as shipped)
  xt    x-transformers itself, same weights (bench_model.build loads them into xtk's model)
TransformerWrapper + Decoder(dim=256, depth=4, heads=8), vocab 256, fp32, 2 threads; BUSY competing
1-core processes (common.BusyLoad) during the row."""
import sys

import torch

from xtk.bench import bench_model
from xtk.bench.common import BusyLoad, Result, measure_interleaved
from xtk.ops import attention_chunked as ac


def toggled(call, ext):
    def f():
        ac.USE_EXT = ext
        return call()
    return f


def main():
    torch.set_num_threads(2)
    n, cases, busy = int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    quick = len(sys.argv) > 5 and sys.argv[5] == "quick"
    cfg = bench_model.config("cpu", False, dict(dim=256, depth=4, batch=batch, seq=n, vocab=256))
    for case in cases:
        model, AR, xt = bench_model.build(case, cfg, "cpu", torch.float32)

        def mk(impl, case=case, model=model, AR=AR, xt=xt):
            return bench_model.make_call(impl, case, "step", cfg, "cpu", torch.float32, model, AR, xt)
        rows = [(Result("model", case, "ext", "step"), lambda mk=mk: toggled(mk("xtk"), True)),
                (Result("model", case, "loop", "step"), lambda mk=mk: toggled(mk("xtk"), False)),
                (Result("model", case, "xt", "step"), lambda mk=mk: mk("x-transformers"))]
        with BusyLoad(busy):
            measure_interleaved(rows, "cpu", quick=quick)
        a, l, b = (r[0].ms for r in rows)
        if None in (a, l, b):
            print(case, [r[0].status for r in rows], flush=True)
            continue
        print(f"n={n} b={batch} {case} busy={busy}: ext {a:.0f} loop {l:.0f} xt {b:.0f} ms; "
              f"ratios {a / b:.2f} {l / b:.2f}", flush=True)


if __name__ == "__main__":
    main()
