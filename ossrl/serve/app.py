"""The OpenAI-compatible HTTP API (FastAPI) over an :class:`~ossrl.serve.loop.EngineLoop`.

``GET /v1/models``, ``POST /v1/chat/completions`` (Harmony rendering and parsing, tools, reasoning, streaming),
``POST /v1/completions`` (raw text in, text out), plus ``GET /health`` and ``GET /stats`` (the engine's counters).
Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a request that cannot be
served as asked, 429 when too many requests already wait for the engine, 503 when the engine is not running. A
client that goes away cancels its sequences (streaming or not). Tool calls are returned, never run.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from ossrl.harmony import REASONING_EFFORTS, render_conversation
from ossrl.rollout import Request, SamplingParams
from ossrl.serve.loop import EngineLoop, Event, Overloaded, Ticket, Unavailable
from ossrl.serve.mapping import (
    ChatMessage,
    Delta,
    Detokenizer,
    HarmonyDecoder,
    RequestError,
    StopStrings,
    harmony_conversation,
    harmony_tools,
)

SEED_RANGE = 2**31  # a request's seed is taken modulo this (the sampler mixes it into 64-bit hashes)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(err: RequestError) -> APIError:
    return APIError(400, err.message, param=err.param, code=err.code)


# ---- request bodies (unknown fields are ignored, as OpenAI does) -------------------------------------------------
class _Params(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's: vLLM's extension, as are min_p
    min_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None


class ChatCompletionRequest(_Params):
    messages: list[Any]
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Params):
    prompt: Any  # a string, strings, token ids or lists of token ids (checked by prompt_token_ids)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


def _parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None) from None


async def _json(request: HTTPRequest) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request. (The OpenAI API expects a JSON "
                       "payload.)") from None  # fmt: skip


# ---- one API call's samples: tickets on the engine loop, events on an asyncio queue ------------------------------
class Submission:
    """The engine requests of one API call (one per prompt, its n samples each) and their events, as
    ``(choice index, Event)`` in the event loop. ``close`` cancels whatever is still running."""

    def __init__(self, loop: EngineLoop, jobs: Sequence[tuple[Request, SamplingParams]]) -> None:
        self.loop = loop
        self.aloop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[tuple[int, Event]]] = asyncio.Queue()
        self.tickets: list[tuple[Ticket, int]] = []  # (ticket, its first choice index)
        self.open = set(range(sum(r.n for r, _ in jobs)))
        offset = 0
        try:
            for key, (request, sampling) in enumerate(jobs):
                ticket = loop.submit(request, sampling, partial(self._deliver, offset), seed_key=key)
                self.tickets.append((ticket, offset))
                offset += request.n
        except (Overloaded, Unavailable):
            self.close()
            raise

    def _deliver(self, offset: int, events: list[Event]) -> None:  # the engine thread
        try:
            self.aloop.call_soon_threadsafe(self.queue.put_nowait, [(offset + e.sample, e) for e in events])
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        while self.open:
            for choice, event in await self.queue.get():
                if choice in self.open:
                    if event.finish is not None:
                        self.open.discard(choice)
                    yield choice, event

    def stop(self, choice: int) -> None:
        """Stop one sample early (a stop string): cancel it in the engine."""
        if choice in self.open:
            self.open.discard(choice)
            ticket, offset = next((t, o) for t, o in reversed(self.tickets) if o <= choice)
            self.loop.cancel(ticket, choice - offset)

    def close(self) -> None:
        if self.open:
            for ticket, _ in self.tickets:
                self.loop.cancel(ticket)
            self.open.clear()


async def until_disconnect(request: HTTPRequest, work: Awaitable[Any]) -> Any:
    """``await work``, unless the client disconnects first: then ``work`` is cancelled and None returned."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    await asyncio.gather(task, return_exceptions=True)  # let the cancellation run: its cleanup cancels the sequences
    return None


# ---- per choice ----------------------------------------------------------------------------------------------------
class ChatChoice:
    """One sample of a chat completion: its tokens through the Harmony decoder and the stop strings."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.decoder = HarmonyDecoder(tokenizer)
        self.stops = StopStrings(stops) if stops else None
        self.message = ChatMessage()
        self.tokens = 0
        self.finish: str | None = None
        self.error: str | None = None

    def on(self, event: Event) -> list[Delta]:
        deltas: list[Delta] = []
        if event.token is not None:
            self.tokens += 1
            deltas += self.decoder.feed(event.token)
        if event.finish is not None:
            deltas += self.decoder.finish()
        if self.stops is not None:
            deltas = self._stop(deltas, final=event.finish is not None)
        if self.stops is not None and self.stops.stopped:
            self.finish = "stop"
        elif event.finish == "error":
            self.finish, self.error = "error", event.error
        elif event.finish is not None:
            self.finish = {"length": "length"}.get(event.finish, "tool_calls" if self.decoder.tool_call else "stop")
        for delta in deltas:
            self.message.add(delta)
        return deltas

    def _stop(self, deltas: list[Delta], final: bool) -> list[Delta]:
        out = []
        for delta in deltas:
            if delta.kind == "content":
                delta = Delta("content", self.stops.feed(delta.text))
                if self.stops.stopped:
                    out += [delta] if delta.text else []
                    return out
            if delta.text or delta.kind == "tool_call":
                out.append(delta)
        if final:
            rest = self.stops.flush()
            out += [Delta("content", rest)] if rest else []
        return out


class TextChoice:
    """One sample of a text completion: its tokens as text (the stop token left out) through the stop strings."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], stop_ids: set[int], prefix: str = "") -> None:
        self.text = Detokenizer(tokenizer)
        self.stops = StopStrings(stops) if stops else None
        self.stop_ids = stop_ids
        self.prefix = prefix  # echo: the prompt's text
        self.tokens = 0
        self.finish: str | None = None
        self.error: str | None = None
        self.output = ""

    def on(self, event: Event) -> str:
        piece, self.prefix = self.prefix, ""
        if event.token is not None:
            self.tokens += 1
            if event.token not in self.stop_ids:
                piece += self.text.add(event.token)
        if event.finish is not None:
            piece += self.text.flush()
        if self.stops is not None:
            piece = self.stops.feed(piece)
            if self.stops.stopped:
                self.finish = "stop"
            elif event.finish is not None:
                piece += self.stops.flush()
        if self.finish is None and event.finish is not None:
            self.finish = "length" if event.finish == "length" else event.finish if event.finish == "error" else "stop"
            self.error = event.error
        self.output += piece
        return piece


# ---- the app -----------------------------------------------------------------------------------------------------
def create_app(
    loop: EngineLoop,
    tokenizer: Any,
    *,
    model_name: str,
    default_max_tokens: int = 4096,
    reasoning_effort: str = "medium",
    current_date: str | None = "today",
) -> FastAPI:
    """The FastAPI app serving ``loop``'s engine as ``model_name``. ``default_max_tokens``: completion tokens of a
    request that sets none (capped by what the context leaves). ``reasoning_effort``: when a request sets none."""
    engine = loop.engine
    created = int(time.time())
    app = FastAPI(title="ossrl", description="OpenAI-compatible API on the ossrl rollout engine")
    app.state.loop = loop
    stop_tokens = set(engine.default_stop_ids())
    if engine.harmony is not None and engine.harmony.endoftext is not None:
        stop_tokens.add(engine.harmony.endoftext)

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: HTTPRequest, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(err)), status_code=400)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(400, f"The model `{name}` does not exist; this server serves `{model_name}`.",
                           param="model", code="model_not_found")  # fmt: skip

    def sampling(body: _Params, prompt_lens: list[int], max_tokens: int | None, stop_ids: list[int] | None,
                 prompt_param: str) -> SamplingParams:  # fmt: skip
        n = 1 if body.n is None else body.n
        if n < 1:
            raise APIError(400, f"n must be at least 1; got {n}", param="n", code="invalid_value")
        if n > engine.max_num_seqs:
            raise APIError(400, f"n must be at most {engine.max_num_seqs} on this server; got {n}", param="n",
                           code="invalid_value")  # fmt: skip
        temperature = 1.0 if body.temperature is None else body.temperature
        if not 0 <= temperature <= 2:
            raise APIError(400, f"temperature must be in [0, 2]; got {temperature}", param="temperature",
                           code="invalid_value")  # fmt: skip
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0 < top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1]; got {top_p}", param="top_p", code="invalid_value")
        top_k = 0 if body.top_k in (None, -1) else body.top_k
        if top_k < 0:
            raise APIError(400, f"top_k must be >= 0 (or -1: off); got {top_k}", param="top_k", code="invalid_value")
        min_p = 0.0 if body.min_p is None else body.min_p
        if not 0 <= min_p < 1:
            raise APIError(400, f"min_p must be in [0, 1); got {min_p}", param="min_p", code="invalid_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_value")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_value")  # fmt: skip
        context, longest = engine.max_model_len, max(prompt_lens)
        room = context - longest
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, your "
                           f"{prompt_param} has {longest} tokens.", param=prompt_param,
                           code="context_length_exceeded")  # fmt: skip
        if max_tokens is None:
            max_tokens = min(default_max_tokens, room)
        elif max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1; got {max_tokens}", param="max_tokens",
                           code="invalid_value")  # fmt: skip
        elif max_tokens > room:
            raise APIError(400, f"max_tokens is too large: {max_tokens}. This model's maximum context length is "
                           f"{context} tokens and your {prompt_param} has {longest} tokens, which leaves {room} for "
                           "the completion.", param="max_tokens", code="context_length_exceeded")  # fmt: skip
        seed = secrets.randbelow(SEED_RANGE) if body.seed is None else body.seed % SEED_RANGE
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              max_new_tokens=max_tokens, stop_token_ids=stop_ids, seed=seed)  # fmt: skip

    def stops_of(body: _Params) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    def submit(jobs: list[tuple[Request, SamplingParams]]) -> Submission:
        for request, params in jobs:
            problem = loop.check(request, params)
            if problem:
                raise APIError(400, problem)
        try:
            return Submission(loop, jobs)
        except Overloaded as err:
            raise APIError(429, f"The server is overloaded: {err}. Retry later.", type="rate_limit_error",
                           code="rate_limit_exceeded") from None  # fmt: skip
        except Unavailable as err:
            raise APIError(503, str(err), type="server_error", code="service_unavailable") from None

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

    def sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def failure(choices: Sequence[ChatChoice | TextChoice]) -> APIError | None:
        errors = [c.error for c in choices if c.finish == "error"]
        if not errors:
            return None
        return APIError(503, f"generation failed: {errors[0]}", type="server_error", code="service_unavailable")

    async def drain(sub: Any, on: Callable[[int, Event], Any], choices: Sequence[ChatChoice | TextChoice]) -> None:
        """Feed every event to ``on`` until the request's sequences end; raise the first choice's failure."""
        try:
            async for index, event in sub.events():
                on(index, event)
        finally:
            sub.close()
        problem = failure(choices)
        if problem:
            raise problem

    async def respond(request: HTTPRequest, result: Awaitable[dict[str, Any]]) -> Response:
        """The JSON result, or 499 when the client left first (its sequences are cancelled then)."""
        body = await until_disconnect(request, result)
        return JSONResponse(body) if body is not None else Response(status_code=499)

    def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    # ---- endpoints -------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = loop.running
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return loop.stats()

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "ossrl",
                "max_model_len": engine.max_model_len}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        body: ChatCompletionRequest = _parse(ChatCompletionRequest, await _json(request))
        check_model(body.model)
        if body.logprobs or body.top_logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                           code="unsupported_value")  # fmt: skip
        fmt = (body.response_format or {}).get("type", "text")
        if fmt != "text":
            raise APIError(400, f"response_format {fmt!r} is not supported (no constrained decoding)",
                           param="response_format", code="unsupported_value")  # fmt: skip
        effort = body.reasoning_effort or reasoning_effort
        effort = {"minimal": "low", "none": "low"}.get(effort, effort)
        if effort not in REASONING_EFFORTS:
            raise APIError(400, f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}; got {effort!r}",
                           param="reasoning_effort", code="invalid_value")  # fmt: skip
        choice = body.tool_choice if body.tool_choice is not None else "auto"
        if choice not in ("auto", "none"):
            raise APIError(400, "tool_choice may be 'auto' or 'none' (forcing a call needs constrained decoding, "
                           "which this server does not do)", param="tool_choice",
                           code="unsupported_value")  # fmt: skip
        try:
            instructions, messages = harmony_conversation(body.messages)
            tools = harmony_tools(body.tools) if choice == "auto" else []
            prompt_ids = render_conversation(messages, tokenizer, reasoning_effort=effort, tools=tools or None,
                                             instructions=instructions, current_date=current_date)  # fmt: skip
        except RequestError as err:
            raise bad_request(err) from None
        except ValueError as err:  # what the renderer refuses
            raise APIError(400, str(err), param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling(body, [len(prompt_ids)], max_tokens, None, "messages")
        n = body.n or 1
        sub = submit([(Request(prompt_ids, n=n), params)])
        choices = [ChatChoice(tokenizer, stops_of(body)) for _ in range(n)]
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name,
                "system_fingerprint": None}  # fmt: skip

        def on(index: int, event: Event) -> list[Delta]:
            c = choices[index]
            deltas = c.on(event)
            if c.finish == "stop" and c.stops is not None and c.stops.stopped:
                sub.stop(index)
            return deltas

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> str:
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                payload = {**base, "object": "chat.completion.chunk", "choices": [choice]}
                if include_usage:
                    payload["usage"] = None
                return sse(payload)

            async def stream() -> AsyncIterator[str]:
                try:
                    for i in range(n):
                        yield chunk(i, {"role": "assistant", "content": ""})
                    async for index, event in sub.events():
                        for delta in on(index, event):
                            yield chunk(index, delta_json(delta, choices[index].message))
                        c = choices[index]
                        if c.finish == "error":
                            yield sse(error_body(f"generation failed: {c.error}", "server_error",
                                                 code="service_unavailable"))  # fmt: skip
                            return
                        if c.finish is not None:
                            yield chunk(index, {}, c.finish)
                    if include_usage:
                        tokens = sum(c.tokens for c in choices)
                        yield sse({**base, "object": "chat.completion.chunk", "choices": [],
                                   "usage": usage(len(prompt_ids), tokens)})  # fmt: skip
                    yield "data: [DONE]\n\n"
                finally:
                    sub.close()

            return event_stream(stream())

        async def collect() -> dict[str, Any]:
            await drain(sub, on, choices)
            return {**base, "object": "chat.completion",
                    "choices": [{"index": i, "message": c.message.openai(), "logprobs": None,
                                 "finish_reason": c.finish} for i, c in enumerate(choices)],
                    "usage": usage(len(prompt_ids), sum(c.tokens for c in choices))}  # fmt: skip

        return await respond(request, collect())

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Response:
        body: CompletionRequest = _parse(CompletionRequest, await _json(request))
        check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                           code="unsupported_value")  # fmt: skip
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported_value")
        if body.best_of not in (None, 1, body.n or 1):
            raise APIError(400, "best_of is not supported by this server", param="best_of", code="unsupported_value")
        prompt_ids = prompt_token_ids(body.prompt, tokenizer)
        params = sampling(body, [len(p) for p in prompt_ids], body.max_tokens, sorted(stop_tokens), "prompt")
        n = body.n or 1
        sub = submit([(Request(p, n=n), params) for p in prompt_ids])
        echo = [tokenizer.decode(p, skip_special_tokens=False) if body.echo else "" for p in prompt_ids]
        choices = [TextChoice(tokenizer, stops_of(body), stop_tokens, echo[i // n]) for i in range(n * len(prompt_ids))]
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}  # fmt: skip
        prompt_tokens = sum(len(p) for p in prompt_ids)

        def on(index: int, event: Event) -> str:
            c = choices[index]
            piece = c.on(event)
            if c.stops is not None and c.stops.stopped:
                sub.stop(index)
            return piece

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            def chunk(index: int, text: str, finish: str | None = None) -> str:
                choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
                payload = {**base, "choices": [choice]}
                if include_usage:
                    payload["usage"] = None
                return sse(payload)

            async def stream() -> AsyncIterator[str]:
                try:
                    async for index, event in sub.events():
                        piece = on(index, event)
                        c = choices[index]
                        if c.finish == "error":
                            yield sse(error_body(f"generation failed: {c.error}", "server_error",
                                                 code="service_unavailable"))  # fmt: skip
                            return
                        if piece or c.finish is not None:
                            yield chunk(index, piece, c.finish)
                    if include_usage:
                        tokens = sum(c.tokens for c in choices)
                        yield sse({**base, "choices": [], "usage": usage(prompt_tokens, tokens)})
                    yield "data: [DONE]\n\n"
                finally:
                    sub.close()

            return event_stream(stream())

        async def collect() -> dict[str, Any]:
            await drain(sub, on, choices)
            return {**base,
                    "choices": [{"index": i, "text": c.output, "logprobs": None, "finish_reason": c.finish}
                                for i, c in enumerate(choices)],
                    "usage": usage(prompt_tokens, sum(c.tokens for c in choices))}  # fmt: skip

        return await respond(request, collect())

    return app


def prompt_token_ids(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """``/v1/completions``' prompt (a string, strings, token ids or lists of token ids) as token-id lists. Text is
    encoded with special tokens read as such: a rendered Harmony prompt goes in as the model would see it."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_ids(prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or _is_ids(p) for p in prompt):
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                       "token ids", param="prompt")  # fmt: skip
    ids = [p if isinstance(p, list) else tokenizer.encode(p, add_special_tokens=False) for p in prompt]
    if not all(ids):
        raise APIError(400, "prompt must not be empty", param="prompt")
    return ids


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def delta_json(delta: Delta, message: ChatMessage) -> dict[str, Any]:
    """A decoder delta in OpenAI's chunk format (``message``: the choice so far, for the tool call's index)."""
    if delta.kind == "content":
        return {"content": delta.text}
    if delta.kind == "reasoning":
        return {"reasoning_content": delta.text}
    index = len(message.tool_calls) - 1
    if delta.kind == "tool_call":
        return {"tool_calls": [{"index": index, "id": delta.call_id, "type": "function",
                                "function": {"name": delta.text, "arguments": ""}}]}  # fmt: skip
    return {"tool_calls": [{"index": index, "function": {"arguments": delta.text}}]}
