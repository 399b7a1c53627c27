"""The CPU fast path: linear layers through oneDNN with weights packed once.

PyTorch's default float32 linear on the CPU re-reads the weight in the layout the GEMM wants
at every call; for the small batches of decoding that costs up to 2x. oneDNN takes the weight
pre-packed (`_reorder_linear_weight`) and multiplies directly. Applied to a loaded float32
model on the CPU; the packed copy replaces the layer's weight (the tied LM head keeps its
embedding and gets a packed copy of it).
"""

from __future__ import annotations

import torch
from torch import nn

from flover.models.layers import TiedHead


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(model: nn.Module) -> int:
    """Replace every float32 CPU linear layer (and the LM head) by a PackedLinear."""
    if not available():
        return 0
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if hasattr(child, "weight") and isinstance(child.weight, torch.Tensor)
               and isinstance(child, nn.Linear | TiedHead)]
    for parent, name, child in targets:
        w = child.weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            continue
        setattr(parent, name, PackedLinear(w, getattr(child, "bias", None)))
    return len(targets)
