#!/usr/bin/env bash
# One device call: kernel and graph tests on the GPU, then the benchmarks. Logs and JSON go
# to $OUT (default ./out); the decode-step table prints last.
#   bash bench/gpu_check.sh            (all)     STAGES="tests decode" bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
STAGES=${STAGES:-"tests sweep profile decode"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/card.txt"
for s in $STAGES; do case $s in
  tests) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cuda_graph.py 2>&1 | tail -60 | tee "$OUT/tests.log" ;;
  attention) python3 bench/attention.py --out "$OUT/attention.json" ;;
  sweep) python3 bench/attention.py --sweep --out "$OUT/attention_sweep.json" ;;
  profile) for b in 1 32; do python3 bench/profile_step.py --batch $b --out "$OUT/profile_b$b.json"; done ;;
  decode) python3 bench/decode_step.py --eager --hf-batches ${HF_BATCHES:-1,32} ${DECODE_ARGS:-} --out "$OUT/decode_step.json" 2>&1 | tee "$OUT/decode_step.log" ;;
esac; done
