#!/usr/bin/env bash
# One prepared device call (H100 session of 2026-11-27, third run): install as the GPU image wants,
# the extension's link and error path, the compiled QK-norm/hazard tests, gpucheck's correctness
# phase (--budget-s 1 skips timing; tuning off). Logs land flat in $OUT (few files come back).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
t0=$(date +%s)
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 3; }
echo "install: $(( $(date +%s) - t0 )) s"
so=$(python -c "import xtk._C as c; print(c.__file__)"); readelf -d "$so" | grep NEEDED | grep -E "stdc|gcc"
timeout 60 python -X faulthandler -c 'import torch, xtk._ext
xtk._ext.load()
try:
    torch.ops.xtk.glu_fwd(torch.randn(2, 7), "gelu")
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])' 2>&1 | tail -8
timeout 100 python -m pytest -q -n 12 -p no:cacheprovider tests/test_attention_hazards.py tests/test_tf32_emulation.py \
  "tests/test_attention_triton.py::test_qk_norm_and_rotary" > "$OUT/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|Error" "$OUT/tests.log" | tail -8
timeout 130 python -m xtk gpucheck --quick --no-tune --budget-s 1 --out "$OUT/gc" > "$OUT/gpucheck.log" 2>&1
echo "gpucheck rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "correctness|FAIL|PASS|compiled|tf32" "$OUT/gpucheck.log" | head -30
python -c "import json; r=json.load(open('$OUT/gc/report.json')); print('tf32_rounding', r.get('tf32_rounding')); [print(c['name'], c['ok'], [(x['name'], x['kernel_err'], x['eager_err']) for x in c['checks']][:4]) for c in r['cases'] if 'tf32' in c['name'] or 'error' in c['name']]"
