"""Weight-only int4 / int8 linear layers: formats, PyTorch references, the swapped-in module.

One layout for both sources, llama.cpp's blocks of 32 weights along K, so that a GGUF file's
Q4_0, Q4_1 and Q8_0 tensors are taken as they are (no requantisation, no loss):

    int4: qweight uint8 [N, K/2]: per block of 32, byte j = weight j (low nibble) | weight j+16
          (high nibble), q in [0, 15]; scales, mins float16 [N, K/group]: w = q * scale + min
          in float32 (Q4_1: scale d, min m; Q4_0: w = d * (q - 8), so scale d, min -8d, exact)
    int8: qweight int8 [N, K]; scales float16 [N, K/group]: w = q * scale (Q8_0 as is)

`group` is a multiple of 32 (GGUF: 32). On a GPU whose products take the TMA form
(`quant_triton.mma_order_applies`), each row's bytes are permuted once at load into the "mma
order" (`to_mma_order`; same shape, dtype and bytes, `QuantLinear.mma_order`): every 16 bytes
hold what one thread of the tensor cores' MMA needs, so the kernel reads them with 16-byte
loads instead of 2-byte ones. Per row, in spans of 64 weights (int8) or 128 (int4), 32-bit
word 4t + j (t = 0..3, a thread's column in the MMA's fragment) holds

    int8: bytes = weights 16j + (2t, 2t+1, 2t+8, 2t+9)
    int4: nibbles i and i + 4 (i = 0..3) = weights 32j + 16(i // 2) + 8(i % 2) + 2t, and + 1

so an int4 word is one group of 32's weights for one thread, and its nibbles i and i + 4 are
a neighbouring pair, which one `lop3` turns into two float16 (the kernel's dequantisation).

From a full-precision checkpoint, `quantize` makes int4 asymmetric (min/max of each group)
and int8 symmetric (absmax / 127). Activations and the
KV cache stay in the model's dtype. The model's nn.Linear modules (and its LM head) are
replaced by QuantLinear on `meta`, before storage is allocated, so a model is never held in
full precision and quantized at once (flover/weights.py streams the tensors into them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flover.models.layers import TiedHead
from flover.ops import quant_cpu

QUANTIZATIONS = ("int8", "int4")
BLOCK = 32
DEFAULT_GROUP = 32


@dataclass
class Packed:
    """One weight matrix in the layout above (rows = output features)."""

    bits: int
    group: int
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    def tensors(self, prefix: str) -> list[tuple[str, torch.Tensor]]:
        out = [(prefix + "qweight", self.qweight), (prefix + "scales", self.scales)]
        return out if self.mins is None else [*out, (prefix + "mins", self.mins)]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)

    def rows(self, perm: np.ndarray) -> Packed:
        """The same weights with their output rows reordered."""
        p = torch.from_numpy(perm)
        return Packed(self.bits, self.group, self.qweight[p], self.scales[p],
                      None if self.mins is None else self.mins[p])


def _unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] int values in [0, 15], in the block order described above."""
    n = qweight.shape[0]
    b = qweight.view(n, -1, BLOCK // 2)
    return torch.cat((b & 15, b >> 4), dim=-1).reshape(n, -1)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    n = q.shape[0]
    b = q.to(torch.uint8).view(n, -1, BLOCK)
    return (b[..., :BLOCK // 2] | (b[..., BLOCK // 2:] << 4)).reshape(n, -1).contiguous()


def _mma_permutation(bits: int) -> torch.Tensor:
    """perm such that the mma order's weight o of a span is the K order's weight perm[o]
    (int8: bytes of 64 weights; int4: nibbles of 128, nibble 2b low and 2b + 1 high in byte b)."""
    out = []
    for t in range(4):
        for j in range(4):  # word 4t + j
            if bits == 8:
                out += [16 * j + 2 * t + d for d in (0, 1, 8, 9)]
            else:
                pair = [32 * j + 16 * (i // 2) + 8 * (i % 2) + 2 * t for i in range(4)]
                out += pair + [k + 1 for k in pair]
    return torch.tensor(out)


def _unpack_pairs(qweight: torch.Tensor) -> torch.Tensor:
    """int4's values one per element [N, K] from bytes b holding weights 2b (low nibble) and
    2b + 1 (high): the mma order's packing."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def _pack_pairs(q: torch.Tensor) -> torch.Tensor:
    b = q.reshape(q.shape[0], -1, 2)
    return (b[..., 0] | (b[..., 1] << 4)).contiguous()


def _permute_spans(q: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One weight per element [N, K]: in each row's spans of len(index), weight o <- index[o]."""
    n = q.shape[0]
    return q.reshape(n, -1, len(index))[:, :, index.to(q.device)].reshape(n, -1).contiguous()


def to_mma_order(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The K order's packed weights (module docstring) -> the mma order: same shape and dtype."""
    perm = _mma_permutation(bits)
    if bits == 8:
        return _permute_spans(qweight, perm)
    return _pack_pairs(_permute_spans(_unpack_nibbles(qweight), perm))


def from_mma_order(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of to_mma_order."""
    inverse = torch.argsort(_mma_permutation(bits))
    if bits == 8:
        return _permute_spans(qweight, inverse)
    return _pack_nibbles(_permute_spans(_unpack_pairs(qweight), inverse))


def dequantize(p: Packed) -> torch.Tensor:
    """The reference: float32 [N, K] weights."""
    n = p.qweight.shape[0]
    if p.bits == 4:
        q = _unpack_nibbles(p.qweight).float().view(n, -1, p.group)
        w = q * p.scales.float()[..., None] + p.mins.float()[..., None]
    else:
        w = p.qweight.float().view(n, -1, p.group) * p.scales.float()[..., None]
    return w.reshape(n, -1)


def quantize(w: torch.Tensor, bits: int, group: int = DEFAULT_GROUP) -> Packed:
    """Group-wise quantization of a full-precision [N, K] matrix (round to nearest, against
    the float16 scale and min that are stored)."""
    n, k = w.shape
    if group % BLOCK or k % group:
        raise ValueError(f"cannot quantize a matrix of {k} columns in groups of {group}")
    g = w.detach().float().reshape(n, k // group, group)
    if bits == 8:
        scale = (g.abs().amax(-1) / 127).half()
        q = torch.round(g / scale.float().clamp(min=1e-30)[..., None]).clamp(-127, 127)
        return Packed(8, group, q.to(torch.int8).reshape(n, k).contiguous(), scale.contiguous())
    lo, hi = g.amin(-1).half(), g.amax(-1)
    scale = ((hi - lo.float()) / 15).half()
    q = torch.round((g - lo.float()[..., None]) / scale.float().clamp(min=1e-30)[..., None])
    return Packed(4, group, _pack_nibbles(q.clamp(0, 15).reshape(n, k)), scale.contiguous(),
                  lo.contiguous())


# --- GGUF blocks ---------------------------------------------------------------------------

GGUF_PACKED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # kept packed; every other type is dequantised


def from_gguf(kind: str, data: np.ndarray, shape: tuple[int, int]) -> Packed:
    """A GGUF tensor's raw blocks ([rows, bytes per row] uint8) in our layout, bit for bit."""
    n, k = shape
    blocks = np.asarray(data, dtype=np.uint8).reshape(n, k // BLOCK, -1)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    if kind == "Q8_0":
        return Packed(8, BLOCK, t(blocks[..., 2:].copy().view(np.int8).reshape(n, k)), t(d))
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        return Packed(4, BLOCK, t(blocks[..., 4:].reshape(n, k // 2)), t(d), t(m))
    if kind == "Q4_0":
        return Packed(4, BLOCK, t(blocks[..., 2:].reshape(n, k // 2)), t(d), t(d * np.float16(-8)))
    raise ValueError(f"GGUF type {kind} is not kept packed")


# --- the module ----------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """y = x @ dequantize(W)^T (+ bias). Float32 on the CPU runs the compiled kernels, a GPU
    the Triton kernel (quant_triton.py); anything else dequantises the matrix and calls
    F.linear (the reference path)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group: int = DEFAULT_GROUP,
                 bias: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if bits not in (4, 8) or group % BLOCK or in_features % group:
            raise ValueError(f"no int{bits} layout for {in_features} columns in groups of {group}")
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        p = lambda *s, dt=torch.float16: nn.Parameter(torch.empty(*s, dtype=dt), requires_grad=False)  # noqa: E731
        ng = in_features // group
        if bits == 4:
            self.qweight = p(out_features, in_features // 2, dt=torch.uint8)
            self.mins = p(out_features, ng)
        else:
            self.qweight = p(out_features, in_features, dt=torch.int8)
            self.mins = None
        self.scales = p(out_features, ng)
        self.bias = p(out_features, dt=dtype) if bias else None
        self.dtype = dtype  # the activations'
        self.mma_order = False  # qweight's bytes in the mma order (module docstring)

    def packed(self) -> Packed:
        """The weights in the K order (the reference's)."""
        q = from_mma_order(self.qweight, self.bits) if self.mma_order else self.qweight
        return Packed(self.bits, self.group, q, self.scales, self.mins)

    @torch.no_grad()
    def use_mma_order(self) -> None:
        """Permute qweight once into the mma order where this device's Triton product takes
        it (`quant_triton.mma_order_applies`: the TMA form, fixed by the weight, the
        activations' dtype and the device): after the weights are loaded, before graphs."""
        from flover.ops.quant_triton import mma_order_applies

        if not self.mma_order and mma_order_applies(self.qweight.device, self.dtype,
                                                     self.in_features, self.group):
            self.qweight.copy_(to_mma_order(self.qweight, self.bits))
            self.mma_order = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU's kernels and the pointer form read the K order; a module left in the mma
        order (moved off its GPU) takes the reference path."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if (x.device.type == "cpu" and x.dtype == torch.float32 and not self.mma_order
                and quant_cpu.lib() is not None):
            x2 = x2.contiguous()
            if self.bits == 4:
                y = quant_cpu.int4_mm(x2, self.qweight, self.scales, self.mins, self.group)
            else:
                y = quant_cpu.int8_mm(x2, self.qweight, self.scales, self.group)
            if self.bias is not None:
                y = y + self.bias
        elif x.is_cuda:
            from flover.ops.quant_triton import quant_mm

            y = quant_mm(x2, self.qweight, self.scales, self.mins, self.bits, self.group,
                         mma_order=self.mma_order)
            if self.bias is not None:
                y = y + self.bias
        else:
            w = dequantize(self.packed()).to(x.dtype)
            y = nn.functional.linear(x2, w, self.bias)
        return y.view(*shape[:-1], self.out_features)

    def fused(self, x: torch.Tensor, residual: torch.Tensor | None = None,
              gated: bool = False) -> torch.Tensor:
        """Without bias, on a GPU (`fused` calls it there; the tests also under the interpreter):
        forward(x) with `quant_mm`'s epilogues, bitwise the unfused ops' result: residual + y,
        or (gated: the rows are gate then up) silu(gate) * up."""
        from flover.ops.quant_triton import quant_mm

        assert self.bias is None
        x2 = x.reshape(-1, self.in_features)
        r = None if residual is None else residual.reshape(-1, self.out_features)
        y = quant_mm(x2, self.qweight, self.scales, self.mins, self.bits, self.group,
                     residual=r, gated=gated, mma_order=self.mma_order)
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits}, group={self.group}")


def use_mma_order(model: nn.Module) -> None:
    """Every QuantLinear of a loaded model into the mma order where its device's product takes
    it (a no-op on GPUs without the TMA form; on the CPU nothing is asked of Triton, which a
    CPU install may not have)."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.qweight.is_cuda:
            m.use_mma_order()


def linear_targets(model: nn.Module, group: int = DEFAULT_GROUP) -> dict[str, nn.Module]:
    """Every nn.Linear and the LM head (tied or not), by qualified name, whose input width
    splits into groups of `group` (the others stay in full precision)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear | TiedHead) and m.weight.shape[1] % group == 0}


def swap_linears(model: nn.Module, plan: dict[str, tuple[int, int]], dtype: torch.dtype) -> None:
    """Replace the modules named in `plan` (name -> (bits, group)) by empty QuantLinears.
    Called on `meta`, before allocation. A tied head becomes its own quantized matrix (made
    from the embedding's tensor at load); the embedding stays in full precision for lookups."""
    for name, (bits, group) in plan.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if isinstance(old, TiedHead):
            n, k = old.weight.shape
            bias = False
        else:
            n, k, bias = old.out_features, old.in_features, old.bias is not None
        setattr(parent, attr, QuantLinear(k, n, bits, group, bias, dtype))
