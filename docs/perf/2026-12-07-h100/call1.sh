# call 1: split-K and PDL variants of the invariant decode step, bitwise invariance on a random
# preset, GPU tests (default, and the engine's bitwise tests with PDL on)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
cd bench
timeout 130 python3 decode_step.py --models llama_7b,llama_13b --dtypes fp16 --batches 1,32 --iters 20 \
    --variants nosplit,split,pdl --out $OUT/decode_step.json > $OUT/decode_step.log 2>&1
echo "decode_step rc=$?"
timeout 40 python3 invariance.py --models llama_7b --dtypes fp16,bf16 --out $OUT/invariance.json > $OUT/invariance.log 2>&1
echo "invariance rc=$?"
cd ..
timeout 40 python3 -m pytest -q -p no:cacheprovider -o addopts="" -x tests/test_invariant_kernels.py > $OUT/tests.log 2>&1
echo "tests rc=$?"; tail -2 $OUT/tests.log
FLOVER_PDL=1 timeout 40 python3 -m pytest -q -p no:cacheprovider -o addopts="" -x tests/test_engine_gpu.py > $OUT/tests_pdl.log 2>&1
echo "tests_pdl rc=$?"; tail -2 $OUT/tests_pdl.log
tail -6 $OUT/invariance.log
grep -v "^ " $OUT/decode_step.log | tail -22
