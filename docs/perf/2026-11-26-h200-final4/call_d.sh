# call D: the headline (async on, then off as the baseline) and the peers (transformers in the same call)
export PYTHONUNBUFFERED=1
for a in 1 0; do timeout 100 python3 -m flover.cli run configs/llama_13b.ini --no-live --set runtime_hyperparameter.interval=500 --set request.output_len=fixed --set request.num_requests=32 --set runtime_hyperparameter.async_scheduling=$a --json $OUT/headline_async$a.json > $OUT/headline_async$a.log 2>&1; echo "headline async=$a rc=$?"; tail -14 $OUT/headline_async$a.log; done
timeout 330 python3 bench/peers.py --out $OUT > $OUT/peers.log 2>&1; echo "peers rc=$?"; tail -25 $OUT/peers.log
