# call A: the TMA forms of the invariant linear and of the int8/int4 products against the pointer
# forms (same process): decode steps, bitwise invariance, compiled kernel tests, products alone
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
cd bench
timeout 130 python3 decode_step.py --models llama_7b,llama_13b --dtypes fp16 --batches 1,32 --iters 20 \
    --variants ptr,tma --out $OUT/decode_step.json > $OUT/decode_step.log 2>&1; echo "decode_step rc=$?"
timeout 100 python3 quant_decode_step.py --weights fp16,int8-ptr,int8,int4-ptr,int4 --iters 20 \
    --out $OUT/quant_decode_step.json > $OUT/quant_decode_step.log 2>&1; echo "quant_decode_step rc=$?"
timeout 70 python3 invariance.py --models llama_7b_gqa8,gptj_6b --dtypes fp16,bf16 --out $OUT/invariance.json > $OUT/invariance.log 2>&1; echo "invariance rc=$?"
cd ..
timeout 45 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_invariant_kernels.py \
    tests/test_kernels.py -k "linear or quant_mm or tma" > $OUT/tests.log 2>&1; echo "tests rc=$?"
cd bench
timeout 60 python3 linear.py --dtypes fp16 --batches 1,32 --tma-sweep --shapes 7b.o,7b.down,7b.qkv --out $OUT/linear.json > $OUT/linear.log 2>&1
echo "linear rc=$?"
timeout 60 python3 quant_linear.py --out $OUT/quant_linear.json > $OUT/quant_linear.log 2>&1
echo "quant_linear rc=$?"
cd ..
tail -3 $OUT/tests.log
grep -v "^ " $OUT/decode_step.log | tail -12
tail -8 $OUT/quant_decode_step.log
tail -4 $OUT/invariance.log
grep "M=  1\|M= 32\|bitwise" $OUT/linear.log | head -30
grep "int[48]:\|sweep int" $OUT/quant_linear.log | head -40
