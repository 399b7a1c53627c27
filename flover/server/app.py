"""The OpenAI-compatible HTTP API: an ASGI app (FastAPI) over an AsyncEngine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with SSE
streaming), GET /health, GET /stats, and vLLM's POST /tokenize, POST /detokenize and
GET /version. A bad request gets a 400 with OpenAI's error body and
touches no other request; a client that goes away mid-generation frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
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
from flover.server.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from flover.server.protocol import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from flover.server.tokens import TokenView

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# SamplingParams' field names where the API calls them otherwise
_API_NAMES = {"len_penalty": "length_penalty"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


def model_name_of(model: str | None) -> str:
    """The id the server answers to: a preset's name, a checkpoint's folder or file name."""
    if model is None:
        return DEFAULT_MODEL_NAME
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else (p.name or model)


def create_app(engine: Engine, model_name: str | None = None) -> FastAPI:
    """The ASGI app. Its engine thread starts with the app (or at the first request) and
    stops with it."""
    name = model_name or model_name_of(engine.config.model)
    aeng = AsyncEngine(engine)
    view = TokenView(engine.tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        aeng.start()
        yield
        aeng.shutdown()

    app = FastAPI(title="flover", lifespan=lifespan)
    app.state.engine = aeng
    app.state.model_name = name

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status < 500:
            aeng.refused += 1
        return JSONResponse(exc.body(), status_code=exc.status)

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
        ids = tokenize_request(body, engine)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.config.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        _check_model(body.model, name)
        return {"prompt": detokenize_request(body, engine)}

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
        prompts = completion_prompts(body.prompt, engine)
        lp = body.logprobs
        params = sampling_params(body, body.max_tokens if body.max_tokens is not None else 16, lp,
                                 logprobs_name="logprobs")
        return await _serve(Call("cmpl", "text_completion", name, prompts, params, body, view),
                            aeng, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(body.model, name)
        check_defaults_only(body)
        prompt = chat_tokens(body.messages, engine)
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
    than text, echo=true, and stream_options without streaming (OpenAI refuses that too)."""
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        raise APIError(400, f"response_format type {fmt.type!r} is not supported; only 'text'",
                       "response_format")
    if isinstance(body, CompletionRequest) and body.echo:
        raise APIError(400, "echo=true is not supported", "echo")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")


def completion_prompts(prompt, engine: Engine) -> list[list[int]]:
    """A prompt: text, token ids, or a list of either -> token ids per prompt."""
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) \
        else list(prompt)
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


def chat_tokens(chat: list[ChatMessage], engine: Engine, add_generation_prompt: bool = True,
                add_special_tokens: bool = False) -> list[int]:
    """Messages through the model's chat template -> token ids. The template writes the
    special tokens itself, hence add_special_tokens=False by default."""
    tok = engine.tokenizer
    if tok is None or not tok.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    if not chat:
        raise APIError(400, "messages is empty", "messages")
    messages = []
    for i, m in enumerate(chat):
        content = m.content or ""
        if isinstance(content, list):  # content parts: only text ones
            if any(part.get("type") != "text" for part in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               "messages")
            content = "".join(str(part.get("text", "")) for part in content)
        messages.append({**(m.model_extra or {}), "role": m.role, "content": content})
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - the template's own complaint, for this request
        raise APIError(400, f"messages: {e}", "messages") from e
    return tok.encode(text, add_special_tokens=add_special_tokens)


def tokenize_request(body: TokenizeRequest, engine: Engine) -> list[int]:
    """POST /tokenize: exactly one of prompt and messages, with vLLM's defaults."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages",
                       "prompt" if body.prompt is None else "messages")
    if body.messages is not None:
        gen = body.add_generation_prompt
        return chat_tokens(body.messages, engine, True if gen is None else gen,
                           bool(body.add_special_tokens))
    if body.add_generation_prompt is not None:
        raise APIError(400, "add_generation_prompt applies to messages only",
                       "add_generation_prompt")
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


def sampling_params(body, max_tokens: int, logprobs: int | None, logprobs_name: str) -> SamplingParams:
    """The request's options as SamplingParams; a bad value is a 400 that names it."""
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
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0),
            top_p=body.top_p, min_p=body.min_p, seed=body.seed, ignore_eos=body.ignore_eos,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []), min_tokens=body.min_tokens,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logit_bias=bias, n=n,
            beam_width=beam_width, len_penalty=body.length_penalty, logprobs=logprobs)
    except ConfigError as e:
        m = re.match(r"(\w+)=", str(e))
        param = m.group(1) if m else None
        param = logprobs_name if param == "logprobs" else _API_NAMES.get(param, param)
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
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), type="server_error")
    if isinstance(e, RequestFailedError):
        return APIError(500, f"the request failed: {e}", type="server_error")
    return APIError(500, f"the engine failed: {type(e).__name__}: {e}", type="server_error")


def validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}")
    param = loc[0] if loc else None
    where = ".".join(loc)
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"{where} is not a supported parameter", param)
    if err.get("type") == "missing":
        return APIError(400, f"{where} is required" if where else "a JSON body is required", param)
    return APIError(400, f"{where}: {err.get('msg')} (got {err.get('input')!r})", param)


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
            if call.params.logprobs is not None:
                lps = _logprobs(call, c.logprobs, _text_of(call), len(c.text))
            if call.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
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
            delta = _delta(s, c, stops)
            lps = None
            if call.params.logprobs is not None:
                if s.text_of is None:
                    s.text_of = _text_of(call)
                # offsets stay within the text sent so far: the final text starts with it
                lps = _logprobs(call, c.logprobs[s.logprobs:], s.text_of, len(s.text))
                s.logprobs = len(c.logprobs)
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
              text_len: int) -> dict:
    """The engine's per-token logprobs in the shape of the API that was called.

    Chat: each token's text and raw bytes (see TokenView), with its k best alternatives.
    Completions (OpenAI's legacy form): `top_logprobs` holds the k best and always the sampled
    token (k + 1 entries when it is not among them; logprobs=0 gives it alone); `text_offset`
    is where each token starts in the returned text: the length of the text the tokens before
    it completed (`text_of` is fed the entries' tokens as it goes), at most `text_len`, since a
    stop string may cut the text before tokens that were generated. A token that finishes a
    character begun by earlier ones starts where that character does.
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
        offsets.append(min(text_of.text_len, text_len) if text_of is not None else 0)
        if text_of is not None:
            text_of.append([tid])
        top = {view.text(t): v for t, v in e["top_logprobs"]}
        if all(t != tid for t, _ in e["top_logprobs"]):
            top.setdefault(tokens[-1], e["logprob"])  # (a different token may decode the same)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
