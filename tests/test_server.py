"""`flover serve`: the OpenAI-compatible API, over a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from flover import Engine, EngineConfig, SamplingParams  # noqa: E402
from flover.server.app import create_app  # noqa: E402

TIMEOUT = 30.0  # seconds, for every network call
PROMPT = [5, 17, 42, 99, 7]


@contextlib.contextmanager
def serving(engine: Engine):
    """The app under uvicorn in a background thread, on a free port of 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def tiny_engine(max_seq_len: int = 512) -> Engine:
    return Engine(EngineConfig(model="tiny_llama", device="cpu", max_concurrency=4,
                               max_seq_len=max_seq_len))


@pytest.fixture(scope="module")
def tiny():
    with serving(tiny_engine()) as url:
        yield url


@pytest.fixture(scope="module")
def smol():
    with serving(Engine(EngineConfig(device="cpu", max_concurrency=4, max_seq_len=512))) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


def post(url: str, path: str, body) -> httpx.Response:
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    return httpx.post(f"{url}{path}", timeout=TIMEOUT, **kw)


def engine_greedy(prompt: list[int], max_tokens: int) -> list[int]:
    eng = tiny_engine()
    eng.add_request("ref", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                  ignore_eos=True))
    return [o for o in eng.run_until_done()][-1].token_ids


def wait_idle(url: str) -> dict:
    deadline = time.monotonic() + 10
    while True:
        stats = httpx.get(f"{url}/stats", timeout=TIMEOUT).json()
        if stats["slots_used"] == 0 and stats["in_flight"] == 0 and stats["waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"slots not freed: {stats}"
        time.sleep(0.02)


# --- completions on tiny_llama (token ids) ------------------------------------------------

def test_token_id_completion_equals_the_engines_greedy_tokens(tiny):
    out = client(tiny).completions.create(
        model="tiny_llama", prompt=PROMPT, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    assert out.choices[0].token_ids == engine_greedy(PROMPT, 12)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 12)


def test_streamed_token_ids_add_up_to_the_greedy_tokens(tiny):
    stream = client(tiny).completions.create(
        model="tiny_llama", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = list(stream)
    ids = [t for c in chunks for ch in c.choices for t in ch.token_ids]
    assert ids == engine_greedy(PROMPT, 12)
    assert [ch.finish_reason for c in chunks for ch in c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_a_list_of_prompts_with_n_gives_n_choices_each(tiny):
    r = post(tiny, "/v1/completions", {"prompt": [PROMPT, [3, 4]], "n": 2, "max_tokens": 4,
                                       "seed": 7, "ignore_eos": True})
    assert r.status_code == 200
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 16, "total_tokens": 23}


def test_bad_requests_get_400_naming_the_field_while_a_good_one_completes(tiny):
    async def run():
        async with httpx.AsyncClient(base_url=tiny, timeout=TIMEOUT) as c:
            good = c.post("/v1/completions", json={
                "prompt": PROMPT, "max_tokens": 60, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True})
            bad = [c.post("/v1/completions", json=b) for b in (
                {"prompt": PROMPT, "temperature": -1},
                {"prompt": list(range(3, 203)) * 3, "max_tokens": 4},
                {"prompt": PROMPT, "max_tokens": "many"},
                {"prompt": PROMPT, "tempreature": 0.5},
                {"prompt": PROMPT, "logit_bias": {"999": 5}},
                {"prompt": PROMPT, "model": "gpt-4"})]
            return await asyncio.gather(good, *bad)

    good, *bad = asyncio.run(run())
    assert good.status_code == 200
    assert good.json()["choices"][0]["token_ids"] == engine_greedy(PROMPT, 60)
    assert [r.status_code for r in bad] == [400, 400, 400, 400, 400, 404]
    errors = [r.json()["error"] for r in bad]
    assert [e["param"] for e in errors] == ["temperature", "prompt", "max_tokens", "tempreature",
                                            "logit_bias", "model"]
    assert all(e["type"] == "invalid_request_error" for e in errors)
    assert "temperature=-1" in errors[0]["message"]
    assert errors[1]["code"] == "context_length_exceeded"
    assert errors[5]["code"] == "model_not_found"
    assert wait_idle(tiny)["refused"] >= 6


def test_malformed_json_is_a_400_with_an_error_body(tiny):
    r = post(tiny, "/v1/completions", '{"prompt": [1, 2,')
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_the_openai_client_raises_bad_request_for_a_bad_value(tiny):
    with pytest.raises(openai.BadRequestError) as e:
        client(tiny).completions.create(model="tiny_llama", prompt=PROMPT, top_p=0)
    assert e.value.body["param"] == "top_p"


def test_client_disconnect_mid_stream_frees_the_slot(tiny):
    before = httpx.get(f"{tiny}/stats", timeout=TIMEOUT).json()["iterations"]
    body = {"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{tiny}/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["index"] == 0
    stats = wait_idle(tiny)  # the stream is closed; its slot comes back
    assert stats["iterations"] - before < 500  # aborted, not run to the end


def test_client_gone_before_a_non_streamed_answer_frees_the_slot(tiny):
    before = httpx.get(f"{tiny}/stats", timeout=TIMEOUT).json()["iterations"]
    with pytest.raises(httpx.TimeoutException):
        post_body = {"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True}
        httpx.post(f"{tiny}/v1/completions", json=post_body, timeout=0.3)
    stats = wait_idle(tiny)
    assert stats["iterations"] - before < 500


def test_beam_search_returns_the_engines_n_best_beams(tiny):
    r = post(tiny, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "n": 2,
                                       "use_beam_search": True, "beam_width": 3,
                                       "return_token_ids": True})
    eng = tiny_engine()
    eng.add_request("ref", PROMPT, SamplingParams(max_tokens=5, beam_width=3))
    ref = [o for o in eng.run_until_done()][-1].outputs
    assert [c["token_ids"] for c in r.json()["choices"]] == [c.token_ids for c in ref[:2]]


def test_models_health_and_stats(tiny):
    models = client(tiny).models.list()
    assert [m.id for m in models.data] == ["tiny_llama"]
    assert httpx.get(f"{tiny}/health", timeout=TIMEOUT).json() == {"status": "ok"}
    stats = httpx.get(f"{tiny}/stats", timeout=TIMEOUT).json()
    assert stats["max_concurrency"] == 4


# --- chat on the embedded model -----------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_answers_paris_and_streaming_adds_up_to_the_same_text(smol):
    c = client(smol)
    out = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                    max_tokens=24, temperature=0)
    text = out.choices[0].message.content
    assert "Paris" in text
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    stream = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                       max_tokens=24, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_n2_gives_two_choices_with_logprobs(smol):
    out = client(smol).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=6, n=2, seed=3,
        logprobs=True, top_logprobs=2)
    assert [ch.index for ch in out.choices] == [0, 1]
    for ch in out.choices:
        assert ch.message.content
        entries = ch.logprobs.content
        assert entries and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_stop_string_ends_the_text_before_it_streamed_or_not(smol):
    c = client(smol)
    kw = {"model": "SmolLM2-135M-Instruct", "messages": QUESTION, "max_tokens": 24,
          "temperature": 0, "stop": ["Paris"]}
    text = c.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or ""
                       for ch in c.chat.completions.create(**kw, stream=True))
    assert "Paris" not in text and streamed == text


def test_engine_loop_survives_a_failing_step():
    from flover.server.async_engine import AsyncEngine

    eng = tiny_engine()
    real_step, calls = eng.step, []

    def step_that_fails_once():  # the second step: the request is in flight then
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step()

    eng.step = step_that_fails_once
    aeng = AsyncEngine(eng)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    async def run(prompt):
        return [out async for _, out in aeng.generate([prompt], params)]

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await asyncio.wait_for(run(PROMPT), TIMEOUT)
        for _ in range(200):  # the snapshot is fresh after the failure, not after the next step
            if aeng.stats()["in_flight"] == 0:
                break
            await asyncio.sleep(0.01)
        stale = aeng.stats()
        return stale, await asyncio.wait_for(run(PROMPT), TIMEOUT)

    try:
        stale, outs = asyncio.run(main())
    finally:
        aeng.shutdown()
    assert stale["in_flight"] == 0 and stale["slots_used"] == 0 and stale["engine_failures"] == 1
    assert outs[-1].finished and len(outs[-1].token_ids) == 3
    assert aeng.stats()["engine_failures"] == 1 and aeng.stats()["slots_used"] == 0
