# Session 9's last call: the shipped mma order (tiles of 64 outputs, K in four parts; the K
# order's TMA form removed) compiled: the quant tests, then the llama_7b int8 / int4 decode
# step against fp16 (and the pointer form, "-ptr") in fp16 and bf16 activations.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py \
    tests/test_quant.py -k "quant_mm or mma_order" > $OUT/tests.log 2>&1; echo "tests rc=$?"
cd bench
timeout 70 python3 quant_decode_step.py --weights fp16,int8,int4,int8-ptr,int4-ptr \
    --out $OUT/quant_step_fp16.json > $OUT/quant_step_fp16.log 2>&1; echo "fp16 rc=$?"
timeout 60 python3 quant_decode_step.py --dtype bf16 --weights fp16,int8,int4 \
    --out $OUT/quant_step_bf16.json > $OUT/quant_step_bf16.log 2>&1; echo "bf16 rc=$?"
cd ..
tail -1 $OUT/tests.log; grep "^FAILED" $OUT/tests.log | head
grep "kernel vs reference" $OUT/quant_step_*.log | cut -c1-400
tail -12 $OUT/quant_step_fp16.log; tail -7 $OUT/quant_step_bf16.log
# then the mma order's sweep, wider (tiles of 32 outputs, K in eight parts), its top lines
cd bench
timeout 240 python3 quant_linear.py --tma-sweep --out $OUT/quant_sweep.json \
    > $OUT/quant_sweep.log 2>&1; echo "sweep rc=$?"
grep "^sweep" $OUT/quant_sweep.log
