"""`flover serve`'s limits, overload answer, API key, docs switch and error bodies."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from test_server import PROMPT, TIMEOUT, client, paced, post, serving, tiny_engine, wait_idle  # noqa: E402

from flover import Engine, EngineConfig  # noqa: E402
from flover.cli import build_parser  # noqa: E402
from flover.server.app import create_app  # noqa: E402

MAX_BODY = 64 * 1024
MAX_CHARS = 1000


def one_slot_engine() -> Engine:
    """One slot, paced (see test_server.paced): 5 ms a step at least."""
    return paced(Engine(EngineConfig(model="tiny_llama", device="cpu", max_concurrency=1,
                                     max_seq_len=512)), 0.005)


@pytest.fixture(scope="module")
def limited():
    """One slot, at most one request waiting, small body and prompt limits."""
    with serving(one_slot_engine(), max_body_bytes=MAX_BODY, max_prompts_per_request=4,
                 max_prompt_chars=MAX_CHARS, max_waiting=1) as url:
        yield url


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_a_body_over_max_body_bytes_is_413_before_parsing(limited):
    big = {"prompt": list(range(MAX_BODY // 4)), "max_tokens": 1}  # ~ 5 bytes an id
    err = error(post(limited, "/v1/completions", big), 413)
    assert err["code"] == "request_too_large" and str(MAX_BODY) in err["message"]

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    r = httpx.post(f"{limited}/v1/completions", content=chunks(), timeout=TIMEOUT,
                   headers={"Content-Type": "application/json"})
    assert error(r, 413)["code"] == "request_too_large"
    # just under the limit: parsed as usual
    ok = post(limited, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
    assert ok.status_code == 200


def test_more_prompts_than_allowed_is_a_400_naming_prompt(limited):
    err = error(post(limited, "/v1/completions", {"prompt": [PROMPT] * 5, "max_tokens": 1}), 400)
    assert err["param"] == "prompt" and "--max-prompts-per-request" in err["message"]
    ok = post(limited, "/v1/completions", {"prompt": [PROMPT] * 4, "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4


def test_text_longer_than_max_prompt_chars_is_refused_before_tokenising(limited):
    long = "x" * (MAX_CHARS + 1)
    refused = [(post(limited, "/v1/completions", {"prompt": long}), "prompt"),
               (post(limited, "/v1/completions", {"prompt": ["a", long]}), "prompt"),
               (post(limited, "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": long}]}), "messages"),
               (post(limited, "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": [{"type": "text", "text": long}]}]}),
                "messages"),
               (post(limited, "/tokenize", {"prompt": long}), "prompt")]
    for r, param in refused:
        err = error(r, 400)
        # tiny_llama has no tokenizer: this message proves the length check came first
        assert err["param"] == param and "--max-prompt-chars" in err["message"], err


def test_n_or_beams_beyond_the_slots_is_a_400_naming_the_field(limited):
    cases = [({"n": 2}, "n"), ({"n": 10**9}, "n"),
             ({"use_beam_search": True, "beam_width": 3}, "beam_width"),
             ({"use_beam_search": True, "n": 2}, "n")]
    for extra, param in cases:
        err = error(post(limited, "/v1/completions", {"prompt": PROMPT, **extra}), 400)
        assert err["param"] == param and "--max-concurrency" in err["message"]
    chat = post(limited, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}], "n": 2})
    assert error(chat, 400)["param"] == "n"


def test_user_is_at_most_256_characters(limited):
    err = error(post(limited, "/v1/completions", {"prompt": PROMPT, "user": "u" * 257}), 400)
    assert err["param"] == "user" and "u" * 100 not in err["message"]
    ok = post(limited, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "user": "u" * 256})
    assert ok.status_code == 200


def test_error_messages_never_echo_large_inputs(limited):
    deep: list = [1]
    for _ in range(900):
        deep = [deep]
    cases = [({"prompt": PROMPT, "temperature": "x" * 30000}, "temperature"),
             ({"prompt": deep}, "prompt"),
             ({"prompt": PROMPT, "stop": deep}, "stop"),
             ({"prompt": PROMPT, "logit_bias": {str(i): "x" for i in range(2000)}}, "logit_bias")]
    for body, param in cases:
        err = error(post(limited, "/v1/completions", body), 400)
        assert err["param"] == param and len(err["message"]) < 300, err


def test_overload_is_a_429_with_retry_after_and_nothing_is_dropped(limited):
    wait_idle(limited)
    long = {"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    short = {"prompt": PROMPT, "max_tokens": 2, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=limited, timeout=TIMEOUT) as c:
            async with c.stream("POST", "/v1/completions", json=long) as held:
                assert held.status_code == 200
                lines = held.aiter_lines()
                while not (await anext(lines)).startswith("data: "):
                    pass  # the long request has the slot
                queued = asyncio.ensure_future(c.post("/v1/completions", json=short))
                for _ in range(500):  # until the engine counts it as waiting
                    if (await c.get("/stats")).json()["waiting"] == 1:
                        break
                    await asyncio.sleep(0.01)
                refused = await c.post("/v1/completions", json=short)
            # the held stream is closed: its slot goes to the queued request
            done = await asyncio.wait_for(queued, TIMEOUT)
            return refused, done

    refused, done = asyncio.run(run())
    err = error(refused, 429)
    assert err["code"] == "too_many_requests" and refused.headers["Retry-After"] == "1"
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 2
    wait_idle(limited)
    assert post(limited, "/v1/completions", short).status_code == 200


def test_a_request_waiting_past_the_queue_timeout_gets_503_and_the_runner_goes_on():
    long = {"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "temperature": 0,
            "stream": True, "return_token_ids": True}
    short = {"prompt": PROMPT, "max_tokens": 2, "ignore_eos": True}

    def token_ids(lines: list[str]) -> list[int]:
        return [t for line in lines if line.startswith("data: {")
                for t in json.loads(line[6:])["choices"][0]["token_ids"]]

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as c:
            async with c.stream("POST", "/v1/completions", json=long) as alone:
                solo = token_ids([line async for line in alone.aiter_lines()])
            async with c.stream("POST", "/v1/completions", json=long) as held:
                lines = held.aiter_lines()
                seen = [await anext(lines)]
                while not seen[-1].startswith("data: "):
                    seen.append(await anext(lines))  # the long request has the only slot
                timed_out = await c.post("/v1/completions", json=short)
                seen += [line async for line in lines]
            return solo, timed_out, token_ids(seen)

    with serving(one_slot_engine(), queue_timeout=0.2) as url:
        solo, timed_out, ids = asyncio.run(run(url))
        wait_idle(url)
        stats = httpx.get(f"{url}/stats", timeout=TIMEOUT).json()
    err = error(timed_out, 503)
    assert err["code"] == "queue_timeout" and timed_out.headers["Retry-After"] == "1"
    assert len(solo) == 300 and ids == solo  # the request in flight is untouched
    assert stats["slots_used"] == 0 and stats["waiting"] == 0


def test_a_failure_inside_the_engine_answers_internal_error_with_an_id(caplog):
    eng = tiny_engine()
    real_step, calls = eng.step, []

    def failing_step():  # every second step fails: after the first output, so streams start
        calls.append(1)
        if len(calls) % 2 == 0:
            raise RuntimeError("secret detail")
        return real_step()

    eng.step = failing_step
    caplog.set_level(logging.ERROR, logger="flover.server")
    with serving(eng) as url:
        err = error(post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}), 500)
        with httpx.stream("POST", f"{url}/v1/completions", timeout=TIMEOUT,
                          json={"prompt": PROMPT, "max_tokens": 5, "stream": True}) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert err["type"] == "server_error" and err["message"].startswith("internal error (request id ")
    assert "RuntimeError" not in err["message"] and "secret" not in err["message"]
    assert "internal error (request id " in events[-1] and "RuntimeError" not in events[-1]
    rid = err["message"].split()[-1].rstrip(")")
    assert rid in caplog.text and "secret detail" in caplog.text  # the details are in the log


@pytest.fixture(scope="module")
def keyed():
    with serving(tiny_engine(), api_key="sekret") as url:
        yield url


def test_api_key_guards_the_api_but_not_health_or_version(keyed):
    right = openai.OpenAI(base_url=f"{keyed}/v1", api_key="sekret", timeout=TIMEOUT,
                          max_retries=0)
    assert [m.id for m in right.models.list().data] == ["tiny_llama"]
    out = right.completions.create(model="tiny_llama", prompt=PROMPT, max_tokens=2)
    assert out.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError) as e:
        client(keyed).completions.create(model="tiny_llama", prompt=PROMPT, max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    for path in ("/tokenize", "/detokenize", "/v1/chat/completions"):
        assert error(post(keyed, path, {"prompt": "a"}), 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{keyed}/health", timeout=TIMEOUT).status_code == 200
    assert httpx.get(f"{keyed}/version", timeout=TIMEOUT).status_code == 200


def test_serve_flags_and_the_api_key_environment_variable(monkeypatch):
    monkeypatch.setenv("FLOVER_API_KEY", "from-env")
    args = build_parser().parse_args(["serve"])
    assert args.api_key == "from-env" and not args.enable_docs
    assert (args.max_body_bytes, args.max_prompts_per_request, args.max_waiting,
            args.max_prompt_chars) == (4 << 20, 64, 256, None)
    args = build_parser().parse_args(["serve", "--api-key", "k", "--enable-docs",
                                      "--max-waiting", "3"])
    assert (args.api_key, args.enable_docs, args.max_waiting) == ("k", True, 3)
    assert build_parser().parse_args(["serve"]).queue_timeout is None


def test_docs_are_off_unless_asked_for():
    eng = tiny_engine()

    async def get(app, path: str) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (await c.get(path)).status_code

    off, on = create_app(eng), create_app(eng, docs=True)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert asyncio.run(get(off, path)) == 404
        assert asyncio.run(get(on, path)) == 200
