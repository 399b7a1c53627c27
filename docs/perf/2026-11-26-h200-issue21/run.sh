#!/bin/bash
# One device call (issue 21): compiled GPU tests, per-kernel profile, the decode_step table for
# main's code (baseline) and this branch's in the same call, then bench/invariance.py.
# Run from the root of the main checkout with this branch copied to .wt21 (see common.md).
set -u
T0=$(date +%s)
el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
cd .wt21
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
el tests
timeout 200 python3 -m pytest -o addopts="" -q -p no:cacheprovider -x tests/test_fused_layers.py \
  tests/test_invariant_kernels.py tests/test_kernels.py tests/test_engine_gpu.py > $OUT/tests.log 2>&1
echo "tests rc=$?"; tail -3 $OUT/tests.log
el profile
for b in 1 32; do
  (cd bench && timeout 60 python3 profile_step.py --model llama_7b --dtype fp16 --batch $b \
    --batch-invariant --out $OUT/profile_b$b.json) > $OUT/profile_b$b.log 2>&1
  grep -A9 "of kernels" $OUT/profile_b$b.log
done
el baseline
(cd ../bench && PYTHONPATH=.. timeout 150 python3 decode_step.py --models llama_7b,llama_13b \
  --dtypes fp16,bf16 --batches 1,32 --iters 20 --out $OUT/decode_main.json) > $OUT/decode_main.log 2>&1
el branch
(cd bench && timeout 150 python3 decode_step.py --models llama_7b,llama_13b \
  --dtypes fp16,bf16 --batches 1,32 --iters 20 --out $OUT/decode_branch.json) > $OUT/decode_branch.log 2>&1
el invariance
timeout $(( 455 - ($(date +%s) - T0) )) python3 bench/invariance.py --models llama_7b,llama_7b_gqa8 \
  --dtypes fp16,bf16 --out $OUT/invariance.json > $OUT/invariance.log 2>&1
el done
echo "== main"; grep -A10 "^model" $OUT/decode_main.log
echo "== branch"; grep -A10 "^model" $OUT/decode_branch.log
tail -12 $OUT/invariance.log
