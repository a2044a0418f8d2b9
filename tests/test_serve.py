"""The OpenAI-compatible server, driven by the official ``openai`` client over HTTP (uvicorn on 127.0.0.1, the tiny
model on CPU): chat completions, n > 1, streaming, text completions, a tool-call round trip (a scripted model
writes the call), stop strings, bad requests (400 in OpenAI's error shape), overload (429), a stopped engine (503),
client disconnects cancelling their sequences, 32 concurrent requests batched together, and ``ossrl serve`` itself."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn
from rollout_helpers import scripted_policy

from ossrl.harmony import Message, render_completion, render_conversation
from ossrl.rollout import Engine
from ossrl.serve import EngineLoop, create_app

MODEL = "tiny"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
HI = [{"role": "user", "content": "Hi there"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model, tokenizer, *, max_queue=256, **engine_options):
    """The app under uvicorn in a thread on a free port; yields the loop, the URL and an openai client."""
    engine = Engine(model, tokenizer, **{"kv_cache_tokens": 16384, **engine_options})
    loop = EngineLoop(engine, max_queue=max_queue).start()
    app = create_app(loop, tokenizer, model_name=MODEL, current_date=None)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        yield SimpleNamespace(loop=loop, url=url, client=client, app=app, port=port)
    finally:
        server.should_exit = True
        thread.join(30)
        loop.stop()


@pytest.fixture(scope="module")
def server(tiny):
    with serving(*tiny) as s:
        yield s


@pytest.fixture(scope="module")
def scripted(tiny):
    """A server on a model whose next token comes from ``s.script`` (set it, then send ONE request at a time)."""
    model, tokenizer = tiny
    policy = scripted_policy(model, [10])
    with serving(policy, tokenizer) as s:

        def script(tokens):
            # a request stopped early (stop string, disconnect) may still take a step before its cancel lands
            assert wait_for(lambda: (lambda st: st["running"] == 0 and st["open_requests"] == 0)(s.loop.stats()))
            with s.loop.paused():
                policy.lm_head.script, policy.lm_head.cursor = tokens, 0

        s.script = script
        yield s


def prompt_of(loop, monkeypatch):
    """Spy on the loop: the prompt token ids of every request submitted."""
    seen, submit = [], loop.submit

    def spy(request, *args, **kwargs):
        seen.append(request.prompt_ids)
        return submit(request, *args, **kwargs)

    monkeypatch.setattr(loop, "submit", spy)
    return seen


def test_models_and_a_chat_completion(server, tiny, monkeypatch):
    _, tokenizer = tiny
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert server.client.models.retrieve(MODEL).id == MODEL
    prompts = prompt_of(server.loop, monkeypatch)
    r = server.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, seed=7, temperature=0.8)
    (choice,) = r.choices
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert prompts == [render_conversation(HI, tokenizer, reasoning_effort="medium", current_date=None)]
    assert r.usage.prompt_tokens == len(prompts[0]) and 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = server.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, seed=7, temperature=0.8)
    assert again.choices[0].message.content == choice.message.content  # the same seed, the same sample
    low = server.client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=2,
                                                reasoning_effort="low", extra_body={"unknown_field": 1})  # fmt: skip
    assert low.usage.completion_tokens <= 2 and b"Reasoning: low" in tokenizer.decode(prompts[-1]).encode()


def test_n_samples_streaming_and_usage(server):
    kwargs = dict(model=MODEL, messages=HI, max_tokens=8, seed=3, n=3, temperature=1.0)
    whole = server.client.chat.completions.create(**kwargs)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.message.content for c in whole.choices}) > 1  # the samples differ
    stream = server.client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    content, finish, usage = ["", "", ""], [None] * 3, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            content[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert content == [c.message.content for c in whole.choices]  # streamed = whole, with the same seed
    assert finish == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens


def test_text_completions(server, tiny):
    _, tokenizer = tiny
    r = server.client.completions.create(model=MODEL, prompt="The weather today", max_tokens=5, seed=1, n=2)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    assert all(isinstance(c.text, str) and c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.prompt_tokens == len(tokenizer.encode("The weather today", add_special_tokens=False))
    streamed = server.client.completions.create(model=MODEL, prompt="The weather today", max_tokens=5, seed=1, n=2,
                                                stream=True)  # fmt: skip
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in r.choices]
    ids = server.client.completions.create(model=MODEL, prompt=[[20, 21, 22], [23, 24]], max_tokens=3, n=2)
    assert len(ids.choices) == 4 and ids.usage.prompt_tokens == 5
    echo = server.client.completions.create(model=MODEL, prompt=["Hello", "Bye"], max_tokens=3, echo=True)
    assert echo.choices[0].text.startswith("Hello") and echo.choices[1].text.startswith("Bye")


def test_a_tool_call_comes_back_as_tool_calls_and_the_result_goes_in_as_harmony(scripted, tiny, monkeypatch):
    _, tokenizer = tiny
    call = render_completion([Message.analysis("I need the weather."),
                              Message.tool_call("get_weather", {"city": "Paris"})], tokenizer)  # fmt: skip
    scripted.script(call)
    ask = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Weather in Paris?"}]
    r = scripted.client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], max_tokens=100)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == "I need the weather."
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"} and tool_call.id.startswith("call_")
    assert r.usage.completion_tokens == len(call)

    scripted.script(call)  # the same, streamed: deltas in OpenAI's format
    deltas = list(scripted.client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], max_tokens=100,
                                                          stream=True))  # fmt: skip
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in deltas if c.choices)
    calls = [t for c in deltas if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert reasoning == "I need the weather." and deltas[-1].choices[0].finish_reason == "tool_calls"
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert json.loads("".join(t.function.arguments for t in calls)) == {"city": "Paris"}

    # the client runs the tool and sends the call and its result back: the prompt holds them in Harmony
    prompts = prompt_of(scripted.loop, monkeypatch)
    scripted.script(render_completion([Message.final("It is 18C.")], tokenizer))
    history = [*ask, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": tool_call.id, "content": "18C"}]  # fmt: skip
    answer = scripted.client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=50)
    assert answer.choices[0].message.content == "It is 18C." and answer.choices[0].finish_reason == "stop"
    text = tokenizer.decode(prompts[-1])
    assert "<|start|>developer<|message|># Instructions\n\nAnswer briefly.\n\n# Tools" in text
    assert "type get_weather = (_: {\ncity: string,\n}) => any;" in text
    assert ("<|start|>assistant<|channel|>analysis<|message|>I need the weather.<|end|>"
            '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
            '{"city": "Paris"}<|call|>'
            "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>18C<|end|>"
            "<|start|>assistant") in text  # fmt: skip
    assert text.endswith("<|start|>assistant")


def test_stop_strings_cut_the_content(scripted, tiny):
    _, tokenizer = tiny
    answer = render_completion([Message.analysis("Easy."), Message.final("Hello world. Bye.")], tokenizer)
    scripted.script(answer)
    r = scripted.client.chat.completions.create(model=MODEL, messages=HI, stop=["world"], max_tokens=100)
    assert r.choices[0].message.content == "Hello " and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.reasoning_content == "Easy."
    scripted.script(answer)
    stream = scripted.client.chat.completions.create(model=MODEL, messages=HI, stop="world", max_tokens=100,
                                                     stream=True)  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == "Hello " and chunks[-1].finish_reason == "stop"


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "gpt-4o", "messages": HI}, "model", "model_not_found"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", None),
        ({"model": MODEL, "messages": HI, "n": 0}, "n", "invalid_value"),
        ({"model": MODEL, "messages": HI, "max_tokens": 100_000}, "max_tokens", "context_length_exceeded"),
        ({"model": MODEL, "messages": HI, "temperature": 5}, "temperature", "invalid_value"),
        ({"model": MODEL, "messages": HI, "tool_choice": "required", "tools": [WEATHER]}, "tool_choice",
         "unsupported_value"),
        ({"model": MODEL, "messages": HI, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
         "tools[0].function", None),
        ({"model": MODEL}, "messages", None),
        ({"model": MODEL, "messages": "hello"}, "messages", None),
        ({"model": MODEL, "messages": HI, "stream": "maybe"}, "stream", None),
    ],
)  # fmt: skip
def test_bad_requests_get_400_in_openai_error_shape(server, body, param, code):
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert error["message"]


def test_bad_json_unknown_routes_and_the_openai_client_errors(server):
    response = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 400 and "JSON" in error_of(response)["message"]
    assert httpx.post(server.url + "/v1/completions", json=[1, 2], timeout=30).status_code == 400
    assert httpx.get(server.url + "/v1/nothing", timeout=30).status_code == 404
    error_of(httpx.get(server.url + "/v1/nothing", timeout=30))
    with pytest.raises(openai.BadRequestError) as err:
        server.client.chat.completions.create(model=MODEL, messages=HI, n=0)
    assert err.value.status_code == 400 and err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model=MODEL, prompt=[10**6], max_tokens=2)  # outside the vocabulary


def test_32_concurrent_requests_are_all_answered_in_shared_decode_steps(server, tiny):
    before = dict(server.loop.stats())
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(i):
        params = {"temperature": 0} if i % 2 else {"temperature": 1.0, "top_p": 0.9, "seed": i}
        messages = [{"role": "user", "content": f"Question number {i % 4}"}]
        return await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, **params)

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(all_of_them())
    assert len(results) == 32 and all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    after = server.loop.stats()
    assert after["requests"] - before["requests"] == 32
    assert after["batched_steps"] > before["batched_steps"] and after["max_batch_requests"] >= 2
    greedy = {}
    for i, r in enumerate(results):  # greedy samples of one prompt agree, whatever their batch-mates
        if i % 2:
            greedy.setdefault(i % 4, set()).add(r.choices[0].message.content)
    assert all(len(contents) == 1 for contents in greedy.values())
    assert after["pending"] == 0 and after["running"] == 0


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_disconnects_cancels_its_sequences(scripted):
    scripted.script([10])  # never a stop token: only max_tokens or a cancel ends it
    loop = scripted.loop
    cancelled = loop.stats()["cancelled"]
    body = {"model": MODEL, "messages": HI, "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", scripted.url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the stream is running
        assert wait_for(lambda: loop.stats()["running"] == 1)
    assert wait_for(lambda: loop.stats()["running"] == 0 and loop.stats()["cancelled"] == cancelled + 1)
    body["stream"], body["n"] = False, 2  # not streaming: the server notices the closed connection too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(scripted.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    assert wait_for(lambda: loop.stats()["running"] == 0 and loop.stats()["cancelled"] == cancelled + 3)
    assert loop.stats()["tokens"] < 2 * 3000  # nothing ran to max_tokens


def test_overload_gets_429_and_a_stopped_engine_503(tiny):
    with serving(*tiny, max_queue=1) as s:
        results = []
        with s.loop.paused():  # the engine holds between steps: the first request waits for admission
            first = threading.Thread(target=lambda: results.append(
                s.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)))  # fmt: skip
            first.start()
            assert wait_for(lambda: s.loop.stats()["pending"] == 1)
            with pytest.raises(openai.RateLimitError) as err:
                s.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
            assert err.value.status_code == 429 and err.value.body["type"] == "rate_limit_error"
        first.join(60)
        assert len(results) == 1 and results[0].choices[0].finish_reason in ("stop", "length")
        s.loop.stop()
        with pytest.raises(openai.InternalServerError) as err:
            s.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["code"] == "service_unavailable"
        assert httpx.get(s.url + "/health", timeout=30).status_code == 503


def test_ossrl_serve_command(tmp_path):
    from ossrl.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "ckpt")
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "ossrl.cli", "serve", "--model", str(path), "--port", str(port),
               "--device", "cpu", "--dtype", "float32", "--served-model-name", MODEL, "--max-tokens", "4"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return process.poll() is not None

        assert wait_for(up, timeout=120) and process.poll() is None, process.communicate()[0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=MODEL, messages=HI)
        assert 1 <= r.usage.completion_tokens <= 4  # --max-tokens: the default when a request sets none
    finally:
        process.terminate()
        process.wait(30)
