"""Every NaN-rule case of tests/test_attention_nan.py checked in full on the Triton backend (values
and every gradient, ignoring each case's ``triton=`` mark): which cases the compiled kernels break."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import test_attention_nan as t  # noqa: E402

for name, make in t.CASES.items():
    torch.manual_seed(0)
    made = make()
    for i, case in enumerate(made if isinstance(made, list) else [made]):
        errors = t.check_case(case, "triton")
        print(f"{name}[{i}]".ljust(30) + f"mark={case.triton:6s} errors={len(errors)}"
              + (f"  first: {errors[0][:200]}" if errors else ""))
