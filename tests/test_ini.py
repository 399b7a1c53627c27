"""The INI loader of `flover run`: every key does what it says; every bad value is refused
with a message naming the key, the value and what is allowed."""

from __future__ import annotations

import json
import textwrap

import pytest

from flover.config import ConfigError
from flover.run.ini import load_config
from flover.run.workload import build_workload

ORIGINAL = """\
[model_specification]
model_type=llama_13b                 ; gptj_6b, llama_13b, llama_33b
data_type=fp16                       ; fp32, bf16
max_concurrency=32                   ; maximum requests for fusion before OOM.
per_batch_size=1                     ; number of samples in each request
max_seq_len=512                      ; maximum generation length of each request
fixed_input_len=8
fixed_prompt_len=0
beam_width=1
tensor_para_size=1
pipeline_para_size=1                 ; we do not support pipeline parallelism

[runtime_hyperparameter]
top_k=1                              ; k value for top k sampling
top_p=0.0                            ; p value for top p sampling
temperature=1.0                      ; Use for sampling
repetition_penalty=1.0               ; Use for sampling
presence_penalty=0.0                 ; Only one of repetition_penalty and presence_penalty are allowed.
len_penalty=0.0
beam_search_diversity_rate=0.0
data_type=fp16
enable_custom_all_reduce=0
interval=1000                        ; Interval between requests.
use_mem_shuffle=1                    ; Use memory shuffle(reordering)

[request]
request_output_len=504               ; If use_mem_shuffle=1, this represents the upper bound
"""


def cfg_of(*overrides: str, text: str | None = None, tmp_path=None):
    path = None
    if text is not None:
        path = tmp_path / "run.ini"
        path.write_text(textwrap.dedent(text))
    return load_config(path, ["model_specification.model_type=tiny_llama", *overrides])


def test_original_readme_config_loads_with_inline_comments(tmp_path):
    path = tmp_path / "orig.ini"
    path.write_text(ORIGINAL)
    cfg = load_config(path)
    assert (cfg.model_type, cfg.data_type, cfg.max_concurrency, cfg.interval,
            cfg.use_mem_shuffle, cfg.request_output_len) == ("llama_13b", "float16", 32, 1000.0,
                                                              True, 504)


def test_original_top_p_zero_means_off_and_top_k_one_means_greedy(tmp_path):
    path = tmp_path / "orig.ini"
    path.write_text(ORIGINAL)
    sp = load_config(path).sampling_params(8)
    assert (sp.top_p, sp.top_k, sp.greedy) == (1.0, 1, True)


def test_num_requests_defaults_to_max_concurrency():
    assert cfg_of("model_specification.max_concurrency=3").total_requests == 3


def test_num_requests_may_exceed_max_concurrency():
    cfg = cfg_of("model_specification.max_concurrency=2", "request.num_requests=7")
    assert (cfg.total_requests, cfg.engine_config().max_concurrency) == (7, 2)


def test_file_values_are_overridden_by_set_and_model(tmp_path):
    cfg = cfg_of("runtime_hyperparameter.interval=5", text="""
        [runtime_hyperparameter]
        interval=900
        """, tmp_path=tmp_path)
    assert (cfg.interval, cfg.model_type) == (5.0, "tiny_llama")


def _engine(key):
    return lambda cfg: getattr(cfg.engine_config(), key)


def _sampling(key):
    return lambda cfg: getattr(cfg.sampling_params(4, seed=9), key)


def _prompts(cfg):
    return [it.prompt_ids for it in build_workload(cfg, None, 256)]


EFFECTS = [  # (key=value, what it changes, expected)
    ("model_specification.model_type=tiny_gptj", _engine("model"), "tiny_gptj"),
    ("model_specification.data_type=bf16", _engine("dtype"), "bfloat16"),
    ("runtime_hyperparameter.data_type=fp16", _engine("dtype"), "float16"),
    ("model_specification.device=cpu", _engine("device"), "cpu"),
    ("model_specification.max_concurrency=3", _engine("max_concurrency"), 3),
    ("model_specification.per_batch_size=2", _sampling("n"), 2),
    ("model_specification.max_seq_len=300", _engine("max_seq_len"), 300),
    ("model_specification.fixed_input_len=5", lambda c: {len(p) for p in _prompts(c)}, {5}),
    ("model_specification.fixed_prompt_len=3",
     lambda c: ({len(p) for p in _prompts(c)}, len({tuple(p[:3]) for p in _prompts(c)})),
     ({11}, 1)),
    ("model_specification.beam_width=3", _sampling("beam_width"), 3),
    ("model_specification.tensor_para_size=1", _engine("tensor_para_size"), 1),
    ("model_specification.pipeline_para_size=1", lambda c: c.pipeline_para_size, 1),
    ("model_specification.kv_layout=pages",
     lambda c: (c.engine_config().kv_layout, c.engine_config().enable_prefix_caching),
     ("pages", True)),
    ("model_specification.block_size=32", _engine("block_size"), 32),
    ("model_specification.num_kv_blocks=100", _engine("num_kv_blocks"), 100),
    ("model_specification.gpu_memory_utilization=0.5", _engine("gpu_memory_utilization"), 0.5),
    ("model_specification.enable_prefix_caching=0",
     lambda c: c.engine_config().enable_prefix_caching, False),
    ("runtime_hyperparameter.top_k=5", _sampling("top_k"), 5),
    ("runtime_hyperparameter.top_p=0.5", _sampling("top_p"), 0.5),
    ("runtime_hyperparameter.temperature=0.3", _sampling("temperature"), 0.3),
    ("runtime_hyperparameter.repetition_penalty=1.2", _sampling("repetition_penalty"), 1.2),
    ("runtime_hyperparameter.presence_penalty=0.5", _sampling("presence_penalty"), 0.5),
    ("runtime_hyperparameter.len_penalty=0.7", _sampling("len_penalty"), 0.7),
    ("runtime_hyperparameter.beam_search_diversity_rate=0.5",
     _sampling("beam_search_diversity_rate"), 0.5),
    ("runtime_hyperparameter.enable_custom_all_reduce=1", lambda c: c.enable_custom_all_reduce,
     True),
    ("runtime_hyperparameter.batch_invariant=0", _engine("batch_invariant"), False),
    ("runtime_hyperparameter.interval=250",
     lambda c: [it.arrival for it in build_workload(c, None, 256)][:3], [0.0, 0.25, 0.5]),
    ("runtime_hyperparameter.arrival=poisson",
     lambda c: len({round(b.arrival - a.arrival, 9) for a, b in
                    zip(build_workload(c, None, 256), build_workload(c, None, 256)[1:], strict=False)}) > 1,
     True),
    ("runtime_hyperparameter.use_mem_shuffle=1",
     lambda c: (c.engine_config().use_mem_shuffle,
                len({it.max_tokens for it in build_workload(c, None, 256)}) > 1), (True, True)),
    ("runtime_hyperparameter.mode=dynamic", lambda c: c.mode, "dynamic"),
    ("runtime_hyperparameter.batch_window=50", lambda c: c.batch_window, 50.0),
    ("runtime_hyperparameter.seed=7",
     lambda c: (c.engine_config().seed, build_workload(c, None, 256)[2].seed), (7, 9)),
    ("request.request_output_len=10",
     lambda c: {it.max_tokens for it in build_workload(c, None, 256)}, {10}),
    ("request.num_requests=5", lambda c: len(build_workload(c, None, 256)), 5),
    ("request.ignore_eos=0", _sampling("ignore_eos"), False),
    ("request.output_len=uniform",
     lambda c: (c.engine_config().use_mem_shuffle,
                len({it.max_tokens for it in build_workload(c, None, 256)}) > 1), (False, True)),
]


@pytest.mark.parametrize("setting,effect,expected", EFFECTS, ids=[e[0] for e in EFFECTS])
def test_each_key_changes_what_it_should(setting, effect, expected):
    assert effect(cfg_of("model_specification.max_concurrency=6", setting)) == expected


def test_fixed_output_lengths_can_run_with_the_shuffle_on():
    c = cfg_of("runtime_hyperparameter.use_mem_shuffle=1", "request.output_len=fixed")
    assert c.engine_config().use_mem_shuffle
    assert {it.max_tokens for it in build_workload(c, None, 256)} == {c.request_output_len}


def test_prompts_file_supplies_the_prompts(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    cfg = cfg_of(text="""
        [request]
        prompts_file=p.jsonl    ; relative to the INI file
        """, tmp_path=tmp_path)

    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    assert [it.prompt_ids for it in build_workload(cfg, Tok(), 256)][:2] == [[104, 105]] * 2


BAD = [  # (key=value, words the message must hold)
    ("model_specification.max_concurrency=0", ["max_concurrency", "'0'", "integer >= 1"]),
    ("model_specification.max_seq_len=1", ["max_seq_len", "'1'", "integer >= 2"]),
    ("model_specification.per_batch_size=x", ["per_batch_size", "'x'", "integer >= 1"]),
    ("model_specification.fixed_input_len=0", ["fixed_input_len", "'0'", "integer >= 1"]),
    ("model_specification.fixed_prompt_len=-1", ["fixed_prompt_len", "'-1'", "integer >= 0"]),
    ("model_specification.beam_width=0", ["beam_width", "'0'", "integer >= 1"]),
    ("model_specification.data_type=int8", ["data_type", "'int8'", "fp32, fp16, bf16"]),
    ("model_specification.pipeline_para_size=2",
     ["pipeline_para_size", "'2'", "pipeline parallelism is not supported"]),
    ("model_specification.tensor_para_size=2",
     ["tensor_para_size", "'2'", "WORLD_SIZE", "torchrun --nproc-per-node"]),
    ("model_specification.model_type=no_such_model",
     ["model_type", "'no_such_model'", "preset", ".gguf"]),
    ("model_specification.kv_layout=paged", ["kv_layout", "'paged'", "slots, pages"]),
    ("model_specification.block_size=12", ["block_size", "'12'", "8, 16, 32"]),
    ("model_specification.num_kv_blocks=1", ["num_kv_blocks", "'1'", "integer >= 2"]),
    ("model_specification.gpu_memory_utilization=0", ["gpu_memory_utilization", "'0'", "(0.0, 1.0]"]),
    ("runtime_hyperparameter.top_k=-1", ["top_k", "'-1'", "integer >= 0"]),
    ("runtime_hyperparameter.top_p=1.5", ["top_p", "'1.5'", "[0.0, 1.0]"]),
    ("runtime_hyperparameter.temperature=-1", ["temperature", "'-1'", ">= 0"]),
    ("runtime_hyperparameter.repetition_penalty=0", ["repetition_penalty", "'0'", "> 0"]),
    ("runtime_hyperparameter.presence_penalty=3", ["presence_penalty", "'3'", "[-2.0, 2.0]"]),
    ("runtime_hyperparameter.len_penalty=nan", ["len_penalty", "'nan'", "finite"]),
    ("runtime_hyperparameter.beam_search_diversity_rate=-0.1",
     ["beam_search_diversity_rate", "'-0.1'", ">= 0"]),
    ("runtime_hyperparameter.enable_custom_all_reduce=2",
     ["enable_custom_all_reduce", "'2'", "0 or 1"]),
    ("runtime_hyperparameter.interval=-5", ["interval", "'-5'", ">= 0"]),
    ("runtime_hyperparameter.arrival=burst", ["arrival", "'burst'", "constant, poisson"]),
    ("runtime_hyperparameter.use_mem_shuffle=maybe", ["use_mem_shuffle", "'maybe'", "0 or 1"]),
    ("runtime_hyperparameter.mode=batch",
     ["mode", "'batch'", "fused, instances, dynamic, serial"]),
    ("runtime_hyperparameter.batch_window=-1", ["batch_window", "'-1'", ">= 0"]),
    ("runtime_hyperparameter.seed=-3", ["seed", "'-3'", "integer >= 0"]),
    ("request.request_output_len=0", ["request_output_len", "'0'", "integer >= 1"]),
    ("request.num_requests=0", ["num_requests", "'0'", "integer >= 1"]),
    ("request.prompts_file=/no/such.jsonl", ["prompts_file", "/no/such.jsonl", "no such file"]),
    ("request.ignore_eos=2", ["ignore_eos", "'2'", "0 or 1"]),
    ("request.output_len=random", ["output_len", "'random'", "fixed"]),
]


@pytest.mark.parametrize("setting,words", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_rejected_naming_key_value_and_allowed(setting, words):
    with pytest.raises(ConfigError) as e:
        cfg_of(setting)
    for w in words:
        assert w in str(e.value)


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[model\].*\[model_specification\]"):
        cfg_of(text="[model]\nmax_concurrency=2\n", tmp_path=tmp_path)


def test_unknown_key_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'max_concurency' in \[model_specification\]"
                                          r".*max_concurrency"):
        cfg_of(text="[model_specification]\nmax_concurency=2\n", tmp_path=tmp_path)


def test_both_penalties_set_is_rejected():
    with pytest.raises(ConfigError, match=r"presence_penalty=0.5 .* repetition_penalty=1.2: only "
                                          "one of the two may be set"):
        cfg_of("runtime_hyperparameter.repetition_penalty=1.2",
               "runtime_hyperparameter.presence_penalty=0.5")


def test_data_types_that_disagree_are_rejected():
    with pytest.raises(ConfigError, match=r"\[runtime_hyperparameter\] data_type='fp16'.*must "
                                          r"agree with \[model_specification\] data_type='fp32'"):
        cfg_of("model_specification.data_type=fp32", "runtime_hyperparameter.data_type=fp16")


def test_data_types_that_agree_under_different_names_are_accepted():
    cfg = cfg_of("model_specification.data_type=fp16", "runtime_hyperparameter.data_type=float16")
    assert cfg.data_type == "float16"


def test_synthetic_request_longer_than_the_slot_is_rejected():
    with pytest.raises(ConfigError, match=r"request_output_len=60 is invalid: fixed_prompt_len \+ "
                                          r"fixed_input_len \+ request_output_len = 68 must be <= "
                                          "max_seq_len=64"):
        cfg_of("model_specification.max_seq_len=64", "request.request_output_len=60")


def test_beam_width_with_several_samples_is_rejected():
    with pytest.raises(ConfigError, match="beam_width=2 is invalid with per_batch_size=2"):
        cfg_of("model_specification.beam_width=2", "model_specification.per_batch_size=2")


def test_fixed_input_len_with_prompts_file_is_rejected(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    with pytest.raises(ConfigError, match="fixed_input_len=8 is invalid with prompts_file"):
        cfg_of(f"request.prompts_file={tmp_path / 'p.jsonl'}",
               "model_specification.fixed_input_len=8")


def test_malformed_set_is_rejected():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        cfg_of("interval=5")


def test_missing_config_file_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.ini")
