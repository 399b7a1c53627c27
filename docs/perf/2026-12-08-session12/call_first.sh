# The one call to make if a session gets only one (~9.5 min): the decisive parts of call_c,
# call_d and session 11's call_a in a single device call, most important first.
# (1) Correctness of what is on by default and never ran on a GPU: the compiled row-attention
#     and paged tests (a prompt's tokens sharing a tile: each token bitwise its lone result on
#     the hardware's mma; the merge loading splits at once: bitwise its one-by-one loads).
# (2) #13: the int8 / int4 llama_7b step with the K part a constexpr (ptxas no longer
#     serialises its wgmmas) against the kernel before (-old), same process.
# (3) #11: the 7b fp16 step at B = 1, 32 (graphs at max_seq_len 2048): shipped (tma) against
#     PDL, the fold (no longer serialised), the persistent attention (items) and the merge
#     one split at a time (merge1, the same logits as tma).
# (4) bench/invariance.py, fp16: alone vs fused, staggered and chunked, with the shared tile.
# Before the call, on this machine (untracked, it travels; do not commit it):
#   git show 7f27038:flover/ops/quant_triton.py > docs/perf/2026-12-08-session11/old_quant_triton.py
# Written 2026-12-08 (session 12), not run.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OLD=$PWD/docs/perf/2026-12-08-session11/old_quant_triton.py
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_invariant_kernels.py \
    tests/test_paged.py -k "row_attention or prompts_tokens or runs_cover or work_list or merge \
    or triton or sharing_a_tile or paged_runs or neighbours" > $OUT/tests_attention.log 2>&1
echo "attention tests rc=$?"
cd bench
timeout 130 python3 quant_decode_step.py --old $OLD --iters 20 --weights fp16,int8,int4,int8-old,int4-old \
    --out $OUT/quant_step.json > $OUT/quant_step.log 2>&1; echo "quant step rc=$?"
timeout 250 python3 decode_step.py --models llama_7b --dtypes fp16 --batches 1,32 --iters 20 \
    --max-seq-len 2048 --invariance on --variants tma,tma-pdl,items,merge1,fold \
    --out $OUT/decode_step.json > $OUT/decode_step.log 2>&1; echo "decode_step rc=$?"
timeout 70 python3 invariance.py --dtypes fp16 --out $OUT/invariance.json \
    > $OUT/invariance.log 2>&1; echo "invariance rc=$?"
cd ..
tail -1 $OUT/tests_attention.log; grep "^FAILED" $OUT/tests_attention.log | head
tail -8 $OUT/quant_step.log
grep -E "bitwise|failed" $OUT/decode_step.log | head -8
tail -12 $OUT/decode_step.log
tail -6 $OUT/invariance.log
