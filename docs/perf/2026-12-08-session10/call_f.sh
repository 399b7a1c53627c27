# Session 10, call 2: the TMA form's configurations again (tiles of 32 / 64 / 128 outputs, steps
# of 256, 3 / 4 stages, K in 1 / 2 / 4 / 8 parts, summed by a second launch or in the product's),
# each weighted by its launches per llama_7b step, and each shape's best over M = 1 and 32.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
cd bench
timeout 420 python3 quant_linear.py --tma-sweep --out $OUT/quant_sweep.json \
    > $OUT/quant_sweep.log 2>&1; echo "sweep rc=$?"
grep "^sweep" $OUT/quant_sweep.log
