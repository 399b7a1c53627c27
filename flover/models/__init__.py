"""Model families written for fused batches."""

from __future__ import annotations

from torch import nn

from flover.models.config import ModelConfig, ModelFormatError
from flover.models.gptj import GPTJForCausalLM
from flover.models.llama import LlamaForCausalLM

FAMILIES: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM, "gptj": GPTJForCausalLM}


def build_model(cfg: ModelConfig) -> nn.Module:
    """An uninitialised model of this shape, created on the current default device and dtype."""
    if cfg.arch not in FAMILIES:
        raise ModelFormatError(f"architecture {cfg.arch!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[cfg.arch](cfg)


__all__ = ["ModelConfig", "ModelFormatError", "build_model"]
