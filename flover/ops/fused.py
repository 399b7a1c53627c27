"""Fused operations of the decode step: the plain PyTorch reference of each, and the dispatch
to the Triton kernels of `flover.ops.fused_triton` for tensors on a GPU and to the compiled
ones of `flover.ops.fused_cpu` for float32 tensors on the CPU.

Each kernel replaces a chain of small launches (RMSNorm alone is six) that dominate a
decode step's non-matrix time; the reference is what the CPU runs and what the tests hold
the kernels equal to. `ENABLED = False` turns every kernel off (the tests compare the two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flover.ops import fused_cpu

ENABLED = True

try:  # the kernels import triton; CPU-only installs go without it
    from flover.ops import fused_triton as _k
except Exception:  # noqa: BLE001 - any import failure means: use the references
    _k = None


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
