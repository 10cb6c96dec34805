#!/usr/bin/env bash
# Everything qcompile checks and measures on the GPU machine, in one call of the device tool.
# Needs .whl/ with the onnx-graphsurgeon and polygraphy wheels (../shared/device/fetch-wheels) and
# qcompile's own wheel (python3 -m build --wheel --outdir .whl). Results go to $OUT, as one archive
# results.tgz unless BUNDLE=0 (see the end).
set -uo pipefail
OUT=${OUT:-/tmp/qcompile-out}
mkdir -p "$OUT"
SITE=${SITE:-/tmp/site}  # a SITE each lets two sessions run side by side (e.g. STEPS=tests and STEPS=cli)
rm -rf "$SITE"  # pip --target keeps an existing package: a warm machine would run the previous wheel
python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl || exit 1
eval "${SITE_HOOK:-}"  # a command on the installed package, e.g. a sed on $SITE that flips a setting for an A/B run
export PYTHONPATH=$SITE:$PWD/tests PYTHONUNBUFFERED=1
PRELOAD=$(g++ -print-file-name=libstdc++.so.6)
py() { LD_PRELOAD=$PRELOAD ${PY_TIMEOUT:+timeout $PY_TIMEOUT} python3 "$@"; }  # PY_TIMEOUT: seconds per step
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
py -c "import torch, triton, onnx, onnxruntime; print(torch.__version__, triton.__version__, onnx.__version__, onnxruntime.__version__)" | tee -a "$OUT/device.txt"

step() { echo "=== $* (t=${SECONDS}s)"; }
for s in ${STEPS:-engines kernels int4 decode tests}; do
  case $s in
    tests)   step "pytest -m gpu"
             py -m pytest -m gpu -v --durations=15 -p no:cacheprovider --rootdir=. -c pyproject.toml ${TESTS_K:+-k "$TESTS_K"} ${TESTS:-tests} 2>&1 \
                 | tee "$OUT/gpu-tests${TESTS_TAG:-}.log" | tail -25 ;;
    decode)  step "decode benchmark: Llama-3-8B-sized layers, ${DECODE_RECIPES:-fp16 w4a16_awq} at M = 1 and 16"
             py tools/bench_engines.py llama3-8b-layers --recipes ${DECODE_RECIPES:-fp16 w4a16_awq} --cuda-graph --profile --size batch=1,seq=1 \
                 --size batch=16,seq=1 --calib-size batch=2,seq=64 --iters 100 --build-jobs ${DECODE_JOBS:-3} \
                 --out "$OUT/decode-llama3-8b-layers${DECODE_TAG:-}.json" 2>&1 | tee "$OUT/decode-llama3-8b-layers${DECODE_TAG:-}.log" | grep -v "^\[" | tail -12 ;;
    w8fp8)   step "w8a16 and fp8_block GEMM benchmark"
             py tools/bench_w8a16_fp8_block.py --eager --cuda-graph ${W8FP8_ARGS:-} --out "$OUT/w8a16_fp8_block${W8FP8_TAG:-}.json" 2>&1 \
                 | tee "$OUT/w8a16_fp8_block${W8FP8_TAG:-}.log" | tail -30 ;;
    recipes) step "engine benchmark: every recipe on mlp-large"
             py tools/bench_engines.py mlp-large --recipes ${RECIPES:-fp16 int8 int8_sq w8a16 fp8 fp8_rowwise fp8_block w4a16_awq w4a8_awq nvfp4 w4a16_nvfp4 mxfp4} \
                 --cuda-graph --build-jobs ${BUILD_JOBS:-4} --size batch=1,seq=1 --size batch=8,seq=512 --calib-size batch=2,seq=128 \
                 --out "$OUT/engines-recipes-mlp-large.json" 2>&1 | tee "$OUT/engines-recipes-mlp-large.log" | grep -v "^\[" | tail -30 ;;
    cli)     step "qcompile build / run tiny-llama --device cuda with every recipe"
             qc() { LD_PRELOAD=$PRELOAD python3 -m qcompile.cli "$@"; }
             qc sample-inputs tiny-llama -o "$OUT/tl-inputs.npz" --dim batch=2 --dim seq=16 > /dev/null
             all=$(py -c "from qcompile.recipes import list_recipes; print(' '.join(r.name for r in list_recipes()))")
             for r in ${CLI_RECIPES:-$all}; do
               qc build tiny-llama --recipe "$r" --calib random --device cuda ${CLI_ARGS:-} -o "$OUT/tl-$r.engine" \
                 > "$OUT/cli-tiny-llama-$r.log" 2>&1
               b=$?
               qc run "$OUT/tl-$r.engine" --inputs "$OUT/tl-inputs.npz" >> "$OUT/cli-tiny-llama-$r.log" 2>&1
               rr=$?
               echo "$r build rc=$b run rc=$rr | $(grep -m1 -E '^logits' "$OUT/cli-tiny-llama-$r.log") | $(grep -m1 -E 'validation (PASSED|FAILED)' "$OUT/cli-tiny-llama-$r.log")" | tee -a "$OUT/cli-tiny-llama.txt"
               [ $b -ne 0 ] || [ $rr -ne 0 ] && grep -v "^\[" "$OUT/cli-tiny-llama-$r.log" | tail -15
               rm -f "$OUT/tl-$r.engine"
             done ;;
    fp4)     step "FP4 (NVFP4, MXFP4) vs INT4 vs bf16 GEMM benchmark (FP4 also on planar words and in row pairs, as CUDA engines store it)"
             py tools/bench_fp4_gemm.py --eager --cuda-graph ${FP4_ARGS---fp4-planar --fp4-pairs} --out "$OUT/fp4_int4_gemm.json" 2>&1 | tee "$OUT/fp4_int4_gemm.log" | tail -30 ;;
    diag)    IFS=';' read -ra scripts <<< "${DIAG:-tools/diag/w8a16_aoti_cond.py}"  # several: "a.py args;b.py"
             for d in "${scripts[@]}"; do
               step "diagnostics: $d"
               py $d 2>&1 | tee -a "$OUT/diag.log" | grep -v "Warning\|return cls.__new__" | tail -40
             done ;;
    tune1)   step "INT4 GEMV tuning (M = 1, decode shapes)"
             py tools/tune_int4_gemm.py --ms 1 --kinds gemv ${TUNE1_ARGS:-} --shapes ${TUNE1_SHAPES:-4096x6144 4096x4096 4096x28672 14336x4096 8192x28672 4096x14336} \
                 --out "$OUT/int4_tune_gemv${TUNE1_TAG:-}.json" 2>&1 | tee "$OUT/int4_tune_gemv${TUNE1_TAG:-}.log" | tail -8 ;;
    tune16)  step "INT4 tensor-core tuning (one-dot kernel; M = 16 and 64 unless TUNE16_ARGS says otherwise)"
             py tools/tune_int4_gemm.py ${TUNE16_ARGS:---ms 16 64 --kinds one_dot} \
                 --shapes ${TUNE1_SHAPES:-4096x4096 4096x14336 14336x4096 8192x28672} \
                 --out "$OUT/int4_tune_one_dot${TUNE1_TAG:-}.json" 2>&1 | tee "$OUT/int4_tune_one_dot${TUNE1_TAG:-}.log" | tail -10 ;;
    tune4)   step "FP4 tile tuning (M = 16 .. 256: split-K tiles, tiles, dequantize + cuBLAS; INT4 and bf16 alongside)"
             (cd tools && py tune_fp4_gemm.py --cuda-graph ${TUNE4_ARGS:-} --out "$OUT/tune_fp4_gemm.json" 2>&1 \
                 | tee "$OUT/tune_fp4_gemm.log" | grep -v "^\[" | tail -16) ;;
    tune8)   step "W8A16 small-M tuning (GEMV at M = 1, split-K tiles at 16)"
             (cd tools && py tune_w8a16_small_m.py --cuda-graph ${TUNE8_ARGS:-} --out "$OUT/tune_w8a16_small_m.json" 2>&1 \
                 | tee "$OUT/tune_w8a16_small_m.log" | tail -10) ;;
    tunefp8) step "FP8 block GEMM tuning (Triton tiles, cuBLASLt _scaled_mm block-wise)"
             (cd tools && py tune_fp8_block_w8a16.py --cuda-graph --ops fp8_block ${TUNEFP8_ARGS:-} --out "$OUT/tune_fp8_block.json" 2>&1 \
                 | tee "$OUT/tune_fp8_block.log" | grep -v "^\[" | tail -24) ;;
    fp8)     step "the 4-bit GEMMs' FP8 path above 128 rows (fp8_large_m) vs exact, cuBLAS bf16 and FP8 rowwise"
             (cd tools && py bench_fp8_large_m.py --cuda-graph ${FP8_ARGS:-} --out "$OUT/fp8_large_m${FP8_TAG:-}.json" 2>&1 \
                 | tee "$OUT/fp8_large_m${FP8_TAG:-}.log" | tail -16) ;;
    dequant) step "dequantization kernels (INT4, NVFP4, MXFP4) and dequantize + cuBLAS at large M"
             (cd tools && py bench_dequant.py --cuda-graph ${DEQUANT_ARGS:-} --out "$OUT/dequant.json" 2>&1 \
                 | tee "$OUT/dequant.log" | tail -24) ;;
    int4)    step "int4 GEMM benchmark"
             py tools/bench_gemm.py --eager --cuda-graph ${INT4_ARGS:-} --out "$OUT/int4_gemm.json" 2>&1 | tee "$OUT/int4_gemm.log" | tail -30 ;;
    kernels) step "scaled_gemm benchmark"
             py tools/bench_scaled_gemm.py --cuda-graph --out "$OUT/scaled_gemm.json" 2>&1 | tee "$OUT/scaled_gemm.log" | tail -40 ;;
    engines) step "engine benchmark"
             py tools/bench_engines.py mlp-large --recipes fp16 fp8 int8 --profile \
                 --size batch=2,seq=512 --size batch=4,seq=512 --size batch=8,seq=512 \
                 --out "$OUT/engines-mlp-large.json" 2>&1 | tee "$OUT/engines-mlp-large.log" | grep -v "^\[" | tail -15
             py tools/bench_engines.py tiny-llama --recipes fp16 int8 fp8 --size batch=8,seq=128 \
                 --out "$OUT/engines-tiny-llama.json" 2>&1 | tee "$OUT/engines-tiny-llama.log" | grep -v "^\[" | tail -15 ;;
  esac
done
# The device tool returns a limited number of files: everything the steps wrote goes back as one archive
# (engines excluded; BUNDLE=0 keeps the files as they are). Unpack with `tar xzf results.tgz`.
if [ "${BUNDLE:-1}" = 1 ]; then
  (cd "$OUT" && find . -type f ! -name results.tgz ! -name '*.engine' -print0 | tar czf results.tgz --null -T - \
     && find . -type f ! -name results.tgz -delete && echo "results: $OUT/results.tgz ($(du -h results.tgz | cut -f1))")
fi
