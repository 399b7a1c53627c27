# call 1: the folded-norm and gated epilogues of the TMA linear (issue 11): compiled kernel tests,
# the fused products against the kernels they replace, the decode step with the TMA forms with
# and without the epilogues and attention's merge, the pointer form (same process), bitwise invariance
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_fused_layers.py \
    tests/test_invariant_kernels.py > $OUT/tests.log 2>&1; echo "tests rc=$?"
cd bench
timeout 60 python3 linear.py --fused --dtypes fp16 --shapes 7b.qkv,7b.gate_up --batches 1,32 \
    --out $OUT/fused.json > $OUT/fused.log 2>&1; echo "fused rc=$?"
timeout 200 python3 decode_step.py --models llama_7b,llama_13b --dtypes fp16 --batches 1,32 --iters 20 \
    --variants tma-nofold,tma-nomerge,tma --out $OUT/decode_step.json > $OUT/decode_step.log 2>&1; echo "decode_step rc=$?"
timeout 70 python3 invariance.py --models llama_7b_gqa8 --dtypes fp16,bf16 --out $OUT/invariance.json \
    > $OUT/invariance.log 2>&1; echo "invariance rc=$?"
timeout 50 python3 profile_step.py --model llama_7b --batch 1 --batch-invariant --out $OUT/profile.json \
    > $OUT/profile.log 2>&1; echo "profile rc=$?"
cd ..
tail -3 $OUT/tests.log
grep "M=" $OUT/fused.log
grep -v "^ " $OUT/decode_step.log | tail -16
tail -4 $OUT/invariance.log
head -14 $OUT/profile.log
