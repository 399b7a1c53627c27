# Session 9's second call: session 8's call2.sh (attention's empty splits skipped, SKIP_EMPTY,
# against writing empty partials, grid sized by max_seq_len 2048 > context as in the engine's
# graphs; the step's logits compared bitwise), where the folded 7b step's time goes
# (profile_step.py, eager, B=1), and the mma order's TMA configurations swept
# (quant_linear.py --tma-sweep). About 7 minutes.
bash docs/perf/2026-12-07-session8/call2.sh
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
cd bench
for v in tma fold; do
  timeout 60 python3 profile_step.py --model llama_7b --batch 1 --batch-invariant --variant $v \
      --out $OUT/profile_7b_b1_$v.json > $OUT/profile_7b_b1_$v.log 2>&1; echo "profile $v rc=$?"
done
timeout 280 python3 quant_linear.py --tma-sweep --out $OUT/quant_sweep.json \
    > $OUT/quant_sweep.log 2>&1; echo "sweep rc=$?"
cd ..
for v in tma fold; do echo "== profile $v"; head -14 $OUT/profile_7b_b1_$v.log; done
grep "^sweep\|fails" $OUT/quant_sweep.log | head -20
