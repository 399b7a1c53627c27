# Session 8's last call (about 2 minutes; the decode step compares the two forms' logits bitwise): attention's split programs past a row's length
# writing nothing (SKIP_EMPTY) against writing empty partials, where the grid is sized by a
# max_seq_len above the context (as the engine's graphs are), alone and in the decode step.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd bench
timeout 50 python3 attention.py --invariant-sweep --max-len 4096 --split-lens 128 --skips 1,0 \
    --out $OUT/attention_skip.json > $OUT/attention_skip.log 2>&1; echo "attention rc=$?"
timeout 80 python3 decode_step.py --models llama_7b --dtypes fp16 --batches 1,32 --iters 20 \
    --max-seq-len 2048 --invariance on --variants tma,noskip \
    --out $OUT/decode_step_2048.json > $OUT/decode_step_2048.log 2>&1; echo "decode rc=$?"
cd ..
grep -A20 "^configuration" $OUT/attention_skip.log | head -10; grep "ctx=" $OUT/attention_skip.log
grep -v "^ " $OUT/decode_step_2048.log | tail -8
