#!/usr/bin/env bash
# First light on a GPU machine (device tool): install, CUDA tests, TF32 probe, speed, tile sweep.
# Every phase has its own time limit; logs go straight to $OUT (at most 8 files come back).
# Usage (on the GPU machine, repo root): OUT=/some/dir bash bench/firstlight.sh [--tiny]
set -u
OUT=${OUT:-/tmp/firstlight}; mkdir -p "$OUT"
TINY=${1:-}
PY=${PYTHON:-python3}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/env.txt"; }
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"
  nvcc --version 2>&1 | tail -2; nproc
  for c in c++ g++ /usr/bin/g++ /opt/gcc/bin/g++; do echo "$c: $(command -v $c) $($c --version 2>&1 | head -1)"; done
  $PY -m pip --version; $PY -m pip show setuptools 2>/dev/null | grep Version
} >> "$OUT/env.txt" 2>&1
stamp "install (no extension)"
if ! XTK_NO_EXT=1 $PY -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/env.txt" 2>&1; then
  stamp "INSTALL FAILED: running from the tree (links xtk/kernels, xtk/bench; PYTHONPATH)"
  ln -sfn ../kernels xtk/kernels; ln -sfn ../bench xtk/bench; export PYTHONPATH=$PWD
fi
$PY -c "import xtk.kernels, xtk.bench.firstlight" >> "$OUT/env.txt" 2>&1 || stamp "IMPORT FAILED"
stamp "extension build in the background"
( export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=6; timeout 240 $PY setup.py build_ext --inplace > "$OUT/ext.log" 2>&1; echo "ext build rc=$?" >> "$OUT/ext.log" ) &
EXT_PID=$!
$PY -m xtk info >> "$OUT/env.txt" 2>&1

stamp "TF32 probe (one process per case: a compile crash aborts it)"
for d in 64 128 256; do for f in none qknorm rotary_xpos alibi; do
  ( timeout 120 $PY -m xtk.bench.firstlight tf32 $d $f $TINY > "$OUT/tf32_${d}_${f}.tmp" 2>&1 || echo "tf32 d=$d $f: FAILED rc=$? $(grep -m2 -E 'ERROR|Error' "$OUT/tf32_${d}_${f}.tmp" | head -c 300)" >> "$OUT/tf32_${d}_${f}.tmp" ) &
done; done
stamp "speed cells compiled in 10 parallel shards"
for i in $(seq 0 9); do timeout 150 $PY -m xtk.bench.firstlight warm --shard $i/10 $TINY >> "$OUT/warm.log" 2>&1 & done
stamp "CUDA attention tests (xdist)"
timeout 170 $PY -m pytest tests/test_attention_triton.py -q -n 6 -p no:cacheprovider --timeout 150 -rfE > "$OUT/pytest.log" 2>&1
echo "pytest attention rc=$?" >> "$OUT/pytest.log"; stamp "attention tests done: $(tail -3 "$OUT/pytest.log" | tr '\n' ' ')"
wait
cat "$OUT"/tf32_*.tmp > "$OUT/tf32.log" 2>/dev/null; rm -f "$OUT"/tf32_*.tmp
stamp "ext: $(tail -1 "$OUT/ext.log")"
{ ldd xtk/_C*.so | grep -E "stdc|gcc_s"; grep -m1 -o "GLIBCXX_3.4.[0-9]*" /usr/lib/x86_64-linux-gnu/libstdc++.so.6 | tail -1
  strings xtk/_C*.so | grep -o "GLIBCXX_3.4.[0-9]*" | sort -V | tail -1
  $PY -X faulthandler -c "import torch, xtk._C; torch.ops.xtk.glu_fwd(torch.randn(2, 7), 'gelu')" 2>&1 | grep -vE "^\s+File" | tail -4; } >> "$OUT/ext.log" 2>&1
timeout 50 $PY -m pytest tests/test_norm.py tests/test_glu.py tests/test_ext_build.py -q -p no:cacheprovider -rfE -n 4 >> "$OUT/pytest.log" 2>&1
echo "pytest ext rc=$?" >> "$OUT/pytest.log"; stamp "ext tests: $(tail -2 "$OUT/pytest.log" | tr '\n' ' ')"
stamp "timings"
timeout 110 $PY -m xtk.bench.firstlight time --json "$OUT/time.json" $TINY > "$OUT/time.log" 2>&1
stamp "timings rc=$?"
stamp "tiles"
timeout 90 $PY -m xtk.bench.firstlight tiles --json "$OUT/tiles.json" $TINY >> "$OUT/time.log" 2>&1
stamp "tiles rc=$?"
grep -E "FAIL|ERROR|error" "$OUT/time.log" | head -20
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | head -30
cat "$OUT/tf32.log"
