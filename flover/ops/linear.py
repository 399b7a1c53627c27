"""Batch-invariant linear layers on the GPU: a row's output does not depend on the other rows.

cuBLAS chooses its kernel, tiling and split-K from the batch size, so a request's logits
change in their last bits when others join its batch. `invariant_linear` runs the Triton
product of `flover.ops.linear_triton` (one configuration for every batch size) on CUDA
tensors and F.linear elsewhere; `linear_ref` is what the tests hold the kernel to.
`swap_linears` puts `InvariantLinear` and `InvariantTiedHead` in place of a loaded model's
`nn.Linear` and `TiedHead` modules; modules of other types (quantized linears, the
tensor-parallel wrappers) are left as they are. It then folds each RMSNorm's weight into the
invariant product that reads the norm (`fold_norms`), where the product can take the norm as
its epilogue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flover.models.layers import TiedHead
from flover.ops import fused

try:  # the kernel imports triton; CPU-only installs go without it
    from flover.ops import linear_triton as _k
except Exception:  # noqa: BLE001 - any import failure means: use the reference
    _k = None


def linear_ref(x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference the kernel is held to: float32 products and sums, cast back."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def available(t: torch.Tensor) -> bool:
    return _k is not None and t.is_cuda


def invariant_linear(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel for CUDA tensors it takes; F.linear for everything else."""
    if available(x) and weight.stride(-1) == 1 and x.dtype == weight.dtype:
        return _k.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class InvariantLinear(nn.Linear):
    """An nn.Linear (same parameters, same names) whose product is batch-invariant on a GPU."""

    def __init__(self, source: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight, self.bias = source.weight, source.bias
        self.folded_norm = False  # the weight carries the norm before it (`fold_norms`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias)


class InvariantTiedHead(TiedHead):
    """The tied LM head (still reading its embedding's weight), batch-invariant on a GPU."""

    def __init__(self, source: TiedHead) -> None:
        nn.Module.__init__(self)
        self._embedding = source._embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight)


def _plain_linear(source: InvariantLinear) -> nn.Linear:
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = source.in_features, source.out_features
    lin.weight, lin.bias = source.weight, source.bias
    return lin


def swap_linears(model: nn.Module, only_cuda: bool = True, invariant: bool = True) -> int:
    """Replace every CUDA `nn.Linear` and `TiedHead` of `model` (exactly those types) by its
    invariant twin; returns how many. Idempotent; modules of any other type are not touched.
    `only_cuda=False` swaps CPU modules too (they compute as before: the tests use it).
    `invariant=False` swaps the twins back (an engine without invariance given a model that an
    invariant engine swapped before)."""
    if invariant:
        swaps = {nn.Linear: InvariantLinear, TiedHead: InvariantTiedHead}
    else:
        swaps = {InvariantLinear: _plain_linear,
                 InvariantTiedHead: lambda head: TiedHead(head._embedding[0])}
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if type(child) in swaps and (child.weight.is_cuda or not only_cuda)]
    for parent, name, child in targets:
        setattr(parent, name, swaps[type(child)](child))
    if invariant:
        fold_norms(model)
    return len(targets)


@torch.no_grad()
def fold_norms(model: nn.Module, force: bool = False) -> int:
    """Fold each RMSNorm's weight g into the product that reads the norm's output
    (`model.norm_products()`, where the model has it): W <- W diag(g) rounded to W's dtype,
    g <- 1. The model computes the same function (the norm's rounding moves: see
    `flover.ops.fused.norm_linear`), and that product can scale its rows by 1 / rms in its
    epilogue: the norm's kernel, its pass over the stream and, for gate_up, SiLU's kernel are
    gone. Only with `fused.FOLDED` and where the product is an `InvariantLinear` whose TMA
    form takes the fused epilogue (`linear_triton.fusable`; `force`: whatever the device and
    the switch, for the tests), so the
    CPU, cuBLAS, quantized and tensor-parallel models are never changed. Idempotent: a norm
    already folded has a unit weight. A model swapped back (`swap_linears(invariant=False)`,
    an engine reusing it without invariance) keeps its folded weights: the same function,
    rounded at other points than a freshly loaded model. Returns how many products were folded."""
    folded = 0
    if not (fused.FOLDED or force):
        return 0
    for norm, product in getattr(model, "norm_products", list)():
        if not (isinstance(product, InvariantLinear) and (force or (
                _k is not None and _k.fusable(product.weight)))):
            continue
        if not product.folded_norm:
            g = norm.weight.float()
            for rows in product.weight.split(4096):  # one float32 copy of 4096 rows at a time
                rows.copy_(rows.float() * g)
            norm.weight.fill_(1.0)
            product.folded_norm = True
            folded += 1
    return folded
