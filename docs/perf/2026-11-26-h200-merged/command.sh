set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 420 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_engine_gpu.py tests/test_cuda_graph.py tests/test_invariant_kernels.py tests/test_kernels.py tests/test_paged.py tests/test_quant.py tests/test_attention.py 2>&1 | tee $OUT/tests.log | tail -15
timeout 120 python3 -m torch.distributed.run --nproc-per-node 1 bench/tp_graph_one_rank.py --iters 5 --out $OUT/tp1.json > $OUT/tp1.log 2>&1; echo "tp_graph_one_rank rc=$?"; tail -5 $OUT/tp1.log
