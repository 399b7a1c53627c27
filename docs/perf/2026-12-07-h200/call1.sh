# call 1: split-K and PDL variants of the invariant decode step, GPU tests (default and PDL on),
# bitwise invariance on random presets, the split sweep on the narrow shapes
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
cd bench
timeout 150 python3 decode_step.py --models llama_7b,llama_13b --dtypes fp16 --batches 1,32 --iters 20 \
    --variants nosplit,split,pdl --out $OUT/decode_step.json > $OUT/decode_step.log 2>&1
echo "decode_step rc=$?"
timeout 45 python3 invariance.py --models llama_7b --dtypes fp16,bf16 --out $OUT/invariance.json > $OUT/invariance.log 2>&1
echo "invariance rc=$?"
FLOVER_PDL=1 timeout 30 python3 invariance.py --models llama_7b --dtypes fp16 --out $OUT/invariance_pdl.json > $OUT/invariance_pdl.log 2>&1
echo "invariance_pdl rc=$?"
cd ..
timeout 45 python3 -m pytest -q -p no:cacheprovider -o addopts="" -x tests/test_invariant_kernels.py > $OUT/tests.log 2>&1
echo "tests rc=$?"; tail -2 $OUT/tests.log
FLOVER_PDL=1 timeout 45 python3 -m pytest -q -p no:cacheprovider -o addopts="" -x tests/test_engine_gpu.py > $OUT/tests_pdl.log 2>&1
echo "tests_pdl rc=$?"; tail -2 $OUT/tests_pdl.log
cd bench
timeout 35 python3 linear.py --dtypes fp16 --batches 1 --shapes 7b.o,7b.down,7b.qkv,13b.o,13b.down,13b.gate_up --splits 1,2,3,4 --out $OUT/linear.json > $OUT/linear.log 2>&1
echo "linear rc=$?"
cd ..
tail -6 $OUT/invariance.log; tail -4 $OUT/invariance_pdl.log
grep "parts\|bitwise" $OUT/linear.log | tail -14
grep -v "^ " $OUT/decode_step.log | tail -22
