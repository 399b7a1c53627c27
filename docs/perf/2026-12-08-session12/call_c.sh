# Session 12, call 1: attention's new forms on the GPU, correctness first.
# (1) The compiled row-attention tests: a prompt's consecutive tokens sharing a tile must give
#     each token bitwise its lone result on the hardware's mma (the interpreter cannot show
#     this), in the grid form and the persistent form; the work list; the sm_90a code read by
#     the device's own triton. (2) bench/invariance.py (presets, 4 layers, fp16 and bf16,
#     staggered and chunked mixes) with the shipped grid, then with the persistent form
#     (FLOVER_ATTN_ITEMS=1). (3) The kernels alone, per layer (`attention.py --forms`):
#     tokens1 (a tile per token, as before) / shipped / items, decode rows and whole prompts.
# (4) The same for the paged layout's kernel: K/V steps of 64 (shipped, spilling under triton
#     3.6) or 32, a tile per token or a prompt's tokens sharing it (paged_forms).
# About 8 minutes; written 2026-12-08 (session 12), not run: no device could be had.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_invariant_kernels.py \
    tests/test_paged.py -k "row_attention or prompts_tokens or runs_cover or work_list or triton \
    or sharing_a_tile or paged_runs" > $OUT/tests_attention.log 2>&1
echo "attention tests rc=$?"
timeout 40 python3 bench/sm90_codegen.py > $OUT/sm90_codegen.log 2>&1; echo "codegen rc=$?"
cd bench
timeout 100 python3 invariance.py --dtypes fp16,bf16 --out $OUT/invariance.json \
    > $OUT/invariance.log 2>&1; echo "invariance rc=$?"
FLOVER_ATTN_ITEMS=1 timeout 100 python3 invariance.py --dtypes fp16,bf16 \
    --out $OUT/invariance_items.json > $OUT/invariance_items.log 2>&1; echo "invariance items rc=$?"
timeout 180 python3 attention.py --forms --max-len 4096 --out $OUT/attention_forms.json \
    > $OUT/attention_forms.log 2>&1; echo "forms rc=$?"
cd ..
tail -1 $OUT/tests_attention.log; grep "^FAILED" $OUT/tests_attention.log | head
grep attention $OUT/sm90_codegen.log
tail -12 $OUT/invariance.log
tail -12 $OUT/invariance_items.log
cat $OUT/attention_forms.log | grep -v Warn
