#!/usr/bin/env bash
# The next GPU session's two device calls, prepared (GPU time comes as ~15 minutes, start-up
# included, and a device call runs at most 600 s). Logs and reports land in $OUT.
#   bash bench/gpu_session.sh 1   # install, the compiled tests of what changed since the last GPU
#                                 # run, then `gpucheck --quick` (about 6-7 minutes)
#   bash bench/gpu_session.sh 2   # kernel-by-kernel profile of the anchor cells (session 11's
#                                 # script, to compare with its table) and the dK/dV GQA-split
#                                 # timing (about 3 minutes)
# Call 2 right after call 1: a machine left idle goes back, and a fresh one needs a new install.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
case "${1:-1}" in
1)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt"
  python -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)" >> "$OUT/device.txt"
  date -u >> "$OUT/device.txt"; git log --oneline -1 >> "$OUT/device.txt" 2>/dev/null; cat "$OUT/device.txt"
  python -m pip install -v --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
  echo "install rc=$? $(( $(date +%s) - t0 )) s" | tee -a "$OUT/device.txt"
  grep -E "^ *xtk: |error:" "$OUT/install.log" | cut -c1-300 | head -5
  # since session 11: head-major tables, top-k extraction merge, the dK/dV group split, dQ's one pass
  timeout ${TEST_S:-100} python -m pytest -q -n 14 -p no:cacheprovider -rfE --durations=10 \
    tests/test_attention_dkdv_split.py tests/test_attention_triton.py tests/test_attention_varlen_kernel.py \
    tests/test_attention_hazards.py tests/test_attention_nan.py tests/test_attention_gqa_order.py > "$OUT/tests.log" 2>&1
  echo "tests rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | cut -c1-300 | tail -25
  timeout ${GC_S:-330} python -m xtk gpucheck --quick ${GC_FLAGS:-} --out "$OUT/gc" > "$OUT/gpucheck.log" 2>&1
  echo "gpucheck rc=$? after $(( $(date +%s) - t0 )) s"
  tr '\r' '\n' < "$OUT/gpucheck.log" | grep -E "^gpucheck|FAIL|PASS|MISS|compiled|Error" | cut -c1-300 | head -70
  ls "$OUT/gc"
  ;;
2)
  P=bench/results/nvidia-h200/2026-11-28-session11/profile_kernels.py
  for c in "xtk none 0" "xtk alibi 0" "xtk t5 0" "xtk dtable 0" "xtk topk8 0"; do
    for m in fwd fwd+bwd; do timeout 100 python $P warm $c $m > /dev/null 2>> "$OUT/warm.log" & done
  done
  wait; echo "warm done after $(( $(date +%s) - t0 )) s"; grep -E "Error" "$OUT/warm.log" | cut -c1-300 | head
  timeout ${PROF_S:-90} python $P profile 2>&1 | tee "$OUT/profile.txt" | grep -v Warning
  echo "profile rc=$? after $(( $(date +%s) - t0 )) s"
  timeout ${SPLIT_S:-120} python bench/profile_dkdv_split.py 2>&1 | tee "$OUT/dkdv_split.md"
  echo "dkdv split rc=$? after $(( $(date +%s) - t0 )) s"
  ;;
*) echo "usage: bash bench/gpu_session.sh 1|2" >&2; exit 2 ;;
esac
