#!/usr/bin/env bash
# Third device call: the install with the extension mended (torch 2.11's headers made
# Tensor::sum({0, 2}) ambiguous), the tests call 1 failed (extension, static decode host reads,
# varlen value checks), then gpucheck --quick tuning the posbias (ALiBi) and qk classes at d128.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt"; date -u >> "$OUT/device.txt"
t0=$(date +%s)
python -m pip install -v --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; echo "install rc=$? $(( $(date +%s) - t0 )) s"
grep -E "^ *xtk: |error:" "$OUT/install.log" | cut -c1-300 | head -10
timeout 70 python -m pytest -q -n 12 -p no:cacheprovider -rfE tests/test_rms_norm.py tests/test_glu.py tests/test_ext_build.py \
  tests/test_generate_static.py tests/test_attention_varlen.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | cut -c1-300 | tail -20
timeout 228 python -m xtk gpucheck --quick --tune posbias:alibi,qk@128 --budget-s 200 --out "$OUT/gc" > "$OUT/gpucheck.log" 2>&1
echo "gpucheck rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "^gpucheck|FAIL|rms_norm|glu" "$OUT/gpucheck.log" | cut -c1-300 | head -30
