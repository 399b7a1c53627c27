"""quant_decode_step.py with the mma order's TMA launch configuration overridden (the K order
keeps tma_config's), to time a swept configuration in the step against the K order:

    python3 bench/quant_step_configs.py '{"block_n": 64, "split": 4}' --weights int4,int4-korder
"""

import json
import sys

import quant_decode_step

from flover.ops import quant_triton

override = json.loads(sys.argv.pop(1))
_tma = quant_triton._quant_mm_tma


def _mma_config(x, qweight, scales, mins, bits, config, residual, gated, mma_order):
    if mma_order:
        config = override | (config or {})
    return _tma(x, qweight, scales, mins, bits, config, residual, gated, mma_order)


quant_triton._quant_mm_tma = _mma_config
quant_decode_step.main()
