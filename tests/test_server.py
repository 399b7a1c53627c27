"""`flover serve`: the OpenAI-compatible API, over a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import flover  # noqa: E402
from flover import Engine, EngineConfig, SamplingParams  # noqa: E402
from flover.server.app import create_app  # noqa: E402

TIMEOUT = 30.0  # seconds, for every network call
PROMPT = [5, 17, 42, 99, 7]


@contextlib.contextmanager
def serving(engine: Engine, **app_kw):
    """The app (create_app's keywords: app_kw) under uvicorn in a background thread, on a free
    port of 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, **app_kw), host="127.0.0.1", port=port,
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


def tiny_engine(max_seq_len: int = 512, step_s: float = 0.002) -> Engine:
    return paced(Engine(EngineConfig(model="tiny_llama", device="cpu", max_concurrency=4,
                                     max_seq_len=max_seq_len)), step_s)


def paced(eng: Engine, step_s: float) -> Engine:
    """Each step takes at least `step_s`: a request of a few hundred tokens then stays in
    flight for a second or more however fast the CPU kernels are (the tiny model alone makes
    ~2,400 tokens/s a row with the compiled ones), as the tests of disconnects, client
    timeouts, aborts, overload and queue timeouts need when they act."""
    real = eng.step

    def step():
        time.sleep(step_s)
        return real()
    eng.step = step
    return eng


@pytest.fixture(scope="module")
def tiny():
    with serving(tiny_engine()) as url:
        yield url


@pytest.fixture(scope="module")
def smol_engine():
    return Engine(EngineConfig(device="cpu", max_concurrency=4, max_seq_len=512))


@pytest.fixture(scope="module")
def smol(smol_engine):
    with serving(smol_engine) as url:
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
    card = models.data[0].to_dict()
    assert (card["root"], card["parent"], card["permission"]) == ("tiny_llama", None, [])
    assert httpx.get(f"{tiny}/health", timeout=TIMEOUT).json() == {"status": "ok"}
    stats = httpx.get(f"{tiny}/stats", timeout=TIMEOUT).json()
    assert stats["max_concurrency"] == 4
    assert httpx.get(f"{tiny}/version", timeout=TIMEOUT).json() == {"version": flover.__version__}


def test_completion_top_logprobs_always_hold_the_sampled_token(tiny):
    c = client(tiny)
    kw = {"model": "tiny_llama", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0,
          "seed": 5, "extra_body": {"ignore_eos": True}}
    lp = c.completions.create(**kw, logprobs=2).choices[0].logprobs
    assert len(lp.tokens) == 8
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[tok] == value and len(top) in (2, 3)
    assert any(len(top) == 3 for top in lp.top_logprobs)  # sampled outside the 2 best: k + 1
    lp = c.completions.create(**kw, logprobs=0).choices[0].logprobs
    assert lp.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs, strict=True)]


def test_default_valued_openai_parameters_are_accepted_and_others_refused(tiny):
    c = client(tiny)
    kw = {"model": "tiny_llama", "prompt": PROMPT, "max_tokens": 2}
    out = c.completions.create(**kw, echo=False, extra_body={"response_format": {"type": "text"}})
    assert out.usage.completion_tokens == 2
    refused = [({"extra_body": {"response_format": {"type": "json_object"}}}, "response_format"),
               ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options")]
    for extra, param in refused:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**kw, **extra)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny_llama", messages=[{"role": "user", "content": "hi"}],
                                  response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"


def test_tokenize_routes_refuse_a_model_without_a_tokenizer(tiny):
    assert post(tiny, "/tokenize", {"prompt": "hi"}).json()["error"]["param"] == "prompt"
    r = post(tiny, "/detokenize", {"tokens": [1, 2]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


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


SMOL = "SmolLM2-135M-Instruct"
FRANCE = "Q: What is the capital of France?\nA:"


def smiley_bias(url: str) -> dict[str, int]:
    """A logit_bias that makes the model write 🙂, whose 4 UTF-8 bytes are 2 tokens of 2."""
    ids = post(url, "/tokenize", {"prompt": "🙂", "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 2
    return {str(t): 100 for t in ids}


def test_text_offset_stays_in_the_text_cut_by_a_stop_string(smol):
    c = client(smol)
    kw = {"model": SMOL, "prompt": FRANCE, "max_tokens": 20, "temperature": 0, "logprobs": 1,
          "stop": [" Paris."]}
    ch = c.completions.create(**kw).choices[0]
    text, lp = ch.text, ch.logprobs
    assert ch.finish_reason == "stop" and " Paris." not in text
    starts = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert starts[-1] > len(text)  # tokens of the stop string: past the cut text
    assert lp.text_offset == [min(s, len(text)) for s in starts]
    streamed = [ch.logprobs for chunk in c.completions.create(**kw, stream=True)
                for ch in chunk.choices if ch.logprobs]
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    assert [t for s in streamed for t in s.tokens] == lp.tokens


def test_text_offset_of_tokens_that_split_a_character(smol):
    ch = client(smol).completions.create(
        model=SMOL, prompt="Smileys: 🙂🙂", max_tokens=8, temperature=0, logprobs=0,
        logit_bias=smiley_bias(smol)).choices[0]
    assert ch.text == "🙂" * 4
    assert ch.logprobs.text_offset == [0, 0, 1, 1, 2, 2, 3, 3]  # both halves start at the 🙂


def test_echo_starts_each_text_with_its_prompt_streamed_or_not(smol):
    c = client(smol)
    kw = {"model": SMOL, "max_tokens": 8, "temperature": 0}
    plain = c.completions.create(**kw, prompt=FRANCE)
    out = c.completions.create(**kw, prompt=FRANCE, echo=True)
    assert out.choices[0].text == FRANCE + plain.choices[0].text
    assert out.usage == plain.usage
    streamed = list(c.completions.create(**kw, prompt=FRANCE, echo=True, stream=True))
    assert streamed[0].choices[0].text.startswith(FRANCE)
    assert "".join(ch.choices[0].text for ch in streamed) == out.choices[0].text
    # token ids: their decoded text; a list of prompts: each choice its own prompt's
    ids = post(smol, "/tokenize", {"prompt": FRANCE}).json()["tokens"]
    out = c.completions.create(**kw, prompt=ids, echo=True)
    assert out.choices[0].text == FRANCE + plain.choices[0].text
    out = c.completions.create(**kw, prompt=[FRANCE, "Hello"], echo=True)
    hello = c.completions.create(**kw, prompt="Hello").choices[0].text
    assert [ch.text for ch in out.choices] == [FRANCE + plain.choices[0].text, "Hello" + hello]


def test_echo_with_logprobs_covers_the_prompt_tokens_first(smol):
    c = client(smol)
    kw = {"model": SMOL, "prompt": FRANCE, "max_tokens": 8, "temperature": 0, "logprobs": 1}
    plain = c.completions.create(**kw).choices[0].logprobs
    out = c.completions.create(**kw, echo=True)
    ch, usage = out.choices[0], out.usage
    lp = ch.logprobs
    n_prompt = usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) \
        == len(lp.text_offset) == n_prompt + usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for value, top in zip(lp.token_logprobs[1:n_prompt], lp.top_logprobs[1:n_prompt], strict=True):
        assert isinstance(value, float) and math.isfinite(value) and value <= 0
        assert len(top) in (1, 2)
    # all tokens here are whole ASCII characters: they join into the text, offsets increase
    assert "".join(lp.tokens) == ch.text == FRANCE + c.completions.create(
        **{**kw, "logprobs": None}).choices[0].text
    assert lp.text_offset[0] == 0
    assert all(a < b for a, b in zip(lp.text_offset, lp.text_offset[1:], strict=False))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # the completion's part is the one given without echo, shifted by the prompt's text
    assert lp.tokens[n_prompt:] == plain.tokens
    assert lp.text_offset[n_prompt:] == [len(FRANCE) + o for o in plain.text_offset]
    assert lp.token_logprobs[n_prompt:] == pytest.approx(plain.token_logprobs, abs=1e-4)
    streamed = [chunk.choices[0] for chunk in c.completions.create(**kw, echo=True, stream=True)]
    assert streamed[0].text.startswith(FRANCE)
    assert streamed[0].logprobs.token_logprobs[0] is None
    assert "".join(s.text for s in streamed) == ch.text
    got = [s.logprobs for s in streamed if s.logprobs]
    assert [t for g in got for t in g.tokens] == lp.tokens
    assert [o for g in got for o in g.text_offset] == lp.text_offset


def test_echo_of_token_ids_without_a_tokenizer(tiny):
    c = client(tiny)
    kw = {"model": "tiny_llama", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
          "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    plain = c.completions.create(**kw).choices[0]
    ch = c.completions.create(**kw, echo=True).choices[0]
    assert ch.text == "" and ch.token_ids == plain.token_ids  # token_ids: the generated ones
    lp = c.completions.create(**kw, echo=True, logprobs=1).choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in PROMPT + plain.token_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and lp.text_offset == [0] * 9


def test_chat_logprob_bytes_rebuild_characters_split_over_tokens(smol):
    out = client(smol).chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Send me smileys"}], max_tokens=8,
        temperature=0, logprobs=True, top_logprobs=1, logit_bias=smiley_bias(smol),
        response_format={"type": "text"})
    ch = out.choices[0]
    assert ch.message.content == "🙂" * 4
    entries = ch.logprobs.content
    assert all(e.token.startswith("\ufffd") for e in entries)  # alone, a half decodes to U+FFFD
    assert bytes(b for e in entries for b in e.bytes).decode() == ch.message.content
    assert all(e.top_logprobs[0].bytes == e.bytes for e in entries)


def test_tokenize_and_detokenize_as_vllm(smol):
    r = post(smol, "/tokenize", {"prompt": "Hello world"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == 512
    assert post(smol, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    chat = client(smol).chat.completions.create(model=SMOL, messages=QUESTION, max_tokens=1)
    r = post(smol, "/tokenize", {"messages": QUESTION, "model": SMOL}).json()
    assert r["count"] == chat.usage.prompt_tokens
    text = post(smol, "/detokenize", {"tokens": r["tokens"]}).json()["prompt"]
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    r = post(smol, "/tokenize", {"messages": QUESTION, "add_generation_prompt": False}).json()
    text = post(smol, "/detokenize", {"tokens": r["tokens"]}).json()["prompt"]
    assert text.endswith("France?<|im_end|>\n")
    bad = [post(smol, "/tokenize", {"prompt": "a", "messages": QUESTION}),
           post(smol, "/tokenize", {"prompt": "a", "add_generation_prompt": True}),
           post(smol, "/detokenize", {"tokens": [1, 10**6]}),
           post(smol, "/detokenize", {"tokens": [-1]}),
           post(smol, "/detokenize", {"tokens": [1], "model": "gpt-4"})]
    assert [r.status_code for r in bad] == [400, 400, 400, 400, 404]
    assert [r.json()["error"]["param"] for r in bad] == ["messages", "add_generation_prompt",
                                                         "tokens", "tokens", "model"]


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


def test_tokenising_runs_off_the_event_loop(smol, smol_engine, monkeypatch):
    tok = smol_engine.tokenizer
    real_encode, started = tok.encode, threading.Event()

    def slow_encode(*args, **kwargs):
        started.set()
        time.sleep(1.0)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(tok, "encode", slow_encode)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", post(
        smol, "/v1/completions", {"prompt": FRANCE, "max_tokens": 1})))
    worker.start()
    assert started.wait(TIMEOUT)
    t0 = time.monotonic()
    health = httpx.get(f"{smol}/health", timeout=TIMEOUT)
    waited = time.monotonic() - t0
    worker.join(TIMEOUT)
    assert health.status_code == 200 and waited < 0.5  # not stuck behind the 1 s encode
    assert result["r"].status_code == 200


def test_a_lone_surrogate_in_a_prompt_is_a_400_naming_the_field(smol):
    for path, body, param in [
            ("/v1/completions", '{"prompt": "abc\\ud800def", "max_tokens": 2}', "prompt"),
            ("/v1/chat/completions",
             '{"messages": [{"role": "user", "content": "abc\\ud800def"}], "max_tokens": 2}',
             "messages")]:
        r = httpx.post(f"{smol}{path}", content=body, timeout=TIMEOUT,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "not valid Unicode" in r.json()["error"]["message"]
