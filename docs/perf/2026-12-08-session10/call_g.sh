# Session 10, call 2: bfloat16 activations' dequantisation by the float32 trick (2^23 + q) against
# int -> float conversions ("-cvt"), same process, with its compiled test; then the TMA form's
# configurations again (tiles of 32 / 64 outputs, steps of 256, 3 stages, K in 1 / 2 /
# 4 / 8 parts, summed by a second launch or in the product's), each weighted by its launches per
# llama_7b step, and each shape's best over M = 1 and 32.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 80 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py \
    -k "bitwise_the_conversions" > $OUT/tests_g.log 2>&1; echo "tests rc=$?"; tail -1 $OUT/tests_g.log
cd bench
timeout 100 python3 quant_decode_step.py --dtype bf16 --weights fp16,int8,int4,int8-cvt,int4-cvt \
    --out $OUT/quant_step_bf16_cvt.json > $OUT/quant_step_bf16_cvt.log 2>&1; echo "bf16 rc=$?"
tail -11 $OUT/quant_step_bf16_cvt.log
timeout 270 python3 quant_linear.py --tma-sweep --out $OUT/quant_sweep.json \
    > $OUT/quant_sweep.log 2>&1; echo "sweep rc=$?"
grep "^sweep" $OUT/quant_sweep.log
