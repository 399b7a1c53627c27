"""The engine core: requests in, one fused iteration per `step()`, outputs out."""

from flover.engine.engine import Engine, RequestError, resolve_device, resolve_dtype
from flover.engine.outputs import CompletionOutput, RequestOutput

__all__ = ["CompletionOutput", "Engine", "RequestError", "RequestOutput", "resolve_device",
           "resolve_dtype"]
