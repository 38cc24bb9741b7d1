#!/usr/bin/env bash
# First device call of the eighth session (2026-11-28): install as the README says, the compiled
# tests of the serving kernels (never run on a GPU before: decode/KV cache, varlen, static decode
# under CUDA graphs) with the hazards, norm/GLU and attention files, then gpucheck --quick tuning
# the qk and heavy classes at d128. Logs land flat in $OUT (at most 8 files come back).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"
t0=$(date +%s)
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 3; }
echo "install: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/device.txt"
timeout ${TEST_S:-140} python -m pytest -q -n 14 -p no:cacheprovider -rfE --durations=15 \
  tests/test_attention_decode.py tests/test_attention_kvcache.py tests/test_attention_varlen_kernel.py \
  tests/test_attention_varlen.py tests/test_generate_static.py tests/test_attention_hazards.py \
  tests/test_glu.py tests/test_rms_norm.py tests/test_attention_triton.py tests/test_seed_examples_triton.py \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | cut -c1-300 | tail -40
timeout ${GC_S:-250} python -m xtk gpucheck --quick ${GC_FLAGS:---tune qk,heavy@128 --budget-s 200} \
  --out "$OUT/gc" > "$OUT/gpucheck.log" 2>&1
echo "gpucheck rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "^gpucheck|FAIL|compiled" "$OUT/gpucheck.log" | cut -c1-300 | head -60
