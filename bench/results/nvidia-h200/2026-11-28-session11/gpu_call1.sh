#!/usr/bin/env bash
# First device call of the eleventh session (2026-11-28): install as the README says; the compiled
# tests of the files the QK row kernel (fa7276a) touched -- attention, varlen kernel, hazards (int64
# offsets, device guard) -- with decode and RMSNorm (the fp32 gain-gradient tolerance mended after
# session 8); then the whole (non-quick) gpucheck for the first time, tuning off so the speed phase
# gets the budget left after the correctness sweep. Logs land in $OUT (at most 8 files come back).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt"
python -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)" >> "$OUT/device.txt"
date -u >> "$OUT/device.txt"; cat "$OUT/device.txt"
t0=$(date +%s)
python -m pip install -v --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; echo "install rc=$? $(( $(date +%s) - t0 )) s" | tee -a "$OUT/device.txt"
grep -E "^ *xtk: |error:" "$OUT/install.log" | cut -c1-300 | head -5
timeout ${TEST_S:-75} python -m pytest -q -n 14 -p no:cacheprovider -rfE --durations=10 \
  tests/test_attention_triton.py tests/test_attention_varlen_kernel.py tests/test_attention_hazards.py \
  tests/test_attention_decode.py tests/test_rms_norm.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | cut -c1-300 | tail -25
timeout ${GC_S:-440} python -m xtk gpucheck ${GC_FLAGS:---no-tune --budget-s 380} --out "$OUT/gc" > "$OUT/gpucheck.log" 2>&1
echo "gpucheck rc=$? after $(( $(date +%s) - t0 )) s"
tr '\r' '\n' < "$OUT/gpucheck.log" | grep -E "^gpucheck|FAIL|PASS|MISS|compiled|Error" | cut -c1-300 | head -70
ls "$OUT/gc"
