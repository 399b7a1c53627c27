# Session 10, call 1: the int8/int4 TMA form's K parts summed in the product's own launch (each
# output tile's last part to arrive adds them, `sum_in_kernel`), against the parts summed by a
# launch of their own ("-sum2"), same process; and session 9's unverified mma-order commit:
# the compiled quant tests, the int8 / int4 step in fp16 and bf16; a B = 1 int4 profile.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py \
    tests/test_quant.py tests/test_invariant_kernels.py -k "quant_mm or mma_order or split" \
    > $OUT/tests.log 2>&1; echo "tests rc=$?"
cd bench
timeout 100 python3 quant_decode_step.py --weights fp16,int8,int4,int8-sum2,int4-sum2 \
    --out $OUT/quant_step_fp16.json > $OUT/quant_step_fp16.log 2>&1; echo "fp16 rc=$?"
timeout 70 python3 quant_decode_step.py --dtype bf16 --weights fp16,int8,int4 \
    --out $OUT/quant_step_bf16.json > $OUT/quant_step_bf16.log 2>&1; echo "bf16 rc=$?"
timeout 60 python3 profile_step.py --batch 1 --batch-invariant --quantization int4 \
    --out $OUT/profile_int4_b1.json > $OUT/profile_int4_b1.log 2>&1; echo "profile rc=$?"
cd ..
tail -1 $OUT/tests.log; grep "^FAILED" $OUT/tests.log | head
grep "kernel vs reference" $OUT/quant_step_*.log | cut -c1-300
tail -13 $OUT/quant_step_fp16.log; tail -7 $OUT/quant_step_bf16.log
head -14 $OUT/profile_int4_b1.log
