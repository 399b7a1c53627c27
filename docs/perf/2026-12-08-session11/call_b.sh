# Session 11, call 2 (after call_a.sh): the changed kernels compiled and checked on the GPU.
# The sm_90a code read by the device's own triton (3.6) and ptxas; the int8 / int4 quant tests
# (the TMA form with its constexpr K part: a row bitwise the same at every M, the reference
# within the activations' rounding); the products alone against the kernel before; where an
# int4 B=1 step's time goes now; the engine's bitwise tests with PDL on (the TMA products and
# the parts' sum now take part). Needs old_quant_triton.py as call_a.sh says. About 9 minutes;
# written 2026-12-08 (session 11), not run.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OLD=$PWD/docs/perf/2026-12-08-session11/old_quant_triton.py
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 40 python3 bench/sm90_codegen.py > $OUT/sm90_codegen.log 2>&1; echo "codegen rc=$?"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py \
    tests/test_quant.py tests/test_fused_layers.py -k "quant_mm or mma_order or fused" \
    > $OUT/tests_quant.log 2>&1; echo "quant tests rc=$?"
cd bench
timeout 120 python3 quant_linear.py --old $OLD --out $OUT/quant_linear.json \
    > $OUT/quant_linear.log 2>&1; echo "quant linear rc=$?"
timeout 60 python3 profile_step.py --batch 1 --batch-invariant --quantization int4 \
    --out $OUT/profile_int4_b1.json > $OUT/profile_int4_b1.log 2>&1; echo "profile rc=$?"
cd ..
FLOVER_PDL=1 timeout 160 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_engine_gpu.py -k "not fault" > $OUT/tests_pdl.log 2>&1; echo "pdl tests rc=$?"
cat $OUT/sm90_codegen.log
tail -1 $OUT/tests_quant.log; grep "^FAILED" $OUT/tests_quant.log | head
grep -A14 "microseconds per product" $OUT/quant_linear.log
grep -v Warn $OUT/profile_int4_b1.log | head -10
tail -1 $OUT/tests_pdl.log; grep "^FAILED" $OUT/tests_pdl.log | head
