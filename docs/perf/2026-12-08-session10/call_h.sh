# Session 10, call 3: the TMA form's K parts from the weight's tiles per multiprocessor (4 / 2 / 1;
# session 10's sweep) against four parts everywhere ("-s4", session 9's), same process.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd bench
timeout 120 python3 quant_decode_step.py --weights int8,int4,int8-s4,int4-s4 --iters 20 \
    --out $OUT/quant_step_split.json > $OUT/quant_step_split.log 2>&1; echo "step rc=$?"
grep "kernel vs reference" $OUT/quant_step_split.log | cut -c1-330
tail -9 $OUT/quant_step_split.log
