# Session 12, call 2 (after call_c.sh): what attention's forms do to a step, same process.
# (1) Invariant prefill of one llama_7b fp16 prompt (512, 2048 tokens): off (the baseline:
#     cuBLAS, SDPA), then on as shipped (a prompt's tokens sharing a tile), tokens1 (a tile per
#     token, the form PERF measured at 2x the baseline) and items (the persistent form).
# (2) The llama_7b fp16 decode step at B = 1, 32, graphs sized by --max-seq-len 2048 (a
#     server's grid): tma (shipped), tokens1, items, merge1 (the merge one split per round
#     trip, as before; the same logits); then the engine's bitwise
#     tests under FLOVER_ATTN_ITEMS=1.
# About 7 minutes; written 2026-12-08 (session 12), not run.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd bench
timeout 150 python3 prefill_step.py --lengths 512,2048 --variants ,tokens1,items \
    --out $OUT/prefill_step.json > $OUT/prefill_step.log 2>&1; echo "prefill rc=$?"
timeout 200 python3 decode_step.py --models llama_7b --dtypes fp16 --batches 1,32 --iters 20 \
    --max-seq-len 2048 --invariance on --variants tma,tokens1,items,merge1 \
    --out $OUT/decode_step.json > $OUT/decode_step.log 2>&1; echo "decode_step rc=$?"
cd ..
FLOVER_ATTN_ITEMS=1 timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_engine_gpu.py -k "not fault" > $OUT/tests_items.log 2>&1; echo "items tests rc=$?"
grep -v Warn $OUT/prefill_step.log | tail -8
grep -E "bitwise|failed" $OUT/decode_step.log | head -6
tail -7 $OUT/decode_step.log
tail -1 $OUT/tests_items.log; grep "^FAILED" $OUT/tests_items.log | head
