#!/usr/bin/env bash
# Several gpu_session.sh runs side by side on the GPU machine (one SITE and OUT folder each), e.g.
#   STREAMS="tests|TESTS=tests/plugins;cli|CLI_RECIPES='fp8 w8a16'" OUT=/tmp/out bash tools/gpu_parallel.sh
# Streams are separated by ';', each "STEPS|ENV ASSIGNMENTS"; its output goes to $OUT/sN/. Waits for all.
set -uo pipefail
OUT=${OUT:-/tmp/qcompile-out}
i=0
IFS=';' read -ra streams <<< "${STREAMS:?STREAMS=\"steps|env;steps|env\"}"
for s in "${streams[@]}"; do
  i=$((i + 1))
  mkdir -p "$OUT/s$i"
  (eval "export ${s#*|}"; OUT=$OUT/s$i SITE=/tmp/site-$i STEPS="${s%%|*}" bash tools/gpu_session.sh > "$OUT/s$i/session.txt" 2>&1) &
  sleep 3
done
wait
