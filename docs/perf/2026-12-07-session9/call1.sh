# Session 9's first call (H100 or H200, about 4 minutes): session 8's call2.sh (the empty-split
# skip, SKIP_EMPTY, against writing empty partials, with the grid sized by a max_seq_len above
# the context as the engine's graphs are; logits compared bitwise) and where the folded 7b step's
# time goes (profile_step.py, eager, B=1, shipped form and the fold).
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
for v in tma fold; do
  timeout 60 python3 profile_step.py --model llama_7b --batch 1 --batch-invariant --variant $v \
      --out $OUT/profile_7b_b1_$v.json > $OUT/profile_7b_b1_$v.log 2>&1; echo "profile $v rc=$?"
done
cd ..
tail -1 $OUT/tests.log
grep -A20 "^configuration" $OUT/attention_skip.log | head -10; grep "ctx=" $OUT/attention_skip.log
grep -v "^ " $OUT/decode_step_2048.log | tail -8
for v in tma fold; do echo "== profile $v"; head -14 $OUT/profile_7b_b1_$v.log; done
