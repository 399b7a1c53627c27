"""`flover serve` as a real process: graceful shutdown on SIGTERM, and hostile input.

tests/test_server.py runs the app under uvicorn in a thread, which never sees a signal; what
happens on SIGTERM (drain, 503 for new requests, cut-off streams, exit code) lives in the
`serve` command itself, so these tests start `python -m flover.cli serve` as a subprocess on a
free loopback port. One server process per test; tiny_llama has random weights (no download)
and no tokenizer, so prompts are token ids.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

if sys.platform == "win32":  # pragma: no cover
    pytest.skip("POSIX signals", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [5, 17, 42, 99, 7]
MAX_SEQ_LEN = 512  # tiny_llama's most
START_TIMEOUT = 90.0  # importing torch and building the model, on a busy 2-core box
TIMEOUT = 30.0  # every HTTP call
EXIT_SLACK = 10.0  # after the drain: uvicorn's flush, the engine thread, interpreter teardown
MAX_BODY = 64 * 1024
ERROR_KEYS = {"message", "type", "param", "code"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, drain_timeout: float) -> tuple[int, float]:
        """SIGTERM, then wait for the exit: (exit code, seconds it took)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(drain_timeout + EXIT_SLACK)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {drain_timeout + EXIT_SLACK} s after SIGTERM:\n"
                        f"{self.output()}")
        return rc, time.monotonic() - t0


@contextlib.contextmanager
def serve(*args: str) -> Iterator[Server]:
    """`flover serve` with tiny_llama on a free port, once /health answers; killed at the end
    if a test left it running."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        cmd = [sys.executable, "-m", "flover.cli", "serve", "--model", "tiny_llama",
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
               "--max-seq-len", str(MAX_SEQ_LEN), "--log-level", "warning", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("FLOVER_API_KEY", None)
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        server = Server(proc, f"http://127.0.0.1:{port}", log)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{server.output()}"
                assert time.monotonic() < deadline, f"serve did not start:\n{server.output()}"
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                        break
                time.sleep(0.1)
            yield server
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@dataclass
class Stream:
    """One streamed /v1/completions call, read in a thread: its events as they came."""

    url: str
    body: dict
    headers: dict = field(default_factory=dict)
    status: int | None = None
    events: list = field(default_factory=list)  # parsed JSON events, then "[DONE]"
    first: threading.Event = field(default_factory=threading.Event)
    ended_at: float = math.inf
    failure: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body,
                              headers=self.headers, timeout=TIMEOUT) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    self.first.set()
        except BaseException as e:  # noqa: BLE001 - the test reports it
            self.failure = e
        finally:
            self.ended_at = time.monotonic()
            self.first.set()

    def join(self) -> Stream:
        assert self.thread is not None
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the stream did not end"
        assert self.failure is None, repr(self.failure)
        assert self.status == 200
        return self

    @property
    def chunks(self) -> list[dict]:
        return [e for e in self.events if isinstance(e, dict) and "choices" in e]

    @property
    def errors(self) -> list[dict]:
        return [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks for t in c["choices"][0].get("token_ids") or []]

    @property
    def finish_reason(self) -> str | None:
        reasons = [c["choices"][0]["finish_reason"] for c in self.chunks]
        return next((r for r in reversed(reasons) if r is not None), None)


def stream_body(max_tokens: int, **kw) -> dict:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, **kw}


def start_streams(url: str, count: int, max_tokens: int) -> list[Stream]:
    """`count` streams, returned once each has its first chunk: all of them are in flight."""
    streams = [Stream(url, stream_body(max_tokens)).start() for _ in range(count)]
    for s in streams:
        assert s.first.wait(TIMEOUT) and s.failure is None, repr(s.failure)
    return streams


def wait_draining(url: str) -> None:
    """Until /health says the drain began (the signal is handled on uvicorn's next tick)."""
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/health", timeout=TIMEOUT).status_code != 503:
        assert time.monotonic() < deadline, "the server did not start draining"
        time.sleep(0.02)


def shutting_down(r: httpx.Response) -> dict:
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["code"] == "server_shutting_down", err
    return err


# --- graceful shutdown ---------------------------------------------------------------------

def test_drain_timeout_flag_defaults_to_30_s_and_refuses_negative_or_nan():
    from flover.cli import build_parser

    assert build_parser().parse_args(["serve"]).drain_timeout == 30.0
    assert build_parser().parse_args(["serve", "--drain-timeout", "0"]).drain_timeout == 0.0
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--drain-timeout", bad])


@pytest.mark.parametrize("flag", ["--timeout-keep-alive", "--queue-timeout"])
def test_timeout_flags_take_positive_seconds_only(flag, capsys):
    from flover.cli import build_parser

    assert getattr(build_parser().parse_args(["serve", flag, "0.5"]), flag[2:].replace("-", "_")) == 0.5
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", flag, bad])
        assert flag in capsys.readouterr().err


def test_sigterm_lets_streams_in_flight_finish_refuses_new_ones_and_exits_0():
    # as long as the slots allow: with the compiled CPU kernels the tiny model's engine alone
    # makes ~2,400 tokens/s per row, and the late request must be refused before any ends
    drain, max_tokens = 30.0, MAX_SEQ_LEN - len(PROMPT) - 8
    with serve("--max-concurrency", "4", "--drain-timeout", str(drain)) as server:
        streams = start_streams(server.url, 4, max_tokens)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_draining(server.url)
        late = httpx.post(f"{server.url}/v1/completions", timeout=TIMEOUT,
                          json={"prompt": PROMPT, "max_tokens": 4})
        refused_at = time.monotonic()
        shutting_down(late)
        for s in streams:
            s.join()
            assert s.events[-1] == "[DONE]" and not s.errors, s.events[-3:]
            assert s.finish_reason == "length" and len(s.token_ids) == max_tokens
            assert s.ended_at - t0 < drain
        assert refused_at < min(s.ended_at for s in streams), "refused after the drain, not in it"
        rc = server.proc.wait(drain + EXIT_SLACK)
        assert rc == 0, server.output()
        assert time.monotonic() - max(s.ended_at for s in streams) < EXIT_SLACK


def test_a_short_drain_timeout_cuts_streams_off_with_an_error_event_and_exits_0():
    # the calls below need more: ~500 fused steps of the tiny model take ~0.2 s in the engine
    # alone with the compiled CPU kernels (more served over HTTP), so the drain is short
    drain = 0.05
    with serve("--max-concurrency", "8", "--drain-timeout", str(drain)) as server:
        streams = start_streams(server.url, 4, MAX_SEQ_LEN - len(PROMPT) - 8)
        with ThreadPoolExecutor(1) as pool:  # and a non-streamed call in flight
            blocking = pool.submit(httpx.post, f"{server.url}/v1/completions", timeout=TIMEOUT,
                                   json={**stream_body(400), "stream": False})
            time.sleep(0.05)
            rc, took = server.stop(drain)
            shutting_down(blocking.result())
        assert rc == 0, server.output()
        assert took < drain + EXIT_SLACK
        for s in streams:
            s.join()
            assert s.events[-1] == "[DONE]", s.events[-3:]
            assert s.finish_reason is None  # cut off, not finished
            [err] = s.errors
            assert set(err) == ERROR_KEYS and err["code"] == "server_shutting_down", err
            assert s.events[-2] == {"error": err}  # the error, then [DONE]


# --- hostile input -------------------------------------------------------------------------

def hostile_requests() -> list[tuple[str, str, dict]]:
    """(method, path, httpx keywords) of requests that must each get a JSON 4xx."""
    ok = {"prompt": PROMPT, "max_tokens": 4}

    def body(**kw) -> dict:
        return {**ok, **kw}

    def raw(text: str | bytes, ctype: str = "application/json") -> dict:
        return {"content": text, "headers": {"Content-Type": ctype}}

    deep = "[" * 100_000 + "]" * 100_000
    jsons = [
        body(max_tokens=-1), body(max_tokens=10**30), body(max_tokens="ten"),
        body(max_tokens=1.5), body(max_tokens=[4]), body(max_tokens=MAX_SEQ_LEN * 100),
        body(temperature=-1), body(temperature="hot"), body(temperature=1e308),
        body(top_p=2), body(top_p=-0.5), body(top_k="x"), body(min_p=2),
        body(n=0), body(n=-1), body(n=10_000), body(best_of=5), body(beam_width=3),
        body(use_beam_search=True, n=4, beam_width=2),
        body(prompt=[]), body(prompt=""), body(prompt=[[]]), body(prompt=[-1]),
        body(prompt=[10**9]), body(prompt=[2**70]), body(prompt=[1.5]), body(prompt=["a", 1]),
        body(prompt={"a": 1}), body(prompt=None), body(prompt=[PROMPT] * 1000),
        body(prompt=list(range(MAX_SEQ_LEN + 10))), body(prompt="hello"),
        {"max_tokens": 4}, body(model="gpt-4"), body(model=7),
        body(logit_bias={"abc": 1}), body(logit_bias={"5": "x"}),
        body(logit_bias={"999999999": 1}), body(logit_bias=[1, 2]),
        body(foo=1), body(functions=[]), body(stop=5), body(stop=[1, 2]),
        body(seed="x"), body(seed=2**70), body(stream="maybe"),
        body(stream_options={"include_usage": True}), body(logprobs=100), body(logprobs=-1),
        body(echo="maybe"), body(suffix="x"), body(presence_penalty=5),
        body(frequency_penalty=-5), body(repetition_penalty=0), body(min_tokens=-1),
        body(min_tokens=100), body(stop_token_ids=[-1]), body(stop_token_ids="x"),
        body(return_token_ids="maybe"), body(response_format={"type": "json_object"}),
        body(user="u" * 1000), body(prompt=[[5]] * 5 + [[-2]]),
    ]
    reqs = [("POST", "/v1/completions", {"json": j}) for j in jsons]
    reqs += [("POST", "/v1/completions", raw(text)) for text in [
        "{", "not json", "", "[]", '"string"', "null", "1e999",
        '{"prompt": [5], "max_tokens": NaN}', '{"prompt": [5], "temperature": NaN}',
        '{"prompt": [5], "temperature": Infinity}', '{"prompt": [5], "max_tokens": 1e400}',
        '{"prompt": [5], "logit_bias": {"5": NaN}}', '{"prompt": [5], "top_p": -Infinity}',
        b'{"prompt": "\xff\xfe"}', '{"prompt": [5], "prompt": "dup", "max_tokens": 4',
        deep, '{"prompt": ' + deep + "}",
        '{"prompt": [' + ",".join(["5"] * 20_000) + "]}",  # over --max-body-bytes: 413
    ]]
    reqs += [
        ("POST", "/v1/completions", raw(json.dumps(ok), "text/plain")),
        ("GET", "/v1/completions", {}),
        ("POST", "/v1/nonexistent", {"json": ok}),
        ("GET", "/v1/models/gpt-4", {}),
        ("POST", "/v1/chat/completions", {"json": {"messages": []}}),
        ("POST", "/v1/chat/completions", {"json": {"messages": "hi"}}),
        ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "alien",
                                                                  "content": "hi"}]}}),
        ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user",
                                                                  "content": "hi"}]}}),
        ("POST", "/tokenize", {"json": {"prompt": "hi"}}),
        ("POST", "/detokenize", {"json": {"tokens": [-5]}}),
        ("POST", "/detokenize", {"json": {"tokens": "abc"}}),
    ]
    return reqs


def test_hostile_requests_get_json_4xx_and_leave_a_concurrent_stream_unchanged():
    reqs = hostile_requests()
    assert len(reqs) >= 50
    max_tokens = 400
    with serve("--max-concurrency", "4", "--max-body-bytes", str(MAX_BODY),
               "--max-prompts-per-request", "8", "--drain-timeout", "5") as server:
        solo = Stream(server.url, stream_body(max_tokens)).start().join()
        assert solo.finish_reason == "length" and len(solo.token_ids) == max_tokens

        def send(req: tuple[str, str, dict]) -> tuple[httpx.Response, float]:
            method, path, kw = req
            r = httpx.request(method, f"{server.url}{path}", timeout=TIMEOUT, **kw)
            return r, time.monotonic()

        victim = Stream(server.url, stream_body(max_tokens)).start()
        assert victim.first.wait(TIMEOUT)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, reqs))
        victim.join()
        bad = []
        for (method, path, kw), (r, _) in zip(reqs, answers, strict=True):
            what = f"{method} {path} {str(kw)[:120]}"
            try:
                assert 400 <= r.status_code < 500, r.status_code
                assert r.headers["content-type"].startswith("application/json")
                err = r.json()["error"]
                assert set(err) == ERROR_KEYS and isinstance(err["message"], str), err
                assert len(r.content) < 2000, "the error echoes too much of the input"
            except (AssertionError, KeyError, ValueError) as e:
                bad.append(f"{what} -> {r.status_code} {r.text[:200]!r} ({e})")
        assert not bad, "\n".join(bad)
        # the hostile requests overlapped the stream, which did not notice them
        assert min(t for _, t in answers) < victim.ended_at
        assert victim.events[-1] == "[DONE]" and not victim.errors
        assert victim.token_ids == solo.token_ids
        stats = httpx.get(f"{server.url}/stats", timeout=TIMEOUT).json()
        assert stats["slots_used"] == 0 and stats["in_flight"] == 0, stats
        rc, _ = server.stop(5)
        assert rc == 0, server.output()


def test_limits_overload_queue_timeout_and_metrics_of_the_real_process():
    """The flags reach the app: each limit refuses with its status and code, a full queue is a
    429, a request past --queue-timeout a 503, and /metrics parses and counts what ran."""
    from prometheus_client.parser import text_string_to_metric_families

    with serve("--max-concurrency", "1", "--max-waiting", "1", "--max-body-bytes", str(MAX_BODY),
               "--max-prompts-per-request", "2", "--max-prompt-chars", "100",
               "--queue-timeout", "0.5", "--api-key", "k", "--drain-timeout", "1") as server:
        auth = {"Authorization": "Bearer k"}

        def post(body: dict, **kw) -> httpx.Response:
            return httpx.post(f"{server.url}/v1/completions", json=body, timeout=TIMEOUT,
                              headers=kw.pop("headers", auth), **kw)

        short = {"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True}
        assert post(short, headers={}).status_code == 401
        assert post({"prompt": list(range(MAX_BODY // 4)), "max_tokens": 1}).status_code == 413
        assert post({"prompt": [PROMPT] * 3, "max_tokens": 1}).json()["error"]["param"] == "prompt"
        assert post({"prompt": "x" * 101, "max_tokens": 1}).json()["error"]["param"] == "prompt"
        assert post({**short, "n": 2}).json()["error"]["param"] == "n"
        assert post(short).status_code == 200

        held = Stream(server.url, stream_body(500), headers=auth).start()  # the only slot
        assert held.first.wait(TIMEOUT)
        with ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(post, short)  # waits for the slot ...
            deadline = time.monotonic() + TIMEOUT
            while httpx.get(f"{server.url}/stats", timeout=TIMEOUT).json()["waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            overload = post(short)  # ... so the queue is full
            timed_out = waiting.result(TIMEOUT)  # ... and it gives up after 0.5 s
        assert overload.status_code == 429 and overload.json()["error"]["code"] == "too_many_requests"
        assert timed_out.status_code == 503 and timed_out.json()["error"]["code"] == "queue_timeout"
        held.join()
        assert held.finish_reason == "length"
        by_reason = {s.labels["finished_reason"]: s.value for f in text_string_to_metric_families(
            httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text)
            for s in f.samples if s.name == "vllm:request_success_total"}
        assert by_reason["length"] == 2 and by_reason["abort"] == 1  # the timed-out one
        rc, _ = server.stop(1)
        assert rc == 0


def test_connections_that_send_nothing_or_half_a_request_are_closed_but_requests_are_not_cut():
    # 0.5 s: 500 tokens of tiny_llama take about 1 s on an idle CPU, must outlast the timeout
    with serve("--timeout-keep-alive", "0.5", "--drain-timeout", "1") as server:
        port = int(server.url.rsplit(":", 1)[1])
        for payload in (b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(payload)
                s.settimeout(10)
                t0 = time.monotonic()
                assert s.recv(100) == b""  # closed by the server, not by our timeout
                assert time.monotonic() - t0 < 5
        started = time.monotonic()
        long = Stream(server.url, stream_body(500)).start().join()  # a silent client, 0.5 s +
        assert long.finish_reason == "length" and len(long.token_ids) == 500
        assert long.ended_at - started > 0.5, "the stream was too short to test the timeout"
        rc, _ = server.stop(1)
        assert rc == 0
