# Session 8's measuring call (H100 or H200, about 5 minutes): after the first calls of the day
# (docs/perf/2026-12-07-fold-epilogues/) measured the fold and the merge slower, the epilogue
# forms' K steps (`linear_triton.EPILOGUE_TILES`) and attention's fixed split length, each
# against the shipped step in the same process.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 100 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_fused_layers.py \
    tests/test_engine_gpu.py -k "fused_and_chunked or fused_layers or epilogue" \
    > $OUT/tests.log 2>&1; echo "tests rc=$?"
cd bench
timeout 60 python3 linear.py --fused --dtypes fp16 --shapes 7b.qkv,7b.gate_up --batches 1,32 \
    --out $OUT/fused.json > $OUT/fused.log 2>&1; echo "fused rc=$?"
timeout 80 python3 attention.py --invariant-sweep --out $OUT/attention_sweep.json \
    > $OUT/attention_sweep.log 2>&1; echo "attention sweep rc=$?"
timeout 120 python3 decode_step.py --models llama_7b --dtypes fp16 --batches 1,32 --iters 20 \
    --variants tma,split64,split32,fold,fold-rms256 \
    --out $OUT/decode_step_7b.json > $OUT/decode_step_7b.log 2>&1; echo "decode 7b rc=$?"
timeout 80 python3 decode_step.py --models llama_13b --dtypes fp16 --batches 1,32 --iters 20 \
    --variants tma,split64,fold \
    --out $OUT/decode_step_13b.json > $OUT/decode_step_13b.log 2>&1; echo "decode 13b rc=$?"
cd ..
tail -3 $OUT/tests.log
grep "M=" $OUT/fused.log
grep -A40 "^configuration" $OUT/attention_sweep.log | head -12; grep "ctx=" $OUT/attention_sweep.log
grep -v "^ " $OUT/decode_step_7b.log | tail -18; grep -v "^ " $OUT/decode_step_13b.log | tail -11
