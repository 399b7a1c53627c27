# Session 9's third call: the mma order with the sweep's best configuration (tiles of 64
# outputs, K in four parts) in the llama_7b step, against the K order as shipped.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD
cd bench
timeout 200 python3 quant_step_configs.py '{"block_n": 64, "split": 4}' \
    --weights fp16,int8,int8-korder,int4,int4-korder --out $OUT/quant_step_bn64.json \
    > $OUT/quant_step_bn64.log 2>&1; echo "rc=$?"
tail -12 $OUT/quant_step_bn64.log
