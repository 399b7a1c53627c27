"""Fused operations of the decode step: the plain PyTorch reference of each, and the dispatch
to the Triton kernels of `flover.ops.fused_triton` for tensors on a GPU and to the compiled
ones of `flover.ops.fused_cpu` for float32 tensors on the CPU.

Each kernel replaces a chain of small launches (RMSNorm alone is six) that dominate a
decode step's non-matrix time; the reference is what the CPU runs and what the tests hold
the kernels equal to. `ENABLED = False` turns every kernel off (the tests compare the two).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from flover.ops import fused_cpu

ENABLED = True
# The folded norm and SiLU as the products' epilogues where they can be (`fold_norms`). Off:
# on an H100 it took 1-1.4% off llama_13b's step and added 2.7-2.8% to llama_7b's (docs/PERF.md,
# "The fold with its own K steps"). FLOVER_FOLD=1 turns it on. Off, no norm is folded, and
# folded ones run unfused.
FOLDED = os.environ.get("FLOVER_FOLD", "0") == "1"
# The residual add and SiLU * up as the int8/int4 products' epilogues on a GPU (bitwise the
# unfused ops' results; off: their own ops, to compare).
QUANT_EPILOGUES = True

try:  # the kernels import triton; CPU-only installs go without it
    from flover.ops import fused_triton as _k
    from flover.ops import linear_triton as _lk
except Exception:  # noqa: BLE001 - any import failure means: use the references
    _k = _lk = None


def _fast(x: torch.Tensor) -> bool:
    return ENABLED and _k is not None and x.is_cuda


def _cpu(x: torch.Tensor) -> bool:
    return ENABLED and fused_cpu.usable(x) and x.stride(-1) == 1


def rms_norm_ref(x, weight, eps, residual=None):
    s = x if residual is None else x + residual
    sf = s.float()
    return weight * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype), s


def rms_norm(x: torch.Tensor, norm, residual: torch.Tensor | None = None):
    """(norm(s), s) with s = x + residual; `norm` is an RMSNorm module (weight, eps)."""
    if _cpu(x) and x.dim() == 2 and norm.weight.dtype == torch.float32 and (
            residual is None or (residual.shape == x.shape and _cpu(residual))):
        return fused_cpu.rms_norm(x, norm.weight, norm.eps, residual)
    if _fast(x) and x.dim() == 2:
        return _k.rms_norm(x, norm.weight, norm.eps, residual)
    return rms_norm_ref(x, norm.weight, norm.eps, residual)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if _cpu(gate_up) and gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0:
        return fused_cpu.silu_mul(gate_up)
    if _fast(gate_up) and gate_up.dim() == 2 and gate_up.stride(-1) == 1:
        return _k.silu_mul(gate_up)
    return silu_mul_ref(gate_up)


def rotary(x: torch.Tensor, positions: torch.Tensor, rot) -> torch.Tensor:
    """x [T, heads, D] rotated by `rot` (a `flover.models.layers.Rotary`), its reference."""
    if _cpu(x) and x.dim() == 3 and rot.cos.dtype == torch.float32 and rot.cos.is_contiguous() \
            and rot.sin.is_contiguous():
        return fused_cpu.rotary(x, positions, rot.cos, rot.sin, rot.rot_dim, rot.interleaved)
    if _fast(x) and x.stride(-1) == 1:
        return _k.rotary(x, positions, rot.cos, rot.sin, rot.rot_dim, rot.interleaved)
    return rot(x, positions)


def write_kv(k_cache, v_cache, k, v, slot_ids, positions) -> bool:
    """The cache write in one launch on a GPU; False: the caller does the reference."""
    if _fast(k) and k.stride(-1) == 1 and v.stride(-1) == 1:
        _k.write_kv(k_cache, v_cache, k, v, slot_ids, positions)
        return True
    return False


# The decode step's fused layers: each function's reference (the last lines of each) is the
# exact sequence of calls the model made before, so that the CPU, invariance off (cuBLAS),
# quantized and tensor-parallel linear modules run as before, bit for bit. The fused kernels
# run only on the invariant GPU path: a batch-invariant linear (`InvariantLinear`) on a GPU
# takes a residual add as its epilogue; where its weight carries the norm before it
# (FOLDED: `flover.ops.linear.fold_norms`, Hopper's TMA form) it also scales each row by its
# 1 / rms and, for gate_up, applies silu * up; rotary and the KV write are one kernel when
# meta.batch_invariant. An int8/int4 product on a GPU whose K is in parts applies the residual
# add and silu * up in the kernel that sums the parts (QUANT_EPILOGUES), with the same bits.
# Each saves the launches in between. (The norm and SiLU as the pointer
# form's prologues, which recompute the rows' elementwise work in every column tile, made the
# H200's decode step slower: docs/perf/2026-11-26-fused-layers.md; they are gone.)


def _invariant(linear, x: torch.Tensor) -> bool:
    from flover.ops.linear import InvariantLinear  # here: linear.py imports the models

    w = getattr(linear, "weight", None)
    return (ENABLED and _lk is not None and isinstance(linear, InvariantLinear) and x.is_cuda
            and x.dim() == 2 and w.stride(-1) == 1 and x.dtype == w.dtype)


def _folded(linear, x: torch.Tensor) -> bool:
    """The product can take the norm as its epilogue: its weight carries the norm's
    (`flover.ops.linear.fold_norms`) and the TMA form takes it."""
    return (FOLDED and getattr(linear, "folded_norm", False) and _invariant(linear, x)
            and _lk.fusable(linear.weight))


def _quant(linear, x: torch.Tensor) -> bool:
    """A weight-only int8/int4 linear on a GPU, without bias: its parts' sum takes the residual
    add and SiLU * up (`quant_triton.quant_mm`; QUANT_EPILOGUES)."""
    from flover.ops.quant import QuantLinear  # here: quant.py imports the models

    return (ENABLED and QUANT_EPILOGUES and isinstance(linear, QuantLinear) and x.is_cuda
            and linear.bias is None and linear.layout.gpu_kernel())


def norm_linear(x: torch.Tensor, norm, linear, residual: torch.Tensor | None = None,
                gated: bool = False):
    """(y, s) with s = x + residual (or x) and y = linear(rms_norm(s)), or with `gated`
    silu_mul of it (the linear's output is gate then up): `rms_norm`, the module, `silu_mul`.
    Fused, where the norm's weight is folded into the linear's (`fold_norms`) and s is given
    whole (no residual: `linear_add` added it as the last product's epilogue): one launch,
    which scales each row's sums by its 1 / rms and applies silu * up in its epilogue.
    Otherwise a folded norm's weight is ones, and the sequence computes the same function."""
    if residual is None and _folded(linear, x):
        return _lk.linear(x, linear.weight, linear.bias, rms_eps=norm.eps, gated=gated), x
    h, s = rms_norm(x, norm, residual)
    if gated and _quant(linear, h):
        return linear.fused(h, gated=True), s
    y = linear(h)
    return (silu_mul(y) if gated else y), s


def linear_add(x: torch.Tensor, linear, residual: torch.Tensor):
    """residual + linear(x), as (sum, None) where the add is the product's epilogue (the
    invariant GPU path), else as (linear(x), residual): the add left to the next
    `norm_linear`, whose norm kernel does it with no launch of its own."""
    if _invariant(linear, x):
        return _lk.linear(x, linear.weight, linear.bias, residual=residual), None
    return linear(x), residual


def linear_residual(x: torch.Tensor, linear, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x); fused: the add is the product's epilogue (the invariant linear),
    or the int8/int4 product's parts' sum's."""
    if _invariant(linear, x):
        return _lk.linear(x, linear.weight, linear.bias, residual=residual)
    if _quant(linear, x):
        return linear.fused(x, residual=residual)
    return residual + linear(x)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rot, k_cache, v_cache,
                    meta) -> torch.Tensor:
    """Rotate q and k [T, heads, D] by `rot` at meta.positions and store the rotated k and v
    in this iteration's cache places (slots or pages): `rotary` twice then
    `attention.write_kv`; returns the rotated q. One launch on the invariant GPU path."""
    offsets = meta.positions if meta.write_offsets is None else meta.write_offsets
    if (meta.batch_invariant and _fast(q) and q.dim() == 3 and q.stride(-1) == 1
            and k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1
            and v_cache.stride(-1) == 1):
        return _k.rotary_kv(q, k, v, meta.positions, rot.cos, rot.sin, rot.rot_dim,
                            rot.interleaved, k_cache, v_cache, meta.slot_ids, offsets)
    from flover.ops.attention import write_kv  # here: attention.py imports this module

    q = rotary(q, meta.positions, rot)
    k = rotary(k, meta.positions, rot)
    write_kv(k_cache, v_cache, k, v, meta)
    return q
