set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_engine_gpu.py tests/test_cuda_graph.py tests/test_invariant_kernels.py 2>&1 | tee $OUT/tests.log | tail -4
HL="--no-live --set runtime_hyperparameter.interval=500 --set request.output_len=fixed --set request.num_requests=32"
for inv in 1 0; do
  timeout 120 python3 -m flover.cli run configs/llama_13b.ini $HL --set runtime_hyperparameter.batch_invariant=$inv --json $OUT/headline_inv$inv.json > $OUT/headline_inv$inv.log 2>&1; echo "headline inv=$inv rc=$?"
  tail -25 $OUT/headline_inv$inv.log | grep -i -E "mean|lone|latency|total|tokens/s" | head -8
done
timeout 250 python3 bench/peers.py --out $OUT > $OUT/peers.log 2>&1; echo "peers rc=$?"; tail -15 $OUT/peers.log
