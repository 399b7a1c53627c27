# Session 11, call 1. (1) Does PDL overlap kernels in a CUDA graph (bench/pdl_probe.py)?
# (2) The int8 / int4 TMA product with its K part a constexpr (a fixed trip count: ptxas no
# longer serialises its wgmmas, C7515) against the kernel before (old_quant_triton.py = commit
# 7f27038's) and with PDL, in the llama_7b step, same process; the K-parts rule against "-s4"
# (session 10's call_h). (3) The fp16 invariant step: shipped (tma) against PDL, and against
# the fold, whose wgmmas triton 3.6 no longer serialises either (fold last: it stays folded).
# Before the call, on this machine (untracked files travel to the device):
#   git show 7f27038:flover/ops/quant_triton.py > docs/perf/2026-12-08-session11/old_quant_triton.py
# About 8 minutes; written 2026-12-08 (session 11), not run: no device could be had.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OLD=$PWD/docs/perf/2026-12-08-session11/old_quant_triton.py
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 90 python3 bench/pdl_probe.py --out $OUT/pdl_probe.json > $OUT/pdl_probe.log 2>&1; echo "probe rc=$?"
cd bench
timeout 180 python3 quant_decode_step.py --old $OLD --iters 20 \
    --weights int8,int4,int8-old,int4-old,int8-pdl,int4-pdl,int8-s4,int4-s4 \
    --out $OUT/quant_step.json > $OUT/quant_step.log 2>&1; echo "quant step rc=$?"
timeout 220 python3 decode_step.py --models llama_7b --dtypes fp16 --batches 1,32 --iters 20 \
    --invariance on --variants tma,tma-pdl,tma-pdl-noprefetch,fold \
    --out $OUT/decode_step.json > $OUT/decode_step.log 2>&1; echo "decode_step rc=$?"
cd ..
tail -6 $OUT/pdl_probe.log
grep "kernel vs reference" $OUT/quant_step.log | cut -c1-160
tail -17 $OUT/quant_step.log
grep -E "bitwise|failed" $OUT/decode_step.log | head -6
tail -9 $OUT/decode_step.log
