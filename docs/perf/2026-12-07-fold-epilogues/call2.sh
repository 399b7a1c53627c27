# call 2: bf16 decode steps (the same variants as call 1), the int8/int4 step against fp16
# (same process), the headline (issue 11's end-to-end point)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd bench
timeout 200 python3 decode_step.py --models llama_7b,llama_13b --dtypes bf16 --batches 1,32 --iters 20 \
    --variants ptr,tma-nofold,tma-nomerge,tma --out $OUT/decode_step_bf16.json > $OUT/decode_step_bf16.log 2>&1
echo "decode_step bf16 rc=$?"
timeout 100 python3 quant_decode_step.py --weights fp16,int8,int4 --iters 20 \
    --out $OUT/quant_decode_step.json > $OUT/quant_decode_step.log 2>&1; echo "quant_decode_step rc=$?"
cd ..
timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_engine_gpu.py \
    tests/test_cuda_graph.py > $OUT/engine_tests.log 2>&1; echo "engine tests rc=$?"
timeout 150 python3 -m flover.cli run configs/llama_13b.ini --no-live --set runtime_hyperparameter.interval=500 \
    --set request.output_len=fixed --set request.num_requests=32 --json $OUT/headline.json > $OUT/headline.log 2>&1
echo "headline rc=$?"
tail -2 $OUT/engine_tests.log
grep -v "^ " $OUT/decode_step_bf16.log | tail -16
tail -8 $OUT/quant_decode_step.log
tail -6 $OUT/headline.log
