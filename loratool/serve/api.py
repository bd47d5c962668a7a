"""The OpenAI-compatible HTTP API over the built-in engine (FastAPI).

Routes: GET /health (no key needed), GET /v1/models, POST /v1/chat/completions, POST /v1/completions, and
vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter. A request's `model` picks the adapter (or the
base). Chat messages are rendered exactly as `loratool generate` renders a prompt (generate.run.render_for:
the adapter's own chat template, the system prompt it was trained with unless the request sends one, tool
definitions through the template); stops are generate's (EOS, the template's end of turn) plus the
request's `stop`. `stream: true` answers as server-sent events, OpenAI's chunks ending in `data: [DONE]`.

Errors have OpenAI's body ({"error": {"message", "type", "param", "code"}}) and status: 400 for a bad or
unsupported request (a prompt too long for the context says both numbers), 401 without the API key, 404 for
an unknown model, 413 for a body over the limit, 429 when the queue is full, 503 while shutting down.

Guard, the ASGI layer around the app, checks the key, bounds the body before anything parses it, and writes
one access-log line per request (client, method and path, status, model, tokens, seconds).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from loratool.data.templates import renders_tools
from loratool.errors import LoratoolError
from loratool.generate.run import BASE, render_for
from loratool.serve.answers import Pieces, chat_text, completion_text, tool_calls
from loratool.serve.engine import Engine, Job
from loratool.serve.http_errors import ApiError
from loratool.serve.served import Served

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int = (
        1024  # new tokens per request (--max-tokens); also the default when a request names none
    )
    max_body_bytes: int = 1 << 20  # a request body (--max-body); 1 MiB holds a long conversation
    max_prompts: int = 16  # prompts in one /v1/completions request


# --- the request bodies (OpenAI's fields; others are accepted and ignored, as OpenAI-compatible servers do) --


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class GenerationFields(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's default is 1; 0 is greedy
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)  # a list after validation
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    ignore_eos: bool = False  # vLLM's extension: go on past the end-of-answer tokens (benchmarks)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not stop or len(stop) > 256 for stop in stops):
            raise ValueError("each stop sequence must hold 1 to 256 characters")
        return stops


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str
    lora_path: str


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str


# --- the app -------------------------------------------------------------------------------------------------


def build_app(
    served: Served,
    engine: Engine,
    *,
    limits: Limits,
    api_key: str | None = None,
    log: Callable[[str], None] = print,
    on_start: Callable[[], None] = lambda: None,
) -> Any:
    """The ASGI app: FastAPI routes inside Guard. The engine starts with the app and stops with it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        on_start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="loratool serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _error_handlers(app, log)
    adapters_lock = asyncio.Lock()  # one adapter load or unload at a time
    started = int(time.time())

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "draining" if engine.draining else "failed" if engine.failed else "ok"
        body = {"status": status, "engine": "builtin", "models": served.names, **engine.stats()}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    def model_card(name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": served.created.get(name, started),
            "owned_by": "loratool",
            "root": served.root_of(name),
            "parent": None if name == served.base_name else served.base_name,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in served.names]}

    @app.get("/v1/models/{model:path}")
    async def one_model(model: str) -> dict[str, Any]:
        served.resolve(model)
        return model_card(model)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        request.state.model = body.model
        name = served.resolve(body.model)
        _refuse_unsupported(body)
        if body.tool_choice not in (None, "auto", "none"):
            raise ApiError(400, "tool_choice: only \"auto\" and \"none\" are supported (the model decides whether "
                           "to call a tool)", param="tool_choice")  # fmt: skip
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ApiError(
                400, 'response_format: only {"type": "text"} is supported', param="response_format"
            )
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        prompting = served.prompting(name)
        if tools:
            if not (prompting.tokenizer.chat_template and renders_tools(prompting.tokenizer)):
                raise ApiError(400, f"tools: {body.model} is prompted with {prompting.origin}, which does not "
                               "write tool definitions into the prompt", param="tools")  # fmt: skip
        if not prompting.tokenizer.chat_template:
            raise ApiError(400, f"{body.model} has no chat template, so it cannot answer a conversation: use "
                           "/v1/completions with a text prompt", param="model")  # fmt: skip
        system, history = _conversation(body.messages)
        try:
            ids = render_for(served.adapters, name, history, system, tools)
        except LoratoolError as exc:
            raise ApiError(400, exc.message, param="messages") from None
        budget = _budget(served, limits, len(ids), body.max_completion_tokens or body.max_tokens)
        job = _job(name, ids, budget, body, prompting)
        answer = _Answer(engine, served, request, body, name, tools=bool(tools), chat=True)
        return await answer.respond([job])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        request.state.model = body.model
        name = served.resolve(body.model)
        _refuse_unsupported(body)
        if body.echo or body.suffix or (body.best_of or 1) > 1:
            raise ApiError(400, "echo, suffix and best_of are not supported", param="echo")
        prompting = served.prompting(name)
        if isinstance(body.prompt, str) or (body.prompt and all(isinstance(p, int) for p in body.prompt)):
            prompts: list[Any] = [body.prompt]
        else:
            prompts = list(body.prompt)
        if not prompts or len(prompts) > limits.max_prompts:
            raise ApiError(
                400, f"prompt: send 1 to {limits.max_prompts} prompts, got {len(prompts)}", param="prompt"
            )
        if body.stream and len(prompts) > 1:
            raise ApiError(400, "prompt: a streamed completion takes one prompt", param="prompt")
        jobs = []
        vocabulary = served.adapters.model.get_input_embeddings().num_embeddings
        for prompt in prompts:
            ids = prompting.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise ApiError(400, "prompt: empty (no tokens)", param="prompt")
            if any(not 0 <= i < vocabulary for i in ids):
                raise ApiError(400, f"prompt: token ids must lie in 0..{vocabulary - 1}", param="prompt")
            budget = _budget(served, limits, len(ids), body.max_tokens, what="prompt")
            jobs.append(_job(name, ids, budget, body, prompting))
        answer = _Answer(engine, served, request, body, name, tools=False, chat=False)
        return await answer.respond(jobs)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapter, request: Request) -> PlainTextResponse:
        request.state.model = body.lora_name
        async with adapters_lock:
            adapter_dir = await asyncio.to_thread(served.check_new, body.lora_name, body.lora_path)
            try:
                ms = await asyncio.wrap_future(engine.call(lambda: served.add(body.lora_name, adapter_dir)))
            except (RuntimeError, ValueError, KeyError) as exc:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise ApiError(400, f"adapter {body.lora_name} does not fit the base: {first}",
                               param="lora_path", code="adapter_refused") from None  # fmt: skip
        log(f"adapter {body.lora_name} loaded from {adapter_dir} in {ms:.0f} ms")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapter, request: Request) -> PlainTextResponse:
        name = body.lora_name
        request.state.model = name
        async with adapters_lock:
            if name in (BASE, served.base_name):
                raise ApiError(400, f"{name} is the base model, which stays loaded", param="lora_name")
            if name not in served.adapters.names or name in served.retiring:
                raise ApiError(404, f"no adapter named {name!r} is loaded (serving {', '.join(served.names)})",
                               param="lora_name", code="model_not_found")  # fmt: skip
            served.retiring.add(name)  # new requests no longer get it; the ones it is answering finish first
            try:
                await asyncio.wrap_future(
                    engine.call(lambda: served.remove(name), ready=lambda: not engine.uses(name))
                )
            except BaseException:
                served.retiring.discard(name)
                raise
        log(f"adapter {name} unloaded")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return Guard(app, api_key=api_key, max_body_bytes=limits.max_body_bytes, log=log)


def _error_handlers(app: FastAPI, log: Callable[[str], None]) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        where = [".".join(str(part) for part in e.get("loc", ()) if part != "body") for e in errors]
        message = "; ".join(f"{w or 'body'}: {e.get('msg')}" for w, e in zip(where, errors, strict=True))
        error = ApiError(
            400, message[:1000] or "invalid request", param=where[0] if where and where[0] else None
        )
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(LoratoolError)
    async def loratool_error(_: Request, exc: LoratoolError) -> JSONResponse:
        message = exc.message + (f" ({exc.hint})" if exc.hint else "")
        return JSONResponse(ApiError(400, message).body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log(f"error: {type(exc).__name__}: {exc}\n{traceback.format_exc().rstrip()}")
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}")
        return JSONResponse(error.body(), status_code=500)


# --- one request's answer ------------------------------------------------------------------------------------


def _refuse_unsupported(body: GenerationFields) -> None:
    if body.n != 1:
        raise ApiError(400, "n: this server answers with one choice per request", param="n")
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(body, field):
            raise ApiError(400, f"{field} is not supported (send 0 or leave it out)", param=field)


def _conversation(messages: list[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    """The request's system message (None: the adapter gets the one it was trained with) and the rest, as
    chat templates read them (a tool call's JSON arguments as an object)."""
    turns = [_turn(m) for m in messages]
    if turns[0]["role"] == "system":
        return turns[0]["content"], turns[1:]
    return None, turns


def _turn(message: Message) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        other = sorted({part.type for part in content if part.type != "text"})
        if other:
            raise ApiError(400, f"messages: content of type {', '.join(other)} is not supported (text only)",
                           param="messages")  # fmt: skip
        content = "".join(part.text or "" for part in content)
    turn: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                            "content": content or ""}  # fmt: skip
    if message.tool_calls:
        turn["tool_calls"] = [_tool_call_in(call) for call in message.tool_calls]
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    if message.name:
        turn["name"] = message.name
    return turn


def _tool_call_in(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # the template prints the string as it is
    return {"type": "function", "function": function, **({"id": call["id"]} if "id" in call else {})}


def _budget(served: Served, limits: Limits, prompt: int, asked: int | None, what: str = "messages") -> int:
    """The new tokens a request gets: what it asked for, at most the server's limit and what the context
    leaves; too long a prompt is refused with both numbers, as OpenAI words it."""
    if asked is not None and asked > limits.max_tokens:
        raise ApiError(400, f"max_tokens {asked} is above this server's limit of {limits.max_tokens} new tokens per "
                       "request", param="max_tokens")  # fmt: skip
    context = served.adapters.loaded.context
    room = context - prompt if context is not None else limits.max_tokens
    wanted = asked if asked is not None else max(1, min(limits.max_tokens, room))
    if context is not None and prompt + wanted > context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt + wanted} tokens ({prompt} in the {what}, {wanted} in the completion). Please reduce the "
            f"length of the {what} or completion.",
            param=what,
            code="context_length_exceeded",
        )
    return wanted


def _job(name: str, ids: list[int], budget: int, body: GenerationFields, prompting: Any) -> Job:
    temperature = 1.0 if body.temperature is None else body.temperature
    return Job(
        adapter=name,
        prompt=ids,
        max_tokens=budget,
        stop_ids=frozenset() if body.ignore_eos else frozenset(prompting.stop_ids),
        tokenizer=prompting.tokenizer,
        stop_texts=(*prompting.stop_texts, *body.stop),
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        every_step=body.stream,  # a whole answer is read once it is finished
    )


class _Events:
    """A job's steps, from the engine's thread to this request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[list[int], str | None]] = asyncio.Queue()

    def __call__(self, tokens: list[int], finish: str | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (tokens, finish))
        except RuntimeError:  # the loop has closed: the server is gone and nobody listens
            pass

    async def next(self) -> tuple[list[int], str | None]:
        """The ids of every step queued so far, and the finish reason if one of them finished."""
        tokens, finish = await self.queue.get()
        tokens = list(tokens)
        while finish is None and not self.queue.empty():
            more, finish = self.queue.get_nowait()
            tokens += more
        return tokens, finish


class _Answer:
    """Runs a request's jobs on the engine and writes the OpenAI answer, whole or streamed."""

    def __init__(
        self,
        engine: Engine,
        served: Served,
        request: Request,
        body: Any,
        name: str,
        *,
        tools: bool,
        chat: bool,
    ) -> None:
        self.engine, self.served, self.request, self.body = engine, served, request, body
        self.name, self.tools, self.chat = name, tools, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompting = served.prompting(name)

    async def respond(self, jobs: list[Job]) -> Any:
        events = [_Events() for _ in jobs]
        for job, listener in zip(jobs, events, strict=True):
            job.listener = listener
        submitted: list[Job] = []
        try:
            for job in jobs:
                self.engine.submit(job)
                submitted.append(job)
        except ApiError:
            for job in submitted:
                self.engine.cancel(job)
            raise
        if self.body.stream:
            return StreamingResponse(self._stream(jobs[0], events[0]), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            await asyncio.gather(
                *(self._wait(job, listener) for job, listener in zip(jobs, events, strict=True))
            )
        finally:
            for job in jobs:
                if job.finish is None:
                    self.engine.cancel(job)
                    self.request.state.gone = True
        return self._whole(jobs)

    async def _wait(self, job: Job, events: _Events) -> None:
        while True:
            try:
                _, finish = await asyncio.wait_for(events.next(), timeout=0.5)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():  # nobody waits for this answer any more
                    self.engine.cancel(job)
                    self.request.state.gone = True
                    return
                continue
            if finish is not None:
                return

    def _texts(self, job: Job) -> tuple[str | None, list[dict[str, Any]], str]:
        """The answer's content, its tool calls and OpenAI's finish_reason."""
        _refuse_failed(job)
        stops = list(self.prompting.stop_texts) + list(self.body.stop)
        if not self.chat:
            return completion_text(self.prompting.tokenizer, job.ids, stops), [], job.finish or "stop"
        text = chat_text(self.prompting.tokenizer, job.ids, stops)
        content, calls = tool_calls(text) if self.tools else (text, [])
        return content, calls, "tool_calls" if calls else (job.finish or "stop")

    def _usage(self, jobs: list[Job]) -> dict[str, int]:
        prompt, completion = sum(len(j.prompt) for j in jobs), sum(len(j.ids) for j in jobs)
        self.request.state.usage = (prompt, completion)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _whole(self, jobs: list[Job]) -> dict[str, Any]:
        choices = []
        for index, job in enumerate(jobs):
            content, calls, finish = self._texts(job)
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                choices.append(
                    {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
                )
            else:
                choices.append({"index": index, "text": content, "logprobs": None, "finish_reason": finish})
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": self._usage(jobs),
        }

    def _chunk(self, delta: dict[str, Any] | str | None, finish: str | None = None) -> str:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return _sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": self.created, "model": self.body.model, "system_fingerprint": None,
                     "choices": [choice]})  # fmt: skip

    def _piece(self, text: str) -> str:
        return self._chunk({"content": text} if self.chat else text)

    async def _stream(self, job: Job, events: _Events) -> AsyncIterator[str]:
        stops = list(self.prompting.stop_texts) + list(self.body.stop)
        pieces = Pieces(self.prompting.tokenizer, stops, chat=self.chat, tools=self.tools)
        ids: list[int] = []
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""})
            while True:
                tokens, finish = await events.next()
                ids += tokens
                if finish is None:
                    piece = pieces.add(ids)
                    if piece:
                        yield self._piece(piece)
                    continue
                try:
                    content, calls, reason = self._texts(job)
                except ApiError as exc:  # mid-stream: the error is an event, as OpenAI and vLLM send it
                    self._usage([job])
                    self.request.state.ended = exc.code or exc.status
                    yield _sse(exc.body())
                    yield DONE
                    return
                rest = pieces.last(content or "")
                if rest:
                    yield self._piece(rest)
                if calls:
                    yield self._chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
                yield self._chunk({} if self.chat else "", reason)
                usage = self._usage([job])
                options = self.body.stream_options
                if options is not None and options.include_usage:
                    yield _sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                                "created": self.created, "model": self.body.model, "choices": [],
                                "usage": usage})  # fmt: skip
                yield DONE
                return
        finally:
            if job.finish is None:  # the client went away (the response was cancelled): free the slot
                self.engine.cancel(job)
                self.request.state.gone = True
                self.request.state.usage = (len(job.prompt), len(job.ids))


def _refuse_failed(job: Job) -> None:
    if job.finish == "error":
        raise ApiError(500, job.error or "generation failed", code="generation_failed")
    if job.finish == "shutdown":
        raise ApiError(503, f"the server shut down before this answer was finished ({len(job.ids)} tokens "
                       "generated)", code="shutting_down")  # fmt: skip
    if job.finish == "cancelled":
        raise ApiError(503, "the request was cancelled", code="cancelled")


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# --- the guard around the app --------------------------------------------------------------------------------

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Guard:
    """ASGI middleware: the API key on every route but /health, the request body bounded (read whole, up
    to the limit, before the app parses it), and one access-log line per request."""

    def __init__(
        self, app: Any, *, api_key: str | None, max_body_bytes: int, log: Callable[[str], None]
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[int | None] = [None]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"] != "/health" and not self._authorized(scope):
                error = ApiError(401, "missing or wrong API key: send it as the header `Authorization: Bearer KEY`",
                                 code="invalid_api_key")  # fmt: skip
                await _send_error(sending, error)
                return
            body = await self._body(scope, receive)
            if body is None:
                error = ApiError(413, f"the request body is over this server's limit of {self.max_body_bytes} bytes",
                                 code="request_too_large")  # fmt: skip
                await _send_error(sending, error)
                return
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: the disconnect, when the client goes

            await self.app(scope, replay, sending)
        finally:
            self._access_log(scope, status[0], started)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    async def _body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole request body, or None when it is over the limit (by its Content-Length or as read)."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away before sending it all
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _access_log(self, scope: Scope, status: int | None, started: float) -> None:
        state = scope.get("state") or {}
        client = scope.get("client")
        line = (
            f'{client[0] if client else "-"} "{scope.get("method")} {scope.get("path")}" {status or "-"} '
            f"{state.get('model', '-')}"
        )
        usage = state.get("usage")
        if usage:
            line += f" {usage[0]}+{usage[1]} tokens"
        line += f" {time.perf_counter() - started:.2f}s"
        if state.get("gone"):
            line += " (client went away)"
        elif state.get("ended"):
            line += f" (ended: {state['ended']})"
        self.log(line)


async def _send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
