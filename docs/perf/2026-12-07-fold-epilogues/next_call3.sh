# Not run yet: the third call (the peers, issue 11's 6x point): flover fused against
# transformers' continuous batching, llama_7b fp16, 32 requests x 128 new tokens at once.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 560 python3 bench/peers.py --out $OUT > $OUT/peers.log 2>&1; echo "peers rc=$?"
tail -15 $OUT/peers.log
