"""GET /metrics: Prometheus text whose counters agree exactly with what the clients were sent."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

from test_server import PROMPT, TIMEOUT, post, serving, tiny_engine, wait_idle  # noqa: E402

MODEL = "tiny_llama"
HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:request_time_per_output_token_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds")


def scrape(url: str, headers: dict | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics as {(sample name, labels): value}; each must carry model_name."""
    r = httpx.get(f"{url}/metrics", timeout=TIMEOUT, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    out = {}
    for family in parser.text_string_to_metric_families(r.text):
        for s in family.samples:
            if family.name.startswith(("vllm:", "flover:")):
                assert s.labels.get("model_name") == MODEL, s
                out[s.name, frozenset(s.labels.items() - {("model_name", MODEL)})] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def success(samples: dict) -> dict[str, float]:
    return {r: value(samples, "vllm:request_success_total", finished_reason=r)
            for r in ("stop", "length", "abort", "error")}


@pytest.fixture(scope="module")
def served():
    """A server of its own: its counters start at zero."""
    with serving(tiny_engine()) as url:
        yield url


def test_counters_and_histograms_agree_with_what_was_sent(served):
    before = scrape(served)
    assert value(before, "vllm:prompt_tokens_total") == 0
    assert set(success(before).values()) == {0}
    for g in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert value(before, g) == 0
    # a greedy run without a stop, to pick a stop token that ends a second one after 3 tokens
    ref = post(served, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                           "ignore_eos": True, "return_token_ids": True}).json()
    tokens = ref["choices"][0]["token_ids"]
    k = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    bodies = [
        {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
         "stop_token_ids": [tokens[k]]},
        {"prompt": [PROMPT, PROMPT[:3]], "max_tokens": 4, "ignore_eos": True},  # two requests
        {"prompt": PROMPT[1:], "max_tokens": 3, "n": 2, "ignore_eos": True},  # one request, 2 rows
    ]
    answers = [ref] + [post(served, "/v1/completions", b).json() for b in bodies]
    assert answers[1]["choices"][0]["finish_reason"] == "stop"
    assert answers[1]["usage"]["completion_tokens"] == k + 1
    reasons = {"stop": 1, "length": 4, "abort": 0, "error": 0}  # 5 engine requests
    finished = sum(reasons.values())

    after = scrape(served)
    assert success(after) == reasons
    assert value(after, "vllm:prompt_tokens_total") == sum(a["usage"]["prompt_tokens"] for a in answers) \
        == 2 * len(PROMPT) + len(PROMPT) + 3 + len(PROMPT) - 1
    assert value(after, "vllm:generation_tokens_total") == sum(
        a["usage"]["completion_tokens"] for a in answers) == 8 + k + 1 + 2 * 4 + 2 * 3
    for h in HISTOGRAMS:  # every request got >= 2 tokens: each has every time
        assert value(after, f"{h}_count") == finished, h
        assert value(after, f"{h}_bucket", le="+Inf") == finished, h
        assert value(after, f"{h}_sum") >= 0
    stats = wait_idle(served)
    assert value(after, "flover:iterations_total") <= stats["iterations"]
    assert value(scrape(served), "flover:iterations_total") == stats["iterations"]
    for name in ("flover:shuffle_moves_total", "flover:shuffle_bytes_total",
                 "flover:failed_batches_total"):
        assert value(after, name) >= 0

    # a stream whose client leaves: counted as an abort, its prompt too
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{served}/v1/completions", json=body, timeout=TIMEOUT) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["index"] == 0
    deadline = time.monotonic() + 10
    while success(last := scrape(served))["abort"] == 0:
        assert time.monotonic() < deadline, "the abort was not counted"
        time.sleep(0.02)
    assert success(last) == {**reasons, "abort": 1}
    assert value(last, "vllm:prompt_tokens_total") == value(after, "vllm:prompt_tokens_total") + len(PROMPT)
    generated = value(last, "vllm:generation_tokens_total") - value(after, "vllm:generation_tokens_total")
    assert 1 <= generated < 400  # what it had generated when the abort came
    assert value(last, "vllm:e2e_request_latency_seconds_count") == finished + 1


def test_gauges_show_a_request_in_flight(served):
    wait_idle(served)
    body = {"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{served}/v1/completions", json=body, timeout=TIMEOUT) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream (the client leaves)
        next(line for line in lines if line.startswith("data: "))
        now = scrape(served)
        assert value(now, "vllm:num_requests_running") == 1
        assert value(now, "vllm:kv_cache_usage_perc") == 1 / 4  # one of max_concurrency=4 slots
    wait_idle(served)


def test_metrics_stay_open_under_an_api_key():
    with serving(tiny_engine(), api_key="sekrit") as url:
        assert httpx.get(f"{url}/v1/models", timeout=TIMEOUT).status_code == 401
        samples = scrape(url)  # no key: still answered (a second app in the process, too)
        assert value(samples, "vllm:request_success_total", finished_reason="stop") == 0


def test_paged_engines_export_block_usage_prefix_hits_and_preemptions():
    from flover import Engine, EngineConfig

    eng = Engine(EngineConfig(model="tiny_llama", device="cpu", max_concurrency=4, max_seq_len=512,
                              kv_layout="pages", block_size=8))
    prompt = list(range(3, 40))  # 4 full blocks of 8, and 5 more tokens
    with serving(eng) as url:
        assert value(scrape(url), "vllm:prefix_cache_hits_total") == 0
        for _ in range(2):
            post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
        wait_idle(url)
        samples = scrape(url)
        assert value(samples, "vllm:prefix_cache_hits_total") == 4 * 8  # the second one's
        assert value(samples, "vllm:num_preemptions_total") == 0
        assert value(samples, "vllm:kv_cache_usage_perc") == 0  # cached blocks are free to take
