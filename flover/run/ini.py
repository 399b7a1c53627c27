"""The INI workload file of `flover run`: the original Flover's keys plus ours, all checked.

`load_config(path, overrides)` reads the file, applies `section.key=value` overrides, checks
every value and returns a `RunConfig`. An unknown section or key, a value out of range or a
combination we cannot run is a `ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import configparser
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from flover.config import DTYPES, QUANTIZATIONS, ConfigError, EngineConfig, SamplingParams
from flover.models.presets import PRESETS
from flover.weights import DEFAULT_MODEL

MODES = ("fused", "instances", "dynamic", "serial")
ARRIVALS = ("constant", "poisson")
BOOLS = {"0": False, "1": True, "false": False, "true": True, "no": False, "yes": True}


@dataclass(slots=True)
class RunConfig:
    # [model_specification]
    model_type: str = DEFAULT_MODEL
    data_type: str = "auto"
    device: str = "auto"
    max_concurrency: int = 32
    per_batch_size: int = 1
    max_seq_len: int = 512
    fixed_input_len: int = 8
    fixed_prompt_len: int = 0
    beam_width: int = 1
    tensor_para_size: int = 1
    pipeline_para_size: int = 1
    kv_layout: str = "slots"  # ours: the original's slots, or vLLM-style pages
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool | None = None  # None: on with pages
    weight_quantization: str = "auto"  # none | auto | int8 | int4 (EngineConfig.quantization)
    # [runtime_hyperparameter]
    top_k: int = 1
    top_p: float = 0.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    len_penalty: float = 0.0
    beam_search_diversity_rate: float = 0.0
    enable_custom_all_reduce: bool = False
    batch_invariant: bool = True  # ours: GPU kernels whose results do not depend on the batch
    async_scheduling: bool | None = None  # vLLM's: launch the next iteration before reading
    # this one's tokens; None: on with CUDA and the slot layout on one rank
    interval: float = 100.0  # ms
    arrival: str = "constant"
    use_mem_shuffle: bool = False
    mode: str = "fused"
    batch_window: float = 100.0  # ms
    seed: int = 0
    # [request]
    request_output_len: int = 64
    num_requests: int | None = None  # None: max_concurrency
    prompts_file: str | None = None
    ignore_eos: bool = True
    output_len: str = "auto"  # fixed | uniform | auto (uniform exactly when shuffling)
    # where each key came from: 'file', 'cli' or absent (default)
    given: dict[str, str] = field(default_factory=dict)

    @property
    def total_requests(self) -> int:
        return self.num_requests if self.num_requests is not None else self.max_concurrency

    @property
    def random_lengths(self) -> bool:
        """Output lengths uniform up to request_output_len: by default when shuffling (the
        original's coupling); `output_len` sets it apart from the shuffle."""
        return self.use_mem_shuffle if self.output_len == "auto" else self.output_len == "uniform"

    @property
    def rows_per_request(self) -> int:
        """KV slots one request holds: its samples (per_batch_size) or its beams."""
        return max(self.per_batch_size, self.beam_width)

    def engine_config(self, max_concurrency: int | None = None) -> EngineConfig:
        """An engine for `max_concurrency` requests in flight (each holding its rows)."""
        requests = max_concurrency or self.max_concurrency
        return EngineConfig(model=self.model_type, dtype=self.data_type, device=self.device,
                            max_concurrency=requests * self.rows_per_request,
                            max_seq_len=self.max_seq_len, use_mem_shuffle=self.use_mem_shuffle,
                            seed=self.seed, tensor_para_size=self.tensor_para_size,
                            kv_layout=self.kv_layout, block_size=self.block_size,
                            num_kv_blocks=self.num_kv_blocks,
                            gpu_memory_utilization=self.gpu_memory_utilization,
                            enable_prefix_caching=self.enable_prefix_caching,
                            batch_invariant=self.batch_invariant,
                            async_scheduling=self.async_scheduling,
                            quantization=self.weight_quantization)

    def sampling_params(self, max_tokens: int, seed: int | None = None) -> SamplingParams:
        """The original's top_p=0.0 means 'off' (1.0 here); top_k=1 means greedy."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p if self.top_p > 0 else 1.0, seed=seed, ignore_eos=self.ignore_eos,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            n=self.per_batch_size, beam_width=self.beam_width, len_penalty=self.len_penalty,
            beam_search_diversity_rate=self.beam_search_diversity_rate)


# --- the schema: section -> key -> (type, check, what is allowed) -------------------------

def _int(lo: int, hi: float = math.inf):
    return int, lambda v: lo <= v <= hi, (f"an integer >= {lo}" if hi == math.inf
                                          else f"an integer in [{lo}, {hi}]")


def _float(lo: float, hi: float = math.inf, lo_open: bool = False):
    ok = (lambda v: lo < v <= hi) if lo_open else (lambda v: lo <= v <= hi)
    if hi == math.inf:
        return float, lambda v: math.isfinite(v) and ok(v), f"a number {'>' if lo_open else '>='} {lo}"
    return float, ok, f"a number in {'(' if lo_open else '['}{lo}, {hi}]"


def _one_of(*choices: str):
    return str, lambda v: v in choices, "one of " + ", ".join(choices)


_BOOL = (bool, lambda v: True, "0 or 1")
_ANY_FLOAT = (float, math.isfinite, "a finite number")
_STR = (str, lambda v: bool(v), "a non-empty string")

SCHEMA: dict[str, dict[str, tuple[type, Callable, str]]] = {
    "model_specification": {
        "model_type": _STR,
        "data_type": (str, lambda v: v.lower() in DTYPES or v == "auto",
                      "one of fp32, fp16, bf16 (or float32, float16, bfloat16, auto)"),
        "device": _STR,
        "max_concurrency": _int(1),
        "per_batch_size": _int(1),
        "max_seq_len": _int(2),
        "fixed_input_len": _int(1),
        "fixed_prompt_len": _int(0),
        "beam_width": _int(1),
        "tensor_para_size": (int, lambda v: v == 1 or (v > 1 and os.environ.get("WORLD_SIZE") == str(v)),
                             "1, or the number of processes torchrun started (WORLD_SIZE): "
                             "launch with `torchrun --nproc-per-node K -m flover.cli run FILE.ini`"),
        "pipeline_para_size": (int, lambda v: v == 1,
                               "1 (pipeline parallelism is not supported)"),
        "kv_layout": _one_of("slots", "pages"),
        "block_size": (int, lambda v: v in (8, 16, 32, 64, 128), "one of 8, 16, 32, 64, 128"),
        "num_kv_blocks": _int(2),
        "gpu_memory_utilization": _float(0.0, 1.0, lo_open=True),
        "enable_prefix_caching": _BOOL,
        "weight_quantization": (str, lambda v: v.lower() in QUANTIZATIONS,
                                "one of " + ", ".join(QUANTIZATIONS)),
    },
    "runtime_hyperparameter": {
        "top_k": _int(0),
        "top_p": _float(0.0, 1.0),
        "temperature": _float(0.0),
        "repetition_penalty": _float(0.0, lo_open=True),
        "presence_penalty": _float(-2.0, 2.0),
        "len_penalty": _ANY_FLOAT,
        "beam_search_diversity_rate": _float(0.0),
        "data_type": (str, lambda v: v.lower() in DTYPES or v == "auto",
                      "one of fp32, fp16, bf16 (or float32, float16, bfloat16, auto)"),
        "enable_custom_all_reduce": _BOOL,
        "batch_invariant": _BOOL,
        "async_scheduling": _BOOL,
        "interval": _float(0.0),
        "arrival": _one_of(*ARRIVALS),
        "use_mem_shuffle": _BOOL,
        "mode": _one_of(*MODES),
        "batch_window": _float(0.0),
        "seed": _int(0),
    },
    "request": {
        "request_output_len": _int(1),
        "num_requests": _int(1),
        "prompts_file": _STR,
        "ignore_eos": _BOOL,
        "output_len": _one_of("auto", "fixed", "uniform"),
    },
}
_FIELDS = {f.name for f in fields(RunConfig)}
assert all(k in _FIELDS for keys in SCHEMA.values() for k in keys)


def _convert(section: str, key: str, raw: str):
    kind, ok, allowed = SCHEMA[section][key]
    name, text = f"[{section}] {key}", raw.strip()
    try:
        if kind is bool:
            value = BOOLS[text.lower()]
        elif kind is int:
            value = int(text)
        elif kind is float:
            value = float(text)
        else:
            value = text
    except (KeyError, ValueError):
        raise ConfigError(f"{name}={text!r} is invalid: expected {allowed}") from None
    if not ok(value):
        raise ConfigError(f"{name}={text!r} is invalid: expected {allowed}")
    return value


def _resolve(value: str, base: Path | None) -> str:
    """A relative path in the file is relative to the file's folder."""
    p = Path(value).expanduser()
    if base is not None and not p.is_absolute() and (base / p).exists():
        return str(base / p)
    return str(p)


def parse_override(text: str) -> tuple[str, str, str]:
    """'section.key=value' -> (section, key, value)."""
    lhs, eq, value = text.partition("=")
    section, dot, key = lhs.strip().rpartition(".")
    if not eq or not dot or not section or not key:
        raise ConfigError(f"--set {text!r} is invalid: expected section.key=value, "
                          "e.g. runtime_hyperparameter.mode=serial")
    return section.strip(), key.strip().lower(), value


def load_config(path: str | Path | None, overrides: Sequence[str] = (),
                model: str | None = None) -> RunConfig:
    """Read an INI file (or nothing: all defaults), apply --set overrides and --model."""
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    base = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            parser.read(path, encoding="utf-8")
        except configparser.Error as e:
            raise ConfigError(f"{path}: {e.message}") from None
        base = path.resolve().parent
    values: dict[tuple[str, str], tuple[str, str]] = {}  # (section, key) -> (raw value, source)
    for section in parser.sections():
        for key, raw in parser.items(section):
            values[section, key] = (raw, "file")
    for text in overrides:
        section, key, raw = parse_override(text)
        values[section, key] = (raw, "cli")
    if model is not None:
        values["model_specification", "model_type"] = (model, "cli")
    for section in parser.sections():  # a section with no keys must still be a known one
        values.setdefault((section, ""), ("", "file"))

    cfg = RunConfig()
    dtypes: dict[str, str] = {}
    for (section, key), (raw, source) in values.items():
        if section not in SCHEMA:
            raise ConfigError(f"unknown section [{section}]: expected one of "
                              + ", ".join(f"[{s}]" for s in SCHEMA))
        if not key:
            continue
        if key not in SCHEMA[section]:
            raise ConfigError(f"unknown key {key!r} in [{section}]: expected one of "
                              + ", ".join(SCHEMA[section]))
        value = _convert(section, key, raw)
        if key == "data_type":
            dtypes[section] = value
            value = "auto" if value == "auto" else DTYPES[value.lower()]
        if key in ("model_type", "prompts_file") and source == "file":
            value = _resolve(value, base)
        setattr(cfg, key, value)
        cfg.given[key] = source
    _check_data_types(dtypes)
    _check_combinations(cfg)
    return cfg


def _check_data_types(dtypes: dict[str, str]) -> None:
    canon = {s: ("auto" if v == "auto" else DTYPES[v.lower()]) for s, v in dtypes.items()}
    if len(set(canon.values())) > 1:
        a, b = dtypes["model_specification"], dtypes["runtime_hyperparameter"]
        raise ConfigError(f"[runtime_hyperparameter] data_type={b!r} is invalid: it must agree "
                          f"with [model_specification] data_type={a!r} (or be left out)")


def _check_combinations(cfg: RunConfig) -> None:
    if cfg.repetition_penalty != 1.0 and cfg.presence_penalty != 0.0:
        raise ConfigError(
            f"presence_penalty={cfg.presence_penalty} is invalid together with repetition_penalty="
            f"{cfg.repetition_penalty}: only one of the two may be set (leave repetition_penalty "
            "at 1.0 or presence_penalty at 0.0)")
    if cfg.tensor_para_size > 1 and cfg.mode == "instances":
        raise ConfigError(f"mode='instances' is invalid with tensor_para_size={cfg.tensor_para_size}: "
                          "concurrent instances would interleave the ranks' all-reduces; use "
                          "fused, dynamic or serial")
    if cfg.beam_width > 1 and cfg.per_batch_size > 1:
        raise ConfigError(f"beam_width={cfg.beam_width} is invalid with per_batch_size="
                          f"{cfg.per_batch_size}: beam search returns beam_width sequences; "
                          "set one of them to 1")
    if cfg.model_type not in PRESETS and cfg.model_type != DEFAULT_MODEL:
        p = Path(cfg.model_type)
        if not (p.is_dir() or (p.is_file() and p.suffix == ".gguf")):
            raise ConfigError(f"model_type={cfg.model_type!r} is invalid: expected a preset ("
                              f"{', '.join(PRESETS)}, {DEFAULT_MODEL}), a checkpoint directory "
                              "or a .gguf file")
    if cfg.prompts_file is not None:
        if not Path(cfg.prompts_file).is_file():
            raise ConfigError(f"prompts_file={cfg.prompts_file!r} is invalid: no such file")
        for key in ("fixed_input_len", "fixed_prompt_len"):
            if key in cfg.given:
                raise ConfigError(f"{key}={getattr(cfg, key)} is invalid with prompts_file: it "
                                  "sets the length of synthetic prompts only; remove one of the two")
    else:
        need = cfg.fixed_prompt_len + cfg.fixed_input_len + cfg.request_output_len
        if need > cfg.max_seq_len:
            raise ConfigError(
                f"request_output_len={cfg.request_output_len} is invalid: fixed_prompt_len + "
                f"fixed_input_len + request_output_len = {need} must be <= max_seq_len="
                f"{cfg.max_seq_len}")
    if cfg.request_output_len >= cfg.max_seq_len:
        raise ConfigError(f"request_output_len={cfg.request_output_len} is invalid: it must be < "
                          f"max_seq_len={cfg.max_seq_len}")
