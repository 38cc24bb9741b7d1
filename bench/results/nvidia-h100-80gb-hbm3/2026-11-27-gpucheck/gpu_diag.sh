#!/usr/bin/env bash
# Device diagnostics (2026-11-27): why TF32 eager looks exact, why the extension's error path segfaults.
env | grep -i -E "tf32|fp32|cublas|nvidia_" ; python - <<'PY'
import torch
m = torch.backends.cuda.matmul
print("allow_tf32", m.allow_tf32, "fp32_precision", getattr(m, "fp32_precision", None))
a, b = torch.randn(130, 128, device="cuda"), torch.randn(128, 130, device="cuda")
ref = a.double() @ b.double()
for on in (False, True):
    m.allow_tf32 = on
    e2 = ((a @ b).double() - ref).abs().max().item()
    e4 = ((a[None, None] @ b[None, None]).double()[0, 0] - ref).abs().max().item()
    print(f"allow_tf32={on}: fp32_precision={getattr(m, 'fp32_precision', None)} 2d err {e2:.2e} 4d err {e4:.2e}")
PY
so=$(python -c "import xtk._C as c; print(c.__file__)"); echo "so: $so"
readelf -d "$so" | grep NEEDED; ldd "$so" | grep -E "stdc|gcc_s|libc\."
file /opt/gcc/bin/g++ /opt/gcc/bin/g++-real 2>&1 | head -3; head -c 400 /opt/gcc/bin/g++ | strings | head -12
python -c "import torch.utils.cpp_extension as c; print('cxx', c.get_cxx_compiler() if hasattr(c,'get_cxx_compiler') else '')" 2>&1 | tail -1
BAD='import torch, xtk._ext
xtk._ext.load()
try:
    torch.ops.xtk.glu_fwd(torch.randn(2, 7), "gelu")
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])'
timeout 60 python -X faulthandler -c "$BAD" 2>&1 | tail -25; echo "rc=$?"
if command -v gdb >/dev/null; then timeout 90 gdb -q -batch -ex run -ex bt --args python -c "$BAD" 2>&1 | grep -v "^\[" | tail -30; fi
