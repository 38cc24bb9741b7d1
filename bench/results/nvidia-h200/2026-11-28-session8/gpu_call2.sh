#!/usr/bin/env bash
# Second device call: why xtk._C did not build on the image (pip install -v, the compiler's
# errors), then the two test files whose CUDA cases were mended after call 1.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
(which g++ gcc c++; g++ --version; /opt/gcc/bin/g++ --version; nvcc --version | tail -2) 2>&1 | tee "$OUT/compilers.txt"
t0=$(date +%s)
python -m pip install -v --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; echo "install rc=$? $(( $(date +%s) - t0 )) s"
grep -n -i -E "error|warning xtk|xtk: |FAILED|undefined" "$OUT/install.log" | cut -c1-400 | head -40
python -c "import xtk._C as C; print('xtk._C loaded', C.__file__, C.cpu_isa)" 2>&1 | tail -3
ls xtk/*.so build/lib*/xtk/ 2>&1 | head
timeout 90 python -m pytest -q -n 8 -p no:cacheprovider -rfE tests/test_generate_static.py tests/test_attention_varlen.py \
  tests/test_rms_norm.py tests/test_glu.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | cut -c1-300 | tail -20
