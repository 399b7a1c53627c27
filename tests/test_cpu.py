"""The CPU fast path (oneDNN linears with packed weights) against plain PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flover.models.layers import TiedHead
from flover.ops import cpu_linear as cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("rows", [1, 8, 33])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear(rows, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias)
    x = torch.randn(rows, 48)
    torch.testing.assert_close(cpu.PackedLinear(lin.weight, lin.bias)(x), lin(x),
                               rtol=1e-5, atol=1e-5)


def test_pack_linears_replaces_every_linear_and_the_tied_head():
    emb = nn.Embedding(50, 16)
    model = nn.Module()
    model.embed, model.proj, model.head = emb, nn.Linear(16, 16), TiedHead(emb)
    x = torch.randn(3, 16)
    expected = model.head(model.proj(x))
    assert cpu.pack_linears(model) == 2
    assert isinstance(model.proj, cpu.PackedLinear) and isinstance(model.head, cpu.PackedLinear)
    assert model.embed.weight.shape == (50, 16)  # the embedding keeps its own weight
    torch.testing.assert_close(model.head(model.proj(x)), expected, rtol=1e-5, atol=1e-5)
