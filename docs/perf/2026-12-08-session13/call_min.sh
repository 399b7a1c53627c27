# Session 13's fallback when less device time is left than call_first.sh needs (~5 min):
# (1) correctness of what is on by default and never ran on a GPU (attention's tile shared by
# a prompt's tokens; the merge loading splits at once): the compiled tests and
# bench/invariance.py fp16; (2) #13's int8 / int4 step against the kernel before the C7515 fix.
# Before the call: git show 7f27038:flover/ops/quant_triton.py > docs/perf/2026-12-08-session11/old_quant_triton.py
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OLD=$PWD/docs/perf/2026-12-08-session11/old_quant_triton.py
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_invariant_kernels.py \
    tests/test_paged.py -k "row_attention or prompts_tokens or runs_cover or work_list or merge \
    or triton or sharing_a_tile or paged_runs or neighbours" > $OUT/tests_attention.log 2>&1
echo "attention tests rc=$?"
cd bench
timeout 70 python3 invariance.py --dtypes fp16 --out $OUT/invariance.json \
    > $OUT/invariance.log 2>&1; echo "invariance rc=$?"
timeout 110 python3 quant_decode_step.py --old $OLD --iters 20 --weights fp16,int8,int4,int8-old,int4-old \
    --out $OUT/quant_step.json > $OUT/quant_step.log 2>&1; echo "quant step rc=$?"
cd ..
tail -1 $OUT/tests_attention.log; grep "^FAILED" $OUT/tests_attention.log | head
tail -6 $OUT/invariance.log
tail -8 $OUT/quant_step.log
