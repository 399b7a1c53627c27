"""The request stream of a run: when each request arrives, its prompt, and how long it runs.

Everything is drawn from the run's seed, each part from its own stream, so changing one key
(say the arrival pattern) leaves the prompts and the lengths as they were.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from flover.config import ConfigError
from flover.run.ini import RunConfig


@dataclass(slots=True)
class WorkItem:
    request_id: str
    arrival: float  # seconds after the start of the run
    prompt_ids: list[int]
    max_tokens: int
    seed: int  # its sampling seed: the run's seed + its index


def _rng(seed: int, part: str) -> random.Random:
    return random.Random(f"{seed}/{part}")


def arrival_times(n: int, interval_ms: float, pattern: str, seed: int) -> list[float]:
    """Seconds after the start: the first request at 0, then gaps of `interval` ms
    (constant) or exponential gaps with mean `interval` ms (poisson)."""
    gap = interval_ms / 1000.0
    if pattern == "constant":
        return [i * gap for i in range(n)]
    if pattern != "poisson":
        raise ConfigError(f"arrival={pattern!r} is invalid: expected constant or poisson")
    rng, t, out = _rng(seed, "arrival"), 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(1.0 / gap) if gap > 0 else 0.0
        out.append(t)
    return out


def output_lengths(n: int, max_len: int, random_lengths: bool, seed: int) -> list[int]:
    """`max_len` each, or (memory-shuffle runs) uniform in [1, max_len]."""
    if not random_lengths:
        return [max_len] * n
    rng = _rng(seed, "length")
    return [rng.randint(1, max_len) for _ in range(n)]


def synthetic_prompts(n: int, input_len: int, prefix_len: int, vocab_size: int,
                      seed: int) -> list[list[int]]:
    """A shared prefix of `prefix_len` tokens, then `input_len` tokens of each request's own."""
    rng = _rng(seed, "prompt")
    prefix = [rng.randrange(vocab_size) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(n)]


def read_prompts_file(path: str | Path) -> list[str | list[dict]]:
    """JSONL: each line {"prompt": "raw text"} or {"messages": [{"role", "content"}, ...]}."""
    items: list[str | list[dict]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"prompts_file {path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"]:
                items.append(obj["prompt"])
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in obj["messages"]) \
                    and obj["messages"]:
                items.append(obj["messages"])
            else:
                raise ConfigError(f"{where}: expected {{\"prompt\": \"...\"}} or "
                                  "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]}")
    if not items:
        raise ConfigError(f"prompts_file {path} holds no prompts")
    return items


def encode_prompt(item: str | list[dict], tokenizer) -> list[int]:
    """Raw text is encoded as is; a conversation goes through the model's chat template."""
    if tokenizer is None:
        raise ConfigError("prompts_file needs a model with a tokenizer; presets have none "
                          "(leave prompts_file out to use synthetic prompts)")
    if isinstance(item, str):
        return tokenizer.encode(item)
    return tokenizer.encode(tokenizer.apply_chat_template(item), add_special_tokens=False)


def build_workload(cfg: RunConfig, tokenizer, vocab_size: int) -> list[WorkItem]:
    """Every request of the run, in arrival order. Prompts from the file are reused in turn
    when there are more requests than prompts."""
    n = cfg.total_requests
    times = arrival_times(n, cfg.interval, cfg.arrival, cfg.seed)
    lengths = output_lengths(n, cfg.request_output_len, cfg.random_lengths, cfg.seed)
    if cfg.prompts_file is not None:
        texts = read_prompts_file(cfg.prompts_file)
        encoded = [encode_prompt(t, tokenizer) for t in texts]
        prompts = [encoded[i % len(encoded)] for i in range(n)]
    else:
        prompts = synthetic_prompts(n, cfg.fixed_input_len, cfg.fixed_prompt_len, vocab_size,
                                    cfg.seed)
    items = [WorkItem(f"r{i}", t, p, k, cfg.seed + i)
             for i, (t, p, k) in enumerate(zip(times, prompts, lengths, strict=True))]
    for it in items:
        if len(it.prompt_ids) + it.max_tokens > cfg.max_seq_len:
            raise ConfigError(
                f"max_seq_len={cfg.max_seq_len} is invalid for this workload: request "
                f"{it.request_id} needs {len(it.prompt_ids)} prompt + {it.max_tokens} output tokens")
    return items
