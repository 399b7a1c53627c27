"""What every mode of `flover run` shares: the loaded model, the run's state, and the log
lines of a request arriving and finishing."""

from __future__ import annotations

from dataclasses import dataclass

from flover.engine import Engine, resolve_device, resolve_dtype
from flover.run.ini import RunConfig
from flover.run.timeline import Record, RunState
from flover.run.workload import WorkItem
from flover.weights import load_model


@dataclass(slots=True)
class RunContext:
    cfg: RunConfig
    model: object
    tokenizer: object | None

    @classmethod
    def load(cls, cfg: RunConfig) -> RunContext:
        device = resolve_device(cfg.device)
        model, tok = load_model(cfg.model_type, resolve_dtype(cfg.data_type, device), device,
                                cfg.seed, cfg.weight_quantization.lower())
        return cls(cfg, model, tok)

    def engine(self, slots: int) -> Engine:
        """A fresh engine (its own KV cache of `slots` slots) over the shared weights."""
        return Engine(self.cfg.engine_config(slots), model=self.model, tokenizer=self.tokenizer)


def new_state(cfg: RunConfig, items: list[WorkItem]) -> RunState:
    slots = {"fused": cfg.max_concurrency, "dynamic": cfg.max_concurrency, "serial": 1,
             "instances": len(items)}[cfg.mode]
    recs = [Record(it.request_id, it.arrival, len(it.prompt_ids), it.max_tokens) for it in items]
    return RunState(cfg.mode, recs, slots)


def mark_arrived(state: RunState, rec: Record, status: str = "waiting") -> None:
    rec.status = status
    state.log(f"{rec.request_id} arrived ({rec.prompt_len} prompt tokens, "
              f"{rec.max_tokens} to generate)")


def mark_finished(state: RunState, rec: Record, finish_time: float) -> None:
    rec.finish, rec.status = finish_time, "done"
    state.log(f"{rec.request_id} finished: {rec.tokens} tokens in {rec.latency:.2f} s")
