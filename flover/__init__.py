"""Flover: temporal fusion inference for GPT-J and LLaMA-family models."""

from flover.config import ConfigError, EngineConfig, SamplingParams
from flover.engine import Engine, RequestError, RequestOutput
from flover.llm import LLM

__all__ = ["LLM", "ConfigError", "Engine", "EngineConfig", "RequestError", "RequestOutput",
           "SamplingParams"]
__version__ = "0.1.0"
