# Not run yet: the second call (about 8 minutes), right after next_call1.sh while the machine is
# warm. bf16 decode steps (the same variants), the int8/int4 step against fp16 with its residual
# add and SiLU * up in the parts' sum (as shipped) and as ops of their own ("-unfused"), same
# process (issue 13; with bf16 activations too, never measured), the quant kernel
# tests, and the headline (issue 11's end-to-end point) with the shipped defaults.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd bench
timeout 170 python3 decode_step.py --models llama_7b,llama_13b --dtypes bf16 --batches 1,32 --iters 20 \
    --variants tma-nofold,tma --out $OUT/decode_step_bf16.json > $OUT/decode_step_bf16.log 2>&1
echo "decode_step bf16 rc=$?"
timeout 110 python3 quant_decode_step.py --weights fp16,int8-unfused,int8,int4-unfused,int4 --iters 20 \
    --out $OUT/quant_decode_step.json > $OUT/quant_decode_step.log 2>&1; echo "quant_decode_step rc=$?"
timeout 80 python3 quant_decode_step.py --dtype bf16 --weights fp16,int8,int4 --iters 20 \
    --out $OUT/quant_decode_step_bf16.json > $OUT/quant_decode_step_bf16.log 2>&1; echo "bf16 rc=$?"
cd ..
timeout 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py -k "tma or quant_mm" \
    > $OUT/quant_tests.log 2>&1; echo "quant tests rc=$?"
timeout 110 python3 -m flover.cli run configs/llama_13b.ini --no-live --set runtime_hyperparameter.interval=500 \
    --set request.output_len=fixed --set request.num_requests=32 --json $OUT/headline.json > $OUT/headline.log 2>&1
echo "headline rc=$?"
grep -v "^ " $OUT/decode_step_bf16.log | tail -12
tail -8 $OUT/quant_decode_step.log; tail -7 $OUT/quant_decode_step_bf16.log; tail -1 $OUT/quant_tests.log
tail -6 $OUT/headline.log
