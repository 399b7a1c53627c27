# call 2 (the warm machine of call 1, right after it): the split sweep on the narrow shapes, and the
# engine's GPU tests with PDL on (call 1's run of them hit its 40 s limit after 10 tests)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; cd bench
timeout 70 python3 linear.py --dtypes fp16 --batches 1,32 --shapes 7b.o,7b.down,7b.qkv,13b.o,13b.down,13b.gate_up \
    --splits 1,2,3,4 --out $OUT/linear.json > $OUT/linear.log 2>&1; echo "linear rc=$?"; cd ..
FLOVER_PDL=1 timeout 75 python3 -m pytest -q -p no:cacheprovider -o addopts="" -x tests/test_engine_gpu.py > $OUT/tests_pdl.log 2>&1
echo "tests_pdl rc=$?"; tail -2 $OUT/tests_pdl.log; grep "parts\|bitwise\|copy" $OUT/linear.log
