"""Building blocks shared by the model families: norms, rotary embedding, weight loading."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flover.models.config import ModelFormatError


class RMSNorm(nn.Module):
    """The norm's parameters; `flover.ops.fused.rms_norm` computes it (fused with the residual)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class Rotary(nn.Module):
    """Rotary position embedding over the first `rot_dim` channels of each head.

    `interleaved=False` rotates channel i with i + rot_dim/2 (LLaMA's rotate_half);
    `interleaved=True` rotates channel 2i with 2i+1 (GPT-J's rotate_every_two).
    """

    def __init__(self, rot_dim: int, max_position: int, theta: float, interleaved: bool) -> None:
        super().__init__()
        self.rot_dim, self.interleaved = rot_dim, interleaved
        self.max_position, self.theta = max_position, theta
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        if self.cos.device.type != "meta":  # on meta, allocate() calls reset_buffers later
            self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the tables on the module's device; models are built on `meta` first."""
        device = self.cos.device
        r = self.rot_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
        freqs = torch.outer(torch.arange(self.max_position, dtype=torch.float32), inv_freq)
        self.cos, self.sin = freqs.cos().to(device), freqs.sin().to(device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim]; rotated in float32 as the reference does, cast back."""
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        rot, rest = x[..., : self.rot_dim].float(), x[..., self.rot_dim:]
        if self.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        out = out.to(x.dtype)
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


class TiedHead(nn.Module):
    """The LM head of a model whose output matrix is its input embedding (not registered
    twice: the embedding stays the owner of the weight)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._embedding = (embedding,)

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       stacked: dict[str, tuple[str, int]],
                       shard_sizes: dict[str, list[int]]) -> None:
    """Copy checkpoint tensors into the model one by one (peak memory: one tensor).

    `stacked` maps a checkpoint name fragment to (fused parameter fragment, shard index);
    `shard_sizes[fused]` gives each shard's row count. Every parameter must be filled.
    """
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for name, tensor in weights:
        target, rows = name, None
        for frag, (fused, idx) in stacked.items():
            if f".{frag}." in name:
                target = name.replace(f".{frag}.", f".{fused}.")
                sizes = shard_sizes[fused]
                start = sum(sizes[:idx])
                rows = (start, start + sizes[idx])
                break
        if target not in params:
            if name.endswith("rotary_emb.inv_freq") or ".attn.bias" in name or "masked_bias" in name:
                continue  # buffers some checkpoints carry; we compute our own
            raise ModelFormatError(f"unexpected tensor {name!r} in checkpoint")
        dst = params[target].data if rows is None else params[target].data[rows[0]:rows[1]]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ModelFormatError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                   f"expected {tuple(dst.shape)}")
        dst.copy_(tensor)
        filled.add(target if rows is None else f"{target}[{rows[0]}]")
    expected = set()
    for pname in params:
        fused = next((f for f in shard_sizes if f".{f}." in pname), None)
        if fused is None:
            expected.add(pname)
        else:
            sizes = shard_sizes[fused]
            expected.update(f"{pname}[{sum(sizes[:i])}]" for i in range(len(sizes)))
    missing = sorted(expected - filled)
    if missing:
        raise ModelFormatError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")


@torch.no_grad()
def init_random(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill every parameter in place on its own device: fast even for 65B on a GPU."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_f.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)
