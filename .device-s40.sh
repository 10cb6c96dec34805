# session 40 device call: branch on the card
export OUT
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $CARD"
mkdir -p $OUT/s1
case "${CALL:-1}" in
  1) (BUNDLE=0 OUT=$OUT/s1 STEPS="tests decode" TESTS=tests/compiler/engine/test_one_row.py DECODE_JOBS=4 DECODE_RECIPES="fp16 fp16:one-row-model w4a16_awq w4a16_awq:one-row-model" PY_TIMEOUT=420 bash tools/gpu_session.sh > $OUT/s1/session.txt 2>&1) ;;
  2) (BUNDLE=0 OUT=$OUT/s1 STEPS="fp4 w8fp8 int4" FP4_ARGS="--fp4-planar --int4-unfinished" PY_TIMEOUT=200 bash tools/gpu_session.sh > $OUT/s1/session.txt 2>&1) ;;
  3) (BUNDLE=0 OUT=$OUT/s1 STEPS=decode DECODE_JOBS=6 DECODE_RECIPES="fp16 fp16:one-row-model fp16:one-row-model-cudnn-sdpa w4a16_awq w4a16_awq:one-row-model w4a16_awq:one-row-model-cudnn-sdpa" PY_TIMEOUT=480 bash tools/gpu_session.sh > $OUT/s1/session.txt 2>&1) ;;
esac
for f in $OUT/s*/session.txt; do echo "== $f"; tail -40 $f; done
