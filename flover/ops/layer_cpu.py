"""A LLaMA decoder layer in one compiled call (layer_cpu.c) for decode iterations on the CPU.

The layer's float32 path on the CPU is ten compiled calls (flover.ops.fused, attention, the
QuantLinear products) with Python between them: at batch 1 on 2 cores that Python was about a
quarter of the decode step. layer_cpu.c makes the same calls in the same order, so its output
is the Python path's bit for bit; this module says when it applies and marshals the arguments,
which for each layer's weights are kept between steps (re-made when a tensor moves).

It applies to an iteration of decode rows only, in the slot layout, with float32 activations
and caches, the compiled kernels built and `fused.ENABLED`, for a layer whose four products are
QuantLinear without bias in the K order (a GGUF file kept packed, or --quantization int4/int8)
and whose norms and rotary tables are float32. Anything else runs the layer as before.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import torch

from flover.ops import fused, quant_cpu
from flover.ops.fused_cpu import int64
from flover.ops.quant import QuantLinear

SOURCE = Path(__file__).with_name("layer_cpu.c")
ENABLED = True  # off: every layer runs its calls from Python (bench/cpu_quant_step.py --cpu-layer)
f32 = torch.float32


class QLinear(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64),
                ("bits", ctypes.c_int32), ("wide", ctypes.c_int32)]


@cache
def lib() -> ctypes.CDLL | None:
    """The compiled layer, or None (no compiler, or FLOVER_NO_CPU_KERNELS, FLOVER_NO_QUANT_KERNEL
    or FLOVER_NO_CPU_LAYER set: the layer runs its calls from Python)."""
    if any(os.environ.get(v) for v in ("FLOVER_NO_CPU_KERNELS", "FLOVER_NO_QUANT_KERNEL",
                                       "FLOVER_NO_CPU_LAYER")):
        return None
    so = quant_cpu.load(SOURCE)
    return None if so is None else bind(so)


def bind(so: ctypes.CDLL) -> ctypes.CDLL:
    """The library (a build of layer_cpu.c) with its function's argument types set."""
    i64, ptr, flt = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    so.flover_llama_decode_layer.argtypes = [
        ptr, i64, i64, ptr, ptr, flt, ctypes.POINTER(QLinear), i64, i64, i64, i64, ptr, ptr,
        i64, i64, ctypes.c_int, ptr, ptr, i64, i64, ptr, ptr, ptr, flt, ptr, ctypes.c_int]
    so.flover_llama_decode_layer.restype = ctypes.c_int
    return so


def prepare(x: torch.Tensor, meta, k_caches: torch.Tensor, v_caches: torch.Tensor):
    """Once per forward: (slots, positions, lengths) as int64 if this iteration can take the
    compiled layer, else None."""
    if not (ENABLED and fused.ENABLED and x.is_cpu and x.dtype == f32 and x.dim() == 2
            and x.is_contiguous() and not meta.prefills and meta.num_decode == x.shape[0]
            and meta.block_tables is None and meta.write_offsets is None and meta.rows is None
            and k_caches.dtype == f32 and v_caches.dtype == f32 and lib() is not None):
        return None
    return int64(meta.slot_ids), int64(meta.positions), int64(meta.decode_lengths)


def _parts(layer) -> tuple:
    """The layer's norms and products, read from the module dicts (no nn.Module lookups: this
    runs for every layer of every step)."""
    top = layer._modules
    attn, mlp = top["self_attn"]._modules, top["mlp"]._modules
    return (top["input_layernorm"], top["post_attention_layernorm"], attn["qkv_proj"],
            attn["o_proj"], mlp["gate_up_proj"], mlp["down_proj"])


def _where(parts: tuple, rotary) -> tuple[int, ...]:
    """Where every tensor the compiled layer reads lives (a plan holds while these do)."""
    return tuple(t.data_ptr() for m in (*parts, rotary)
                 for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)


def _plan(layer, rotary):
    """The layer's arguments that do not change between steps, or None if it cannot take the
    compiled layer. Kept on the layer while its modules and their tensors stay where they are."""
    parts = _parts(layer)
    where = _where(parts, rotary)
    kept = layer.__dict__.get("_cpu_decode_plan")
    if kept is not None and kept[0] == parts and kept[1] == where:
        return kept[2]
    norm1, norm2, *lins = parts
    tensors = [norm1.weight, norm2.weight, rotary.cos, rotary.sin,
               *(t for m in lins if isinstance(m, QuantLinear)
                 for t in (m.qweight, m.scales, m.mins) if t is not None)]
    plan = None
    if (all(isinstance(m, QuantLinear) and m.bias is None and not m.mma_order
            and m.qweight.is_cpu for m in lins)
            and all(t.is_contiguous() for t in tensors)
            and all(t.dtype == f32 for t in tensors[:4]) and norm1.eps == norm2.eps):
        attn, rot = layer.self_attn, rotary
        arr = (QLinear * 4)(*(QLinear(m.qweight.data_ptr(), m.scales.data_ptr(),
                                      None if m.mins is None else m.mins.data_ptr(),
                                      m.out_features, m.in_features, m.group, m.bits,
                                      int(m.scales.dtype == f32)) for m in lins))
        # flover_llama_decode_layer's arguments from norm1 to `interleaved`, then `scale`
        plan = ((norm1.weight.data_ptr(), norm2.weight.data_ptr(), norm1.eps, arr, attn.h,
                 attn.hkv, attn.d, lins[3].in_features, rot.cos.data_ptr(), rot.sin.data_ptr(),
                 rot.cos.shape[0], rot.rot_dim, int(rot.interleaved)), attn.scale)
    layer.__dict__["_cpu_decode_plan"] = (parts, where, plan)
    return plan


def decode_layer(layer, x: torch.Tensor, rotary, prep, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> torch.Tensor | None:
    """The layer's output for the decode rows x [T, H] (its caches written), or None: this
    layer does not take the compiled path (`prepare` said the iteration can)."""
    plan = _plan(layer, rotary)
    if plan is None or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    fixed, scale = plan
    slots, pos, lens = prep
    t, h = x.shape
    out = torch.empty(t, h)
    err = lib().flover_llama_decode_layer(
        x.data_ptr(), t, h, *fixed, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0],
        k_cache.shape[2], slots.data_ptr(), pos.data_ptr(), lens.data_ptr(), scale,
        out.data_ptr(), torch.get_num_threads())
    if err == 1:
        raise IndexError(f"decode layer: a position, slot or length outside its table or the "
                         f"cache {tuple(k_cache.shape)}")
    if err:
        raise MemoryError("decode layer: no memory for the scratch")
    return out
