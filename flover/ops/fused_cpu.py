"""The decode step's small float32 CPU operations compiled (fused_cpu.c), called via ctypes.

In eager PyTorch, RMSNorm is ~8 operators, rotary ~12 for q and again for k, decode attention
~25 with the cache write: at batch 1 on 2 cores those few-microsecond ops cost more than the
quantized linear layers. Here each is one call. Built and cached like quant_cpu.c (same
compiler flags, same cache), used by `flover.ops.fused` and `flover.ops.attention` for float32
CPU tensors; without a compiler (or with FLOVER_NO_CPU_KERNELS set) `lib()` is None and those
modules run their PyTorch references. The references are what the tests hold these equal to.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import torch

from flover.ops import quant_cpu

SOURCE = Path(__file__).with_name("fused_cpu.c")


@cache
def lib() -> ctypes.CDLL | None:
    if os.environ.get("FLOVER_NO_CPU_KERNELS"):
        return None
    so = quant_cpu.load(SOURCE)
    return None if so is None else bind(so)


def bind(so: ctypes.CDLL) -> ctypes.CDLL:
    """The library (a build of fused_cpu.c) with its functions' argument types set."""
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    so.flover_rms_norm.argtypes = [ptr, i64, ptr, i64, ptr, f32, i64, i64, ptr, ptr]
    so.flover_rms_norm.restype = None
    so.flover_rotary.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i32, i64, i64, i64, ptr]
    so.flover_silu_mul.argtypes = [ptr, i64, i64, i64, ptr]
    so.flover_silu_mul.restype = None
    so.flover_write_kv.argtypes = [ptr, ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr,
                                   i64, i64, i64]
    so.flover_decode_attention.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, i64, i64,
                                           i64, i64, f32, ptr, i32]
    so.flover_rotary.restype = so.flover_write_kv.restype = ctypes.c_int
    so.flover_decode_attention.restype = ctypes.c_int
    return so


def usable(x: torch.Tensor) -> bool:
    """Whether `x` is a float32 CPU tensor and the kernels are built."""
    return x.dtype == torch.float32 and x.is_cpu and lib() is not None


def int64(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous int64 tensor (itself when it is one already): what the kernels index by."""
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, H] (rows contiguous); (norm(s), s) with s = x + residual (or x)."""
    t, h = x.shape
    out = torch.empty(t, h)
    s = x if residual is None else torch.empty(t, h)
    w = weight.contiguous()
    lib().flover_rms_norm(x.data_ptr(), x.stride(0),
                          None if residual is None else residual.data_ptr(),
                          0 if residual is None else residual.stride(0),
                          w.data_ptr(), eps, t, h, out.data_ptr(), s.data_ptr())
    return out, s


def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           rot_dim: int, interleaved: bool) -> torch.Tensor:
    """x [T, heads, D] (channels contiguous) rotated at `positions`; a new contiguous tensor."""
    t, heads, d = x.shape
    out = torch.empty(t, heads, d)
    pos = int64(positions)
    if lib().flover_rotary(x.data_ptr(), x.stride(0), x.stride(1), pos.data_ptr(),
                           cos.data_ptr(), sin.data_ptr(), cos.shape[0], rot_dim,
                           int(interleaved), t, heads, d, out.data_ptr()):
        raise IndexError(f"rotary: a position outside the table of {cos.shape[0]}")
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (rows contiguous) -> silu(gate) * up [T, I]."""
    t, i2 = gate_up.shape
    out = torch.empty(t, i2 // 2)
    lib().flover_silu_mul(gate_up.data_ptr(), gate_up.stride(0), t, i2 // 2, out.data_ptr())
    return out


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """cache[slot, :, pos] = k[token] (and v); caches [S, Hkv, L, D] contiguous, k and v
    [T, Hkv, D] with contiguous channels."""
    t, hkv, d = k.shape
    slots, pos = int64(slot_ids), int64(positions)
    if lib().flover_write_kv(k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0],
                             k_cache.shape[2], k.data_ptr(), k.stride(0), k.stride(1),
                             v.data_ptr(), v.stride(0), v.stride(1), slots.data_ptr(),
                             pos.data_ptr(), t, hkv, d):
        raise IndexError(f"write_kv: a slot or position outside the cache {tuple(k_cache.shape)}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor, scale: float,
                     slots: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D] (channels contiguous) against the caches [S, Hkv, L, D] (contiguous): row b
    reads slot slots[b] (default: b) up to lengths[b]; [B, H, D]."""
    b, h, d = q.shape
    out = torch.empty(b, h, d)
    lens = int64(lengths)
    sl = None if slots is None else int64(slots)
    err = lib().flover_decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.shape[0], k_cache.shape[2], None if sl is None else sl.data_ptr(),
        lens.data_ptr(), b, h, k_cache.shape[1], d, scale, out.data_ptr(),
        torch.get_num_threads())
    if err == 1:
        raise IndexError(f"decode_attention: a slot or length outside the cache "
                         f"{tuple(k_cache.shape)}")
    if err:
        raise MemoryError("decode_attention: no memory for the scores")
    return out
