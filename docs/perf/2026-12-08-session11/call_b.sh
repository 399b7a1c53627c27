# Session 11, call 2 (after call_a.sh, same or a fresh machine): the changed kernels compiled and
# checked on the GPU. The int8 / int4 quant tests (the TMA form with its constexpr K part: a
# row bitwise the same at every M, the reference within the activations' rounding); the
# engine's bitwise tests with PDL on (the TMA products and the parts' sum now take part);
# the kernels' sm_90a code read by the device's own triton (3.6) and ptxas; where an int4
# B=1 step's time goes now. About 7 minutes; written 2026-12-08 (session 11), not run.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py \
    tests/test_quant.py -k "quant_mm or mma_order" > $OUT/tests_quant.log 2>&1; echo "quant tests rc=$?"
FLOVER_PDL=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_engine_gpu.py -k "not fault" > $OUT/tests_pdl.log 2>&1; echo "pdl tests rc=$?"
timeout 40 python3 bench/sm90_codegen.py > $OUT/sm90_codegen.log 2>&1; echo "codegen rc=$?"
cd bench
timeout 60 python3 profile_step.py --batch 1 --batch-invariant --quantization int4 \
    --out $OUT/profile_int4_b1.json > $OUT/profile_int4_b1.log 2>&1; echo "profile rc=$?"
cd ..
tail -1 $OUT/tests_quant.log; grep "^FAILED" $OUT/tests_quant.log | head
tail -1 $OUT/tests_pdl.log; grep "^FAILED" $OUT/tests_pdl.log | head
cat $OUT/sm90_codegen.log
grep -v Warn $OUT/profile_int4_b1.log | head -10
