# call C: the decode step table (off and on, same process) and the quantized step (fp16 in the same process)
export PYTHONUNBUFFERED=1
cd bench
timeout 330 python3 decode_step.py --models llama_7b,llama_13b --dtypes fp16,bf16 --batches 1,32 --iters 20 --out $OUT/decode_step.json > $OUT/decode_step.log 2>&1; echo "decode_step rc=$?"
timeout 150 python3 quant_decode_step.py --iters 20 --out $OUT/quant_decode_step.json > $OUT/quant_decode_step.log 2>&1; echo "quant rc=$?"
tail -30 $OUT/decode_step.log; tail -12 $OUT/quant_decode_step.log
