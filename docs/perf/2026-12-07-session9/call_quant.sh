# Session 9: the int8 / int4 TMA kernels reading their packed bytes in the mma order (16-byte
# shared loads) against the K order (2-byte loads), same process: compiled tests, the products
# alone (quant_linear.py: shipped = mma order, korder, ptr), and the llama_7b decode step
# (quant_decode_step.py, "-korder" = the K order's TMA form). About 6 minutes.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py \
    tests/test_quant.py -k "quant_mm or mma_order or tma" > $OUT/tests.log 2>&1; echo "tests rc=$?"
cd bench
timeout 200 python3 quant_linear.py --out $OUT/quant_linear.json > $OUT/quant_linear.log 2>&1
echo "quant_linear rc=$?"
timeout 220 python3 quant_decode_step.py --weights fp16,int8,int8-korder,int4,int4-korder \
    --out $OUT/quant_decode_step.json > $OUT/quant_decode_step.log 2>&1; echo "quant_decode_step rc=$?"
cd ..
tail -3 $OUT/tests.log; grep -i "failed\|error" $OUT/tests.log | head -5
grep "bitwise" $OUT/quant_linear.log
sed -n '/microseconds per product/,$p' $OUT/quant_linear.log
grep "kernel vs reference" $OUT/quant_decode_step.log; sed -n '/^weights/,$p' $OUT/quant_decode_step.log | tail -12
