"""Weight-only int4 / int8 linear layers: formats, PyTorch references, the swapped-in module.

One layout for both sources, llama.cpp's blocks of 32 weights along K, so that a GGUF file's
tensors are taken as they are (no requantisation, no loss):

    int4: qweight uint8 [N, K/2]: per block of 32, byte j = weight j (low nibble) | weight j+16
          (high nibble), q in [0, 15]; scales, mins [N, K/group]: w = q * scale + min in float32
          (Q4_1: scale d, min m; Q4_0: w = d * (q - 8), so scale d, min -8d, exact)
    int8: qweight int8 [N, K]; scales [N, K/group] (and, where `Layout.mins`, mins): w = q *
          scale (+ min) (Q8_0 as is; Q5_0: q - 16 and d; Q5_1: q, d and m)

Scales and mins are float16, or float32 (`Layout.wide`) for the K-quants, whose scale d * sc
(a float16 times a 6-bit sub-block scale) float16 cannot hold: Q4_K -> int4 (d * sc, -dmin *
m), Q5_K -> int8 with mins, Q6_K -> int8 in groups of 16 (d * sc, q - 32). Every product
is exact in float32, and w is then computed with the same roundings as llama.cpp's
dequantisation (`GGUF_LAYOUTS`; tests/test_quant_gguf.py holds each equal to gguf's own).
A linear whose pieces differ (q, k, v; gate, up) takes the smallest layout that holds each
of them exactly (`Layout.join`: an int4 piece becomes int8 values, groups split, scales
widened). `group` is 16 << k for int8, 32 << k for int4; the GPU kernels take float16
scales in groups of 32 << k (no int8 mins); other layouts take the reference path there.

On a GPU whose products take the TMA form (`quant_triton.mma_order_applies`), each row's bytes
are permuted once at load into the "mma order" (`to_mma_order`; same shape, dtype and bytes,
`QuantLinear.mma_order`): every 16 bytes hold what one thread of the tensor cores' MMA needs,
so the kernel reads them with 16-byte loads instead of 2-byte ones. Per row, in spans of 64
weights (int8) or 128 (int4), 32-bit word 4t + j (t = 0..3, a thread's column in the MMA's
fragment) holds

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

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flover.models.layers import TiedHead
from flover.ops import quant_cpu

QUANTIZATIONS = ("int8", "int4")
BLOCK = 32
DEFAULT_GROUP = 32


@dataclass(frozen=True)
class Layout:
    """How a QuantLinear holds its weights (module docstring): int4 or int8 values in groups
    of `group` along K, a scale per group and, for int4 always, for int8 where `mins`, a min;
    float32 scales and mins where `wide`, else float16."""

    bits: int
    group: int = DEFAULT_GROUP
    wide: bool = False
    mins: bool = False

    def __post_init__(self) -> None:
        if self.bits == 4:
            object.__setattr__(self, "mins", True)
        if self.bits not in (4, 8) or self.group % (BLOCK if self.bits == 4 else 16):
            raise ValueError(f"no int{self.bits} layout in groups of {self.group}")

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.wide else torch.float16

    def holds(self, other: Layout) -> bool:
        """Whether every weight in `other` has an exact form in this layout (`Packed.to`)."""
        return (other.bits <= self.bits and other.group % self.group == 0
                and self.wide >= other.wide and self.mins >= other.mins)

    def join(self, other: Layout) -> Layout:
        """The smallest layout that holds both."""
        return Layout(max(self.bits, other.bits), math.gcd(self.group, other.group),
                      self.wide or other.wide, self.mins or other.mins)

    def gpu_kernel(self) -> bool:
        """Whether the GPU's Triton products take this layout (else the reference path)."""
        return self.group % BLOCK == 0 and not self.wide and (self.bits == 4 or not self.mins)


def layout_of(p: Packed | QuantLinear) -> Layout:
    """The layout a matrix's tensors hold: float32 scales are wide, mins say themselves."""
    return Layout(p.bits, p.group, p.scales.dtype == torch.float32, p.mins is not None)


@dataclass
class Packed:
    """One weight matrix in the layout above (rows = output features)."""

    bits: int
    group: int
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    @property
    def layout(self) -> Layout:
        return layout_of(self)

    def tensors(self, prefix: str) -> list[tuple[str, torch.Tensor]]:
        out = [(prefix + "qweight", self.qweight), (prefix + "scales", self.scales)]
        return out if self.mins is None else [*out, (prefix + "mins", self.mins)]

    def to(self, layout: Layout) -> Packed:
        """The same weights, bit for bit, in a layout that holds this one's: int4 values as
        int8, each group's scale (and min) repeated over the smaller groups, float16 widened
        to float32, zero mins where the layout has them and this one not."""
        if not layout.holds(self.layout):
            raise ValueError(f"{layout} cannot hold {self.layout} exactly")
        q, scales, mins = self.qweight, self.scales, self.mins
        if layout.bits == 8 and self.bits == 4:
            q = _unpack_nibbles(q).to(torch.int8)
        split = self.group // layout.group
        if split > 1:
            scales = scales.repeat_interleave(split, dim=1)
            mins = None if mins is None else mins.repeat_interleave(split, dim=1)
        scales = scales.to(layout.scale_dtype).contiguous()
        if layout.mins:
            mins = torch.zeros_like(scales) if mins is None else mins.to(layout.scale_dtype).contiguous()
        return Packed(layout.bits, layout.group, q.contiguous(), scales, mins)

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
        if p.mins is not None:
            w = w + p.mins.float()[..., None]
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

# The layout each GGUF type is kept in, exactly; every other type is dequantised
GGUF_LAYOUTS = {
    "Q4_0": Layout(4), "Q4_1": Layout(4), "Q8_0": Layout(8), "Q5_0": Layout(8),
    "Q5_1": Layout(8, mins=True), "Q4_K": Layout(4, wide=True),
    "Q5_K": Layout(8, wide=True, mins=True), "Q6_K": Layout(8, 16, wide=True),
}


def from_gguf(kind: str, data: np.ndarray, shape: tuple[int, int]) -> Packed:
    """A GGUF tensor's raw blocks ([rows, bytes per row] uint8) in GGUF_LAYOUTS[kind], bit
    for bit (the block formats are ggml-quants.c's)."""
    n, k = shape
    if kind not in GGUF_LAYOUTS:
        raise ValueError(f"GGUF type {kind} is not kept packed")
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    per, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]  # weights and bytes a block
    data = np.asarray(data, dtype=np.uint8)
    if k % per or data.size != n * (k // per) * size:
        raise ValueError(f"a {kind} tensor of {n} x {k} weights needs {n * k // per} blocks of "
                         f"{per} ({size} bytes each), not {data.size} bytes")
    blocks = data.reshape(n, k // per, size)
    f16 = lambda a: a.copy().view(np.float16)[..., 0]  # noqa: E731  (2 bytes -> a float16)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    if kind in ("Q8_0", "Q4_0", "Q4_1"):
        d = f16(blocks[..., :2])
        if kind == "Q8_0":
            return Packed(8, BLOCK, t(blocks[..., 2:].copy().view(np.int8).reshape(n, k)), t(d))
        if kind == "Q4_1":
            return Packed(4, BLOCK, t(blocks[..., 4:].reshape(n, k // 2)), t(d),
                          t(f16(blocks[..., 2:4])))
        return Packed(4, BLOCK, t(blocks[..., 2:].reshape(n, k // 2)), t(d), t(d * np.float16(-8)))
    if kind in ("Q5_0", "Q5_1"):  # d, (m), 32 high bits (bit j: weight j), 16 bytes of nibbles
        d, at = f16(blocks[..., :2]), (4 if kind == "Q5_1" else 2)
        high = blocks[..., at:at + 4].copy().view(np.uint32)  # little-endian, as ggml writes it
        high = (high >> np.arange(32, dtype=np.uint32)) & 1
        q = (_nibbles(blocks[..., at + 4:]) | (high.astype(np.uint8) << 4)).astype(np.int8)
        if kind == "Q5_0":
            return Packed(8, BLOCK, t((q - 16).reshape(n, k)), t(d))
        return Packed(8, BLOCK, t(q.reshape(n, k)), t(d), t(f16(blocks[..., 2:4])))
    if kind == "Q6_K":  # ql[128], qh[64], 16 int8 scales, d; halves of 128 weights
        d = f16(blocks[..., 208:210]).astype(np.float32)
        ql = blocks[..., :128].reshape(n, -1, 2, 64)
        qh = blocks[..., 128:192].reshape(n, -1, 2, 32)
        low = np.concatenate((ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4,
                              ql[..., 32:] >> 4), axis=-1)
        high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
        q = (low | (high << 4)).astype(np.int8) - 32
        scales = d[..., None] * blocks[..., 192:208].copy().view(np.int8).astype(np.float32)
        return Packed(8, 16, t(q.reshape(n, k)), t(scales.reshape(n, -1)))
    # Q4_K, Q5_K: d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, (Q5_K:
    # 32 bytes of high bits, bit j of byte l: sub-block j's weight l), then 4 chunks of 32
    # bytes whose low nibbles are sub-block 2c and high nibbles sub-block 2c + 1
    d, dmin = f16(blocks[..., :2]).astype(np.float32), f16(blocks[..., 2:4]).astype(np.float32)
    sm = blocks[..., 4:16]
    a, b, c = sm[..., 0:4], sm[..., 4:8], sm[..., 8:12]
    sc = np.concatenate((a & 63, (c & 15) | ((a >> 6) << 4)), axis=-1).astype(np.float32)
    mn = np.concatenate((b & 63, (c >> 4) | ((b >> 6) << 4)), axis=-1).astype(np.float32)
    scales, mins = d[..., None] * sc, -(dmin[..., None] * mn)  # exact: 11 bits times 6
    qs = blocks[..., 16:144] if kind == "Q4_K" else blocks[..., 48:176]
    qs = qs.reshape(n, -1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
    q = (qs & 15).reshape(n, -1, 8, 32)
    if kind == "Q4_K":
        return Packed(4, BLOCK, _pack_nibbles(t(q.reshape(n, k))), t(scales.reshape(n, -1)),
                      t(mins.reshape(n, -1)))
    high = (blocks[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    q = (q | (high << 4)).astype(np.int8)
    return Packed(8, BLOCK, t(q.reshape(n, k)), t(scales.reshape(n, -1)), t(mins.reshape(n, -1)))


def _nibbles(b: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: the low nibbles, then the high ones."""
    return np.concatenate((b & 15, b >> 4), axis=-1)


# --- the module ----------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """y = x @ dequantize(W)^T (+ bias). Float32 on the CPU runs the compiled kernels, a GPU
    the Triton kernel (quant_triton.py); anything else dequantises the matrix and calls
    F.linear (the reference path)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group: int = DEFAULT_GROUP,
                 bias: bool = False, dtype: torch.dtype | None = None, wide: bool = False,
                 mins: bool = False) -> None:
        super().__init__()
        layout = Layout(bits, group, wide, mins)  # checks bits and group
        if in_features % max(group, BLOCK):
            raise ValueError(f"no int{bits} layout for {in_features} columns in groups of {group}")
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        p = lambda *s, dt=layout.scale_dtype: nn.Parameter(torch.empty(*s, dtype=dt), requires_grad=False)  # noqa: E731
        ng = in_features // group
        if bits == 4:
            self.qweight = p(out_features, in_features // 2, dt=torch.uint8)
        else:
            self.qweight = p(out_features, in_features, dt=torch.int8)
        self.scales = p(out_features, ng)
        self.mins = p(out_features, ng) if layout.mins else None
        self.bias = p(out_features, dt=dtype) if bias else None
        self.dtype = dtype  # the activations'
        self.mma_order = False  # qweight's bytes in the mma order (module docstring)

    @property
    def layout(self) -> Layout:
        """The layout its tensors hold (kept: a GPU step asks for it at every product)."""
        key = (self.scales.dtype, self.mins is None)
        kept = self.__dict__.get("_layout")
        if kept is None or kept[0] != key:
            kept = key, layout_of(self)
            self.__dict__["_layout"] = kept
        return kept[1]

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

        if not self.mma_order and self.layout.gpu_kernel() and mma_order_applies(
                self.qweight.device, self.dtype, self.in_features, self.group):
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
                y = quant_cpu.int8_mm(x2, self.qweight, self.scales, self.group, self.mins)
            if self.bias is not None:
                y = y + self.bias
        elif x.is_cuda and self.layout.gpu_kernel():
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
        lay = self.layout
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits}, group={self.group}" + (", float32 scales" if lay.wide else "")
                + (", mins" if lay.mins and self.bits == 8 else ""))


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


def swap_linears(model: nn.Module, plan: dict[str, Layout], dtype: torch.dtype) -> None:
    """Replace the modules named in `plan` (name -> Layout) by empty QuantLinears.
    Called on `meta`, before allocation. A tied head becomes its own quantized matrix (made
    from the embedding's tensor at load); the embedding stays in full precision for lookups."""
    for name, lay in plan.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if isinstance(old, TiedHead):
            n, k = old.weight.shape
            bias = False
        else:
            n, k, bias = old.out_features, old.in_features, old.bias is not None
        setattr(parent, attr, QuantLinear(k, n, lay.bits, lay.group, bias, dtype, lay.wide, lay.mins))
