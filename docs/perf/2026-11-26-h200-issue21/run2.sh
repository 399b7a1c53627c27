#!/bin/bash
# Final device call (issue 21): the fused-layer tests compiled, then the decode_step table for
# main's code (invariance on: main's off path is the branch's off path), this branch with the
# norm/SiLU prologues (default) and without them (--no-prologues), all in one call.
# Run from the root of the main checkout with this branch copied to .wt21.
set -u
T0=$(date +%s)
el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
A="--models llama_7b,llama_13b --dtypes fp16,bf16 --batches 1,32 --iters 20"
cd .wt21
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
el tests
timeout 60 python3 -m pytest -o addopts="" -q -p no:cacheprovider tests/test_fused_layers.py \
  > $OUT/tests.log 2>&1
echo "tests rc=$?"; tail -2 $OUT/tests.log
el main
(cd ../bench && PYTHONPATH=.. timeout 45 python3 decode_step.py $A --invariance on \
  --out $OUT/decode_main.json) > $OUT/decode_main.log 2>&1
el branch
(cd bench && timeout 60 python3 decode_step.py $A --out $OUT/decode_branch.json) \
  > $OUT/decode_branch.log 2>&1
el no-prologues
(cd bench && timeout 45 python3 decode_step.py $A --invariance on --no-prologues \
  --out $OUT/decode_noprologue.json) > $OUT/decode_noprologue.log 2>&1
el done
for f in main branch noprologue; do echo "== $f"; grep -A13 "^model" $OUT/decode_$f.log | cut -c1-62; done
