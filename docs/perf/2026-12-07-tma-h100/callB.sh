# call B: with the TMA forms as shipped: bitwise invariance (random presets, GQA and GPT-J too),
# the engine's GPU tests, decode steps in bf16, prefill with the TMA form and without
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd bench
timeout 90 python3 invariance.py --dtypes fp16,bf16 --out $OUT/invariance.json > $OUT/invariance.log 2>&1; echo "invariance rc=$?"
timeout 130 python3 decode_step.py --models llama_7b,llama_13b --dtypes bf16 --batches 1,32 --iters 20 \
    --variants ptr,tma --out $OUT/decode_step_bf16.json > $OUT/decode_step_bf16.log 2>&1; echo "decode_step bf16 rc=$?"
for t in 1 0; do FLOVER_TMA=$t timeout 60 python3 prefill_step.py --lengths 128,512,2048 \
    --out $OUT/prefill_tma$t.json > $OUT/prefill_tma$t.log 2>&1; echo "prefill tma=$t rc=$?"; done
cd ..
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_engine_gpu.py tests/test_async_gpu.py \
    > $OUT/tests_engine.log 2>&1; echo "tests_engine rc=$?"; tail -3 $OUT/tests_engine.log
tail -8 $OUT/invariance.log
grep -v "^ " $OUT/decode_step_bf16.log | tail -12
tail -5 $OUT/prefill_tma1.log $OUT/prefill_tma0.log
