"""How thin are the 2x rule's margins? Runs pytest with every ``judge_2x`` verdict recorded and
prints the worst ratios kernel error / limit (1.0 is the limit: 0.9 passes with 10% to spare).

    python tests/report_margins.py tests/test_attention_sweep.py [more pytest arguments]
    python tests/report_margins.py tests/test_attention_sweep.py --top 30 --csv margins.csv

The ratios of the gradients that get ``sum_floor`` (one sum over a whole score matrix) are also
shown against the old rule, without that floor, to show what the floor buys.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def record_verdicts(rows: list) -> None:
    """Wrap ``judge_2x`` (the tests' module and the package's) to append each verdict to ``rows``."""
    import torch
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # as tests/conftest.py, before xtk imports triton
    sys.path.insert(0, HERE)
    import tolerance
    import xtk.reference.tolerance as package

    original = package.judge_2x

    def judge(kernel, eager, oracle, name="out", factor=2.0, floor=None):
        verdict = original(kernel, eager, oracle, name, factor, floor)
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        dtype_floor = package.FLOOR[eager.dtype]
        row = dict(test=test, **verdict, floor=dtype_floor if floor is None else floor, dtype_floor=dtype_floor)
        rows.append(row)
        return verdict

    tolerance.judge_2x = package.judge_2x = judge


def ratio(row: dict, floor: float | None = None) -> float:
    """kernel error / limit (with the row's own floor, or ``floor`` instead); inf when not finite."""
    if row["kernel_err"] is None or row["eager_err"] is None:
        return float("inf")
    limit = 2.0 * row["eager_err"] + (row["floor"] if floor is None else floor)
    return row["kernel_err"] / limit if limit > 0 else float("inf")


def report(rows: list, top: int) -> None:
    """Print the ``top`` thinnest margins, and the ones the sum floor decides."""
    rows = sorted(rows, key=ratio, reverse=True)
    print(f"\n{len(rows)} verdicts; worst kernel error / limit:")
    for r in rows[:top]:
        print(f"  {ratio(r):6.3f}  {r['name']:<10} {r['test']}  (kernel {r['kernel_err']:.3e}, "
              f"eager {r['eager_err']:.3e}, floor {r['floor']:.1e})")
    summed = [r for r in rows if r["floor"] != r["dtype_floor"]]
    if summed:
        print(f"\n{len(summed)} verdicts with the sum floor; ratio now | without it:")
        for r in sorted(summed, key=lambda r: ratio(r, r["dtype_floor"]), reverse=True)[:top]:
            print(f"  {ratio(r):6.3f} | {ratio(r, r['dtype_floor']):6.3f}  {r['name']:<10} {r['test']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--csv", help="also write every verdict to this CSV file")
    args, pytest_args = parser.parse_known_args(argv)
    import pytest

    rows: list = []
    record_verdicts(rows)
    code = pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args])
    report(rows, args.top)
    if args.csv:
        import csv
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["test", "name", "ok", "kernel_err", "eager_err", "limit", "floor",
                                                   "dtype_floor", "why"])
            writer.writeheader()
            writer.writerows(rows)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
