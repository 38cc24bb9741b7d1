#!/usr/bin/env bash
# Second device call of the session: the table-layout A/B (kernels/attention_op._table_by_head),
# the compiled table tests and seed examples, then gpucheck --quick tuning the qk and heavy classes.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
here=bench/results/nvidia-h100-80gb-hbm3/2026-11-27-session4
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
t0=$(date +%s)
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 3; }
echo "install: $(( $(date +%s) - t0 )) s"
timeout 70 python $here/table_layout_ab.py > "$OUT/table_ab.log" 2>&1; echo "table A/B rc=$? after $(( $(date +%s) - t0 )) s"
cat "$OUT/table_ab.log" | tail -30
timeout 60 python -m pytest -q -n 14 -p no:cacheprovider -rfE tests/test_seed_examples_triton.py \
  tests/test_attention_triton.py -k "table or t5 or dtable or seed_example" > "$OUT/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | tail -12
timeout ${GC_S:-200} python -m xtk gpucheck --quick --tune qk,heavy@128 --budget-s ${GC_BUDGET:-180} \
  --out "$OUT/gc" > "$OUT/gpucheck.log" 2>&1
echo "gpucheck rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "^gpucheck" "$OUT/gpucheck.log"
