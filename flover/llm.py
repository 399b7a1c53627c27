"""LLM: offline generation over the engine; every prompt of a call is fused into one batch."""

from __future__ import annotations

from collections.abc import Sequence

from flover.config import EngineConfig, SamplingParams
from flover.engine import Engine, RequestError, RequestOutput


class LLM:
    """Offline generation: every prompt of a call is fused into one in-flight batch."""

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 max_concurrency: int = 32, max_seq_len: int = 1024, **kwargs) -> None:
        self.engine = Engine(EngineConfig(model=model, dtype=dtype, device=device,
                                          max_concurrency=max_concurrency,
                                          max_seq_len=max_seq_len, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids: list[str] = []
        try:
            for p in prompts:
                self._counter += 1
                self.engine.add_request(f"llm-{self._counter}", p, params)
                ids.append(f"llm-{self._counter}")
        except Exception:
            for rid in ids:  # one refused prompt refuses the call: nothing of it stays queued
                self.engine.abort(rid)
            raise
        final: dict[str, RequestOutput] = {}
        for out in self.engine.run_until_done():
            if out.finished:
                final[out.request_id] = out
        return [final[i] for i in ids]

    def chat(self, conversations: list[list[dict]],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer, so no chat template")
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c),
                                         add_special_tokens=False) for c in conversations]
        return self.generate(prompts, params)
