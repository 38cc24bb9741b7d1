#!/usr/bin/env bash
# Second device call: kernel-by-kernel time of the anchor cells (where do T5/table and top-k lose
# against ALiBi?) and flex T5/table causal forward re-timed compiled (call 1's 42 ms rows were
# dynamo's eager fallback past its recompile limit). Compiles the cells in parallel, then profiles
# them one at a time.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; echo "install rc=$? $(( $(date +%s) - t0 )) s"
P=bench/results/nvidia-h200/2026-11-28-session11/profile_kernels.py
for c in "xtk none 0" "xtk alibi 0" "xtk t5 0" "xtk dtable 0" "xtk topk8 0" "flex t5 1" "flex dtable 1"; do
  for m in fwd fwd+bwd; do
    case "$c" in flex*) [ $m = fwd ] || continue;; esac
    timeout 100 python $P warm $c $m > /dev/null 2>> "$OUT/warm.log" &
  done
done
wait; echo "warm done after $(( $(date +%s) - t0 )) s"; grep -E "Error" "$OUT/warm.log" | cut -c1-300 | head
timeout ${PROF_S:-90} python $P profile 2>&1 | tee "$OUT/profile.txt" | grep -v Warning
echo "profile rc=$? after $(( $(date +%s) - t0 )) s"
