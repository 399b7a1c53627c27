# NOT RUN (session 8 had no device time left; the next session's first call, about 3 minutes):
# attention's split programs past a row's length writing nothing (SKIP_EMPTY, shipped) against
# writing empty partials, where the grid is sized by a max_seq_len above the context (as the
# engine's graphs are), alone and in the decode step; the step compares the two forms' logits
# bitwise, and the compiled attention tests run first.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_invariant_kernels.py \
    -k "row_attention" > $OUT/tests.log 2>&1; echo "tests rc=$?"
cd bench
timeout 50 python3 attention.py --invariant-sweep --max-len 4096 --split-lens 128 --skips 1,0 \
    --out $OUT/attention_skip.json > $OUT/attention_skip.log 2>&1; echo "attention rc=$?"
timeout 80 python3 decode_step.py --models llama_7b --dtypes fp16 --batches 1,32 --iters 20 \
    --max-seq-len 2048 --invariance on --variants tma,noskip \
    --out $OUT/decode_step_2048.json > $OUT/decode_step_2048.log 2>&1; echo "decode rc=$?"
cd ..
tail -1 $OUT/tests.log
grep -A20 "^configuration" $OUT/attention_skip.log | head -10; grep "ctx=" $OUT/attention_skip.log
grep -v "^ " $OUT/decode_step_2048.log | tail -8
