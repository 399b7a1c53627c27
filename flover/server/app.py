"""The OpenAI-compatible HTTP API: an ASGI app (FastAPI) over an AsyncEngine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with SSE
streaming), GET /health, GET /stats, and vLLM's POST /tokenize, POST /detokenize and
GET /version. A bad request gets a 400 with OpenAI's error body and
touches no other request; a client that goes away mid-generation frees its slot. Limits
(body size, prompts per call, prompt length, waiting requests) and the optional API key are
checked before any tokenising; tokenising and chat templating run off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import reprlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from flover import __version__
from flover.config import ConfigError, SamplingParams
from flover.engine import CompletionOutput, Engine, RequestError, RequestOutput
from flover.engine.detokenizer import IncrementalDetokenizer, StopChecker
from flover.server.async_engine import AsyncEngine, EngineDeadError, QueueTimeoutError
from flover.server.metrics import install_metrics
from flover.server.protocol import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from flover.server.tokens import TokenView

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_PROMPTS_PER_REQUEST = 64
DEFAULT_MAX_WAITING = 256
PROMPT_CHARS_PER_SEQ_TOKEN = 32  # default --max-prompt-chars: 4 chars a token, 8x headroom
RETRY_AFTER_S = 1
logger = logging.getLogger("flover.server")
# SamplingParams' field names where the API calls them otherwise
_API_NAMES = {"len_penalty": "length_penalty"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may ask for; each is refused with an error naming the field."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST
    max_prompt_chars: int = 2048 * PROMPT_CHARS_PER_SEQ_TOKEN
    max_waiting: int = DEFAULT_MAX_WAITING


def internal_error(e: BaseException | str, status: int = 500) -> APIError:
    """A server-side failure: the client gets an id to quote, the log gets the details."""
    rid = uuid.uuid4().hex[:12]
    if isinstance(e, BaseException):
        logger.error("internal error %s: %s", rid, e, exc_info=e)
    else:
        logger.error("internal error %s: %s", rid, e)
    return APIError(status, f"internal error (request id {rid})", type="server_error")


# short reprs of what a client sent, for error messages: a huge or deeply nested value is cut
_short = reprlib.Repr()  # (Python 3.11's Repr takes no keywords)
_short.maxlevel, _short.maxstring, _short.maxother = 2, 60, 60
_short.maxlist = _short.maxtuple = _short.maxdict = 4
MAX_ECHO_CHARS = 100


def short_repr(value: object) -> str:
    r = _short.repr(value)
    return r if len(r) <= MAX_ECHO_CHARS else r[: MAX_ECHO_CHARS - 3] + "..."


def _protected(path: str) -> bool:
    """Routes behind --api-key: the OpenAI API and vLLM's tokenizer routes (not /health,
    /version, /stats, /metrics)."""
    return path == "/v1" or path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


class Guard:
    """ASGI middleware in front of every route: the API key, then the body size, both before
    any route code or JSON parsing runs. The body is read here (at most max_body_bytes of it)
    and handed on whole; later receive() calls (disconnect watches) go to the server."""

    def __init__(self, app, max_body_bytes: int, api_key: str | None,
                 on_refuse: Callable[[], None]) -> None:
        self.app, self.max_body_bytes, self.on_refuse = app, max_body_bytes, on_refuse
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and _protected(scope["path"]) and not self._authorized(headers):
            await self._refuse(scope, receive, send, APIError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
            return
        too_big = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                           code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._refuse(scope, receive, send, too_big if length.isdigit() else APIError(
                400, "invalid Content-Length header"))
            return
        chunks: list[bytes] = []
        size = 0
        first: dict = {"type": "http.request", "body": b"", "more_body": False}
        while True:  # also bounds chunked bodies, which carry no Content-Length
            msg = await receive()
            if msg["type"] != "http.request":
                first = msg  # the client left: the route sees that
                break
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send, too_big)
                return
            if not msg.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replay = [first]

        async def receive_replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_replayed, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(key.strip(), self.api_key)

    async def _refuse(self, scope, receive, send, err: APIError) -> None:
        self.on_refuse()
        await err.response()(scope, receive, send)


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


def model_name_of(model: str | None) -> str:
    """The id the server answers to: a preset's name, a checkpoint's folder or file name."""
    if model is None:
        return DEFAULT_MODEL_NAME
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else (p.name or model)


def create_app(engine: Engine, model_name: str | None = None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST,
               max_prompt_chars: int | None = None, max_waiting: int = DEFAULT_MAX_WAITING,
               api_key: str | None = None, docs: bool = False,
               queue_timeout: float | None = None) -> FastAPI:
    """The ASGI app. Its engine thread starts with the app (or at the first request) and
    stops with it.

    max_body_bytes: larger bodies get a 413 before any parsing. max_prompts_per_request: the
    most prompts in one completions call. max_prompt_chars (default 32 x max_seq_len): the
    longest text prompt or chat content, checked before tokenising. max_waiting: with that many
    requests waiting for a slot, new ones get a 429. api_key: if set, /v1/*, /tokenize and
    /detokenize need `Authorization: Bearer <api_key>`. docs: serve /docs, /redoc and
    /openapi.json. queue_timeout: a request that waits longer for a slot gets a 503 with
    Retry-After (None: it waits as long as it takes).
    """
    name = model_name or model_name_of(engine.config.model)
    if queue_timeout is not None and not queue_timeout > 0:
        raise ValueError(f"queue_timeout must be > 0 seconds, got {queue_timeout}")
    aeng = AsyncEngine(engine, queue_timeout)
    view = TokenView(engine.tokenizer)
    limits = Limits(max_body_bytes, max_prompts_per_request,
                    max_prompt_chars if max_prompt_chars is not None
                    else PROMPT_CHARS_PER_SEQ_TOKEN * engine.config.max_seq_len, max_waiting)
    if min(max_body_bytes, max_prompts_per_request, limits.max_prompt_chars) < 1 or max_waiting < 0:
        raise ValueError(f"limits must be positive (max_waiting may be 0): {limits}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        aeng.start()
        yield
        aeng.shutdown()

    app = FastAPI(title="flover", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.engine = aeng
    app.state.model_name = name
    app.state.limits = limits
    install_metrics(app, aeng, name)  # GET /metrics (Prometheus), open like /stats

    def count_refusal() -> None:
        aeng.refused += 1

    app.add_middleware(Guard, max_body_bytes=max_body_bytes, api_key=api_key,
                       on_refuse=count_refusal)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status < 500:
            aeng.refused += 1
        return exc.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(exc).response()  # details go to the log, not to the client

    def check_capacity() -> None:
        """429 while max_waiting requests already wait for a slot: refused, never dropped."""
        waiting = aeng.waiting()
        if waiting >= limits.max_waiting:
            raise APIError(429, f"the server is busy: {waiting} requests are waiting for a slot "
                           f"(--max-waiting {limits.max_waiting}); retry later",
                           code="too_many_requests", type="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        aeng.refused += 1
        return JSONResponse(validation_error(exc).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail),
                       type="not_found_error" if exc.status_code == 404 else "invalid_request_error")
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = aeng.alive or not aeng.started  # not started yet: it starts on demand
        if aeng.draining:  # a 503, so that load balancers stop sending requests here
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok" if ok else "engine thread stopped"},
                            status_code=200 if ok else 503)

    @app.get("/stats")
    async def stats() -> dict:
        return aeng.stats()

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        _check_model(body.model, name)
        ids = await asyncio.to_thread(tokenize_request, body, engine, limits)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.config.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        _check_model(body.model, name)
        return {"prompt": await asyncio.to_thread(detokenize_request, body, engine)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(name, engine)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        _check_model(model, name)
        return _model_card(name, engine)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, name)
        check_defaults_only(body)
        check_rows(body, engine)
        check_completion_prompts(body.prompt, limits)
        check_capacity()
        # tokenising may take a while: off the event loop, so /health and streams go on
        prompts = await asyncio.to_thread(completion_prompts, body.prompt, engine)
        echo = await asyncio.to_thread(echo_texts, body.prompt, prompts, engine) \
            if body.echo else None
        lp = body.logprobs
        params = sampling_params(body, body.max_tokens if body.max_tokens is not None else 16, lp,
                                 logprobs_name="logprobs",
                                 prompt_logprobs=lp if body.echo else None)
        return await _serve(Call("cmpl", "text_completion", name, prompts, params, body, view,
                                 echo), aeng, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(body.model, name)
        check_defaults_only(body)
        check_rows(body, engine)
        check_messages(body.messages, limits)
        check_capacity()
        prompt = await asyncio.to_thread(chat_tokens, body.messages, engine)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
        lp = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        if max_tokens is None:  # OpenAI's default: whatever room the context leaves
            max_tokens = max(1, engine.config.max_seq_len - len(prompt))
        params = sampling_params(body, max_tokens, lp, logprobs_name="top_logprobs")
        return await _serve(Call("chatcmpl", "chat.completion", name, [prompt], params, body,
                                 view), aeng, request)

    return app


# --- request -> engine ---------------------------------------------------------------------

def _check_model(model: str | None, name: str) -> None:
    if model is not None and model != name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {name!r}",
                       "model", "model_not_found")


def _model_card(name: str, engine: Engine) -> dict:
    """OpenAI's model object plus vLLM's fields, which some clients read: `root` (the model
    behind the id; here the id itself), `parent` (a fine-tune's base: none) and `permission`."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "flover",
            "root": name, "parent": None, "permission": [],
            "max_model_len": engine.config.max_seq_len}


def check_defaults_only(body: CompletionRequest | ChatRequest) -> None:
    """Refuse, naming the field, what OpenAI accepts but we do not do: a response_format other
    than text, and stream_options without streaming (OpenAI refuses that too)."""
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        raise APIError(400, f"response_format type {fmt.type!r} is not supported; only 'text'",
                       "response_format")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")


def check_rows(body: CompletionRequest | ChatRequest, engine: Engine) -> None:
    """n samples (or beam_width beams) take that many slots at once: more than the engine has
    can never run, so it is a 400 before anything else (n=10**9 included)."""
    rows, param = body.n, "n"
    if body.use_beam_search:
        rows = body.beam_width or body.best_of or body.n
        param = "beam_width" if body.beam_width else "best_of" if body.best_of else "n"
    slots = engine.config.max_concurrency
    if rows > slots:
        raise APIError(400, f"{param}={rows} does not fit: the server runs at most {slots} "
                       f"sequences at once (--max-concurrency)", param)


def _prompt_items(prompt) -> list:
    return [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) \
        else list(prompt)


def check_completion_prompts(prompt, limits: Limits) -> None:
    """Cheap checks before tokenising: how many prompts, and how long each text is."""
    items = _prompt_items(prompt)
    if len(items) > limits.max_prompts_per_request:
        raise APIError(400, f"prompt: {len(items)} prompts in one request; at most "
                       f"{limits.max_prompts_per_request} (--max-prompts-per-request)", "prompt")
    for i, p in enumerate(items):
        if isinstance(p, str):
            _check_chars(p, limits, f"prompt[{i}]" if len(items) > 1 else "prompt", "prompt")


def check_messages(chat: list[ChatMessage], limits: Limits) -> None:
    """The messages' text, all together, must be at most max_prompt_chars (checked before the
    chat template and the tokenizer see it)."""
    total = 0
    for i, m in enumerate(chat):
        text = message_text(i, m)
        _check_unicode(text, f"messages[{i}].content", "messages")
        total += len(text)
        if total > limits.max_prompt_chars:
            raise APIError(400, f"messages: the content is longer than {limits.max_prompt_chars} "
                           f"characters (--max-prompt-chars)", "messages")


def message_text(i: int, m: ChatMessage) -> str:
    """Message i's content as one text: a string, or its content parts (text ones only) joined."""
    content = m.content or ""
    if isinstance(content, list):
        if any(part.get("type") != "text" for part in content):
            raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
        content = "".join(str(part.get("text", "")) for part in content)
    return content


def _check_chars(text: str, limits: Limits, where: str, param: str) -> None:
    """Text to tokenise: within the length limit, and Unicode that has a UTF-8 form (JSON's
    "\\ud800" escapes give lone surrogates, which the tokenizer cannot take)."""
    if len(text) > limits.max_prompt_chars:
        raise APIError(400, f"{where}: {len(text)} characters; at most {limits.max_prompt_chars} "
                       f"(--max-prompt-chars)", param)
    _check_unicode(text, where, param)


def _check_unicode(text: str, where: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{where}: not valid Unicode text (a lone surrogate at character "
                       f"{e.start})", param) from e


def completion_prompts(prompt, engine: Engine) -> list[list[int]]:
    """A prompt: text, token ids, or a list of either -> token ids per prompt."""
    items = _prompt_items(prompt)
    if not items:
        raise APIError(400, "prompt is empty", "prompt")
    out = []
    for p in items:
        if isinstance(p, str):
            if engine.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: pass the prompt as token ids",
                               "prompt")
            p = engine.tokenizer.encode(p)
        if not p:
            raise APIError(400, "prompt is empty", "prompt")
        out.append(list(p))
    return out


def echo_texts(prompt, prompts: list[list[int]], engine: Engine) -> list[str]:
    """echo=true: the text each choice starts with, per prompt. A text prompt is itself; token
    ids are decoded as the completion's tokens are ("" without a tokenizer, as the text)."""
    tok = engine.tokenizer
    return [p if isinstance(p, str) else tok.decode(ids) if tok is not None else ""
            for p, ids in zip(_prompt_items(prompt), prompts, strict=True)]


def chat_tokens(chat: list[ChatMessage], engine: Engine, add_generation_prompt: bool = True,
                add_special_tokens: bool = False) -> list[int]:
    """Messages through the model's chat template -> token ids. The template writes the
    special tokens itself, hence add_special_tokens=False by default."""
    tok = engine.tokenizer
    if tok is None or not tok.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    if not chat:
        raise APIError(400, "messages is empty", "messages")
    messages = [{**(m.model_extra or {}), "role": m.role, "content": message_text(i, m)}
                for i, m in enumerate(chat)]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - the template's own complaint, for this request
        raise APIError(400, f"messages: {e}", "messages") from e
    return tok.encode(text, add_special_tokens=add_special_tokens)


def tokenize_request(body: TokenizeRequest, engine: Engine, limits: Limits) -> list[int]:
    """POST /tokenize: exactly one of prompt and messages, with vLLM's defaults."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages",
                       "prompt" if body.prompt is None else "messages")
    if body.messages is not None:
        check_messages(body.messages, limits)
        gen = body.add_generation_prompt
        return chat_tokens(body.messages, engine, True if gen is None else gen,
                           bool(body.add_special_tokens))
    if body.add_generation_prompt is not None:
        raise APIError(400, "add_generation_prompt applies to messages only",
                       "add_generation_prompt")
    _check_chars(body.prompt, limits, "prompt", "prompt")
    if engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer", "prompt")
    return engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens
                                   is not False)


def detokenize_request(body: DetokenizeRequest, engine: Engine) -> str:
    """POST /detokenize: ids -> text, special tokens kept (as vLLM's); an id the vocabulary
    does not have is a 400 (the tokenizer would skip it silently)."""
    tok = engine.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer", "tokens")
    bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
    if bad:
        raise APIError(400, f"token ids outside the vocabulary [0, {tok.vocab_size}): "
                       f"{bad[:8]}", "tokens")
    return tok.decode(body.tokens, skip_special_tokens=False)


def sampling_params(body, max_tokens: int, logprobs: int | None, logprobs_name: str,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's options as SamplingParams; a bad value is a 400 that names it.
    `prompt_logprobs` (completions' echo with logprobs): the prompt tokens' logprobs too."""
    n = body.n
    beam_width = 1
    if body.use_beam_search:
        beam_width = body.beam_width or body.best_of or n
        if n > beam_width:
            raise APIError(400, f"n={n} is invalid: beam search returns at most beam_width="
                           f"{beam_width} sequences", "n")
        n = 1
    elif body.beam_width not in (None, 1):
        raise APIError(400, "beam_width requires use_beam_search=true", "beam_width")
    elif body.best_of not in (None, body.n):
        raise APIError(400, "best_of different from n is supported only with "
                       "use_beam_search=true", "best_of")
    try:
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    except ValueError as e:
        raise APIError(400, "logit_bias keys must be token ids", "logit_bias") from e
    extra = {"prompt_logprobs": prompt_logprobs} if prompt_logprobs is not None else {}
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0),
            top_p=body.top_p, min_p=body.min_p, seed=body.seed, ignore_eos=body.ignore_eos,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []), min_tokens=body.min_tokens,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logit_bias=bias, n=n,
            beam_width=beam_width, len_penalty=body.length_penalty, logprobs=logprobs,
            **extra)
    except ConfigError as e:
        m = re.match(r"(\w+)=", str(e))
        param = m.group(1) if m else None
        param = logprobs_name if param in ("logprobs", "prompt_logprobs") \
            else _API_NAMES.get(param, param)
        raise APIError(400, str(e), param) from e


def engine_error(e: Exception, prompt_param: str) -> APIError:
    """An error from add_request (or the engine thread) as the API's error."""
    if isinstance(e, RequestError | ConfigError):
        msg = re.sub(r"^request '[^']*': ", "", str(e))  # our internal id means nothing to clients
        param, code = prompt_param, None
        if "max_seq_len" in msg:
            code = "context_length_exceeded"
            param = "max_tokens" if "max_tokens=" in msg else prompt_param
        elif "logit_bias" in msg:
            param = "logit_bias"
        elif "n or beam_width" in msg:
            param = "n"
        return APIError(400, msg, param, code)
    if isinstance(e, QueueTimeoutError):
        return APIError(503, str(e), type="server_error", code=e.code,
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, EngineDeadError):  # code: "server_shutting_down" while draining
        return APIError(503, str(e), type="server_error", code=getattr(e, "code", None))
    return internal_error(e)  # a RequestFailedError or a failed step: its details are logged


def validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}")
    param = loc[0] if loc else None
    where = ".".join(loc)
    if len(where) > MAX_ECHO_CHARS:  # a deeply nested value gives a long path
        where = where[: MAX_ECHO_CHARS - 3] + "..."
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"{where} is not a supported parameter", param)
    if err.get("type") == "missing":
        return APIError(400, f"{where} is required" if where else "a JSON body is required", param)
    return APIError(400, f"{where}: {err.get('msg')} (got {short_repr(err.get('input'))})", param)


# --- engine outputs -> responses -----------------------------------------------------------

@dataclass(slots=True)
class Call:
    """One API call: its prompts, options, and how its response is shaped."""

    prefix: str  # "cmpl" or "chatcmpl"
    object: str  # "text_completion" or "chat.completion"
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    body: CompletionRequest | ChatRequest
    tokens: TokenView
    echo: list[str] | None = None  # completions' echo=true: each prompt's text

    def echoed(self, i: int) -> str:
        """The text that prompt i's choices start with ("" without echo)."""
        return self.echo[i] if self.echo is not None else ""

    @property
    def echo_logprobs(self) -> bool:
        return self.echo is not None and self.params.logprobs is not None

    @property
    def chat(self) -> bool:
        return self.prefix == "chatcmpl"

    @property
    def n(self) -> int:
        return self.body.n


@dataclass(slots=True)
class _Choice:
    """What a streamed choice has sent so far."""

    text: str = ""
    tokens: int = 0
    logprobs: int = 0
    # completions' logprobs: the text of the tokens given logprobs so far, for text_offset
    text_of: IncrementalDetokenizer | None = None
    started: bool = False
    done: bool = False


async def _serve(call: Call, aeng: AsyncEngine, request: Request):
    gen = aeng.generate(call.prompts, call.params, call.prefix)
    prompt_param = "messages" if call.chat else "prompt"
    # the first output (or the request's error) comes before any byte of the answer
    try:
        first = await until_disconnect(request, anext(gen))
    except ClientGone:
        await gen.aclose()
        return JSONResponse({}, status_code=499)
    except StopAsyncIteration:
        first = None
    except Exception as e:  # noqa: BLE001
        await gen.aclose()
        raise engine_error(e, prompt_param) from e
    rid = f"{call.prefix}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if call.body.stream:
        return StreamingResponse(_stream(call, gen, first, rid, created),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def collect() -> dict[int, RequestOutput]:
        last = {first[0]: first[1]} if first else {}
        async for i, out in gen:
            last[i] = out
        return last

    try:
        last = await until_disconnect(request, collect())
    except ClientGone:
        return JSONResponse({}, status_code=499)
    except Exception as e:  # noqa: BLE001
        raise engine_error(e, prompt_param) from e
    finally:
        await gen.aclose()
    return JSONResponse(_response(call, last, rid, created))


async def until_disconnect(request: Request, aw: Awaitable):
    """Await `aw`, or cancel it and raise ClientGone if the client disconnects first."""
    task = asyncio.ensure_future(aw)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone


def _choices(call: Call, i: int, out: RequestOutput) -> list[CompletionOutput]:
    """The outputs of prompt i that the client sees (beam search: the n best)."""
    return out.outputs[: call.n] if call.params.beam_width > 1 else out.outputs


def _response(call: Call, last: dict[int, RequestOutput], rid: str, created: int) -> dict:
    choices = []
    for i in sorted(last):
        for c in _choices(call, i, last[i]):
            choice: dict = {"index": i * call.n + c.index}
            lps = None
            echoed = call.echoed(i)
            if call.params.logprobs is not None:
                lps = _logprobs(call, c.logprobs, _text_of(call), len(c.text), len(echoed))
                if call.echo_logprobs:
                    lps = _joined(_prompt_logprobs(call, i, last[i]), lps)
            if call.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = echoed + c.text
            choice |= {"logprobs": lps, "finish_reason": _reason(c.finish_reason)}
            if call.body.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
    return {"id": rid, "object": call.object, "created": created, "model": call.model,
            "choices": choices, "usage": _usage(call, last)}


def _usage(call: Call, last: dict[int, RequestOutput]) -> dict:
    prompt = sum(len(p) for p in call.prompts)
    completion = sum(len(c.token_ids) for i, out in last.items() for c in _choices(call, i, out))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _reason(reason: str | None) -> str | None:
    return None if reason is None else "length" if reason == "length" else "stop"


async def _stream(call: Call, gen: AsyncIterator, first, rid: str,
                  created: int) -> AsyncIterator[str]:
    state: dict[int, _Choice] = {}
    last: dict[int, RequestOutput] = {}
    stops = StopChecker(call.params.stop) if call.params.stop else None
    usage = call.body.stream_options is not None and call.body.stream_options.include_usage
    head = {"id": rid, "object": f"{call.object}.chunk" if call.chat else call.object,
            "created": created, "model": call.model}

    def chunks(i: int, out: RequestOutput) -> list[str]:
        last[i] = out
        if call.params.beam_width > 1 and not out.finished:
            return []  # beams change until the search ends: send the winners only
        sent = []
        for c in _choices(call, i, out):
            k = i * call.n + c.index
            s = state.setdefault(k, _Choice())
            if s.done:
                continue
            if not s.started and call.echo_logprobs and not out.finished \
                    and not _prompt_done(call, i, out):
                continue  # echo: the first chunk waits for the prompt's logprobs (prefill)
            delta = _delta(s, c, stops)
            echoed = call.echoed(i)
            lps = None
            if call.params.logprobs is not None:
                if s.text_of is None:
                    s.text_of = _text_of(call)
                # offsets stay within the text sent so far: the final text starts with it
                lps = _logprobs(call, c.logprobs[s.logprobs:], s.text_of, len(s.text),
                                len(echoed))
                s.logprobs = len(c.logprobs)
                if call.echo_logprobs and not s.started:
                    lps = _joined(_prompt_logprobs(call, i, out), lps)
            if not s.started:
                delta = echoed + delta  # echo: the first chunk carries the prompt's text
            new_ids = c.token_ids[s.tokens:]
            s.tokens = len(c.token_ids)
            reason = _reason(c.finish_reason)
            s.done = reason is not None
            if not delta and not new_ids and reason is None and s.started:
                continue
            choice: dict = {"index": k}
            if call.chat:
                choice["delta"] = {"content": delta} if s.started else \
                    {"role": "assistant", "content": delta}
            else:
                choice["text"] = delta
            s.started = True
            choice |= {"logprobs": lps, "finish_reason": reason}
            if call.body.return_token_ids:
                choice["token_ids"] = new_ids
            sent.append(_sse({**head, "choices": [choice]} | ({"usage": None} if usage else {})))
        return sent

    try:
        if first is not None:
            for line in chunks(*first):
                yield line
        async for i, out in gen:
            for line in chunks(i, out):
                yield line
        if usage:
            yield _sse({**head, "choices": [], "usage": _usage(call, last)})
    except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
        yield _sse(engine_error(e, "messages" if call.chat else "prompt").body())
    finally:
        await gen.aclose()
    yield "data: [DONE]\n\n"


def _delta(s: _Choice, c: CompletionOutput, stops: StopChecker | None) -> str:
    """The text of choice c not sent yet. While it runs, text that may be the start of a stop
    string is held back, so that the streamed pieces add up to the final text."""
    text = c.text
    if c.finish_reason is None and stops is not None:
        text = text[: len(text) - stops.held_back(text)]
    if not text.startswith(s.text):
        return ""
    delta, s.text = text[len(s.text):], text
    return delta


def _text_of(call: Call) -> IncrementalDetokenizer | None:
    """A detokenizer like the engine's (same tokenizer and settings), so that the text it
    builds is the choice's text, for completions' text_offset."""
    tok = call.tokens.tokenizer
    return IncrementalDetokenizer(tok) if tok is not None and not call.chat else None


def _logprobs(call: Call, entries: list[dict], text_of: IncrementalDetokenizer | None,
              text_len: int, base: int = 0) -> dict:
    """The engine's per-token logprobs in the shape of the API that was called.

    Chat: each token's text and raw bytes (see TokenView), with its k best alternatives.
    Completions (OpenAI's legacy form): `top_logprobs` holds the k best and always the sampled
    token (k + 1 entries when it is not among them; logprobs=0 gives it alone); `text_offset`
    is where each token starts in the returned text: the length of the text the tokens before
    it completed (`text_of` is fed the entries' tokens as it goes), at most `text_len`, since a
    stop string may cut the text before tokens that were generated. A token that finishes a
    character begun by earlier ones starts where that character does. `base`: where the text
    starts in the choice's text (after the echoed prompt).
    """
    view = call.tokens
    if call.chat:
        def item(tid: int, lp: float) -> dict:
            return {"token": view.text(tid), "logprob": lp, "bytes": view.bytes(tid)}
        return {"content": [item(e["token_id"], e["logprob"]) |
                            {"top_logprobs": [item(t, v) for t, v in e["top_logprobs"]]}
                            for e in entries]}
    tokens, offsets, tops = [], [], []
    for e in entries:
        tid = e["token_id"]
        tokens.append(view.text(tid))
        offsets.append(base + (min(text_of.text_len, text_len) if text_of is not None else 0))
        if text_of is not None:
            text_of.append([tid])
        top = {view.text(t): v for t, v in e["top_logprobs"]}
        if all(t != tid for t, _ in e["top_logprobs"]):
            top.setdefault(tokens[-1], e["logprob"])  # (a different token may decode the same)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def _prompt_done(call: Call, i: int, out: RequestOutput) -> bool:
    """Whether `out` holds prompt i's logprobs (the engine has them once prefill is done)."""
    got = out.prompt_logprobs
    return got is not None and len(got) == len(call.prompts[i])


def _prompt_logprobs(call: Call, i: int, out: RequestOutput) -> dict:
    """Echo with logprobs: prompt i's tokens in completions' logprobs shape. The first token
    has no logprob: its token_logprobs and top_logprobs entries are None, as OpenAI's.
    text_offset is over the echoed prompt text (a text prompt as the client sent it)."""
    ids = call.prompts[i]
    got = out.prompt_logprobs or []
    text_of, text_len = _text_of(call), len(call.echoed(i))
    tokens, lps, tops, offsets = [], [], [], []
    for j, tid in enumerate(ids):
        e = got[j] if j < len(got) else None
        if e is None:
            tokens.append(call.tokens.text(tid))
            lps.append(None)
            tops.append(None)
            offsets.append(min(text_of.text_len, text_len) if text_of is not None else 0)
            if text_of is not None:
                text_of.append([tid])
            continue
        one = _logprobs(call, [e], text_of, text_len)
        tokens += one["tokens"]
        lps += one["token_logprobs"]
        tops += one["top_logprobs"]
        offsets += one["text_offset"]
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def _joined(first: dict, then: dict) -> dict:
    return {k: first[k] + then[k] for k in first}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
