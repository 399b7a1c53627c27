# call B: GPU tests of the merged tree, then invariance (random presets and the embedded model)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" -x tests/test_engine_gpu.py tests/test_async_gpu.py tests/test_cuda_graph.py tests/test_fused_layers.py tests/test_invariant_kernels.py tests/test_paged.py tests/test_quant.py tests/test_attention.py 2>&1 | tee $OUT/tests.log | tail -12 || true
timeout 240 python3 bench/invariance.py --embedded --out $OUT/invariance.json > $OUT/invariance.log 2>&1; echo "invariance rc=$?"; tail -16 $OUT/invariance.log
