#!/usr/bin/env bash
# One prepared device call (fourth GPU session, 2026-11-27): install as the GPU image wants, the
# compiled kernel test files, the NaN rule checked in full on Triton, then gpucheck --quick with
# tuning of the posbias (T5), qk and heavy classes at d128. Logs land flat in $OUT.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
here=bench/results/nvidia-h100-80gb-hbm3/2026-11-27-session4
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
t0=$(date +%s)
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 3; }
echo "install: $(( $(date +%s) - t0 )) s"
timeout ${TEST_S:-170} python -m pytest -q -n 14 -p no:cacheprovider -rfE tests/test_attention_triton.py \
  tests/test_attention_nan.py tests/test_dispatch.py tests/test_attention_hazards.py tests/test_shipped_tiles.py \
  tests/test_seed_examples_triton.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | tail -25
timeout 40 python $here/nan_diag.py > "$OUT/nan_diag.log" 2>&1; echo "nan diag rc=$?"; cat "$OUT/nan_diag.log" | cut -c1-240
timeout ${GC_S:-290} python -m xtk gpucheck --quick ${GC_FLAGS:---tune posbias:t5,qk,heavy@128 --budget-s 250} \
  --out "$OUT/gc" > "$OUT/gpucheck.log" 2>&1
echo "gpucheck rc=$? after $(( $(date +%s) - t0 )) s"; grep -vE "^ +(triton|sdpa|eager|ext) " "$OUT/gpucheck.log" | grep -E "gpucheck|FAIL|met|miss|compiled" | head -40
