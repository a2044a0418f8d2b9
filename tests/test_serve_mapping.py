"""OpenAI chat API <-> Harmony: requests to Harmony messages and tool definitions, sampled tokens back to OpenAI's
fields (whole and as deltas), stop strings."""

import json

import pytest

from ossrl.harmony import Message, Tool, build_tiny_tokenizer, parse_completion, render_completion, render_conversation
from ossrl.serve.mapping import (
    ChatMessage,
    Detokenizer,
    HarmonyDecoder,
    RequestError,
    StopStrings,
    harmony_conversation,
    harmony_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def decode_all(tokens, tokenizer):
    """The whole message the decoder gives, and the deltas' concatenation per field (they must agree)."""
    decoder, message, deltas = HarmonyDecoder(tokenizer), ChatMessage(), []
    for t in tokens:
        deltas += decoder.feed(t)
    deltas += decoder.finish()
    for d in deltas:
        message.add(d)
    return decoder, message, deltas


def test_chat_messages_map_to_harmony():
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "I should call the tool.", "content": "Checking.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "assistant", "content": "It is 18C."},
        {"role": "user", "content": "Thanks"},
    ]  # fmt: skip
    instructions, messages = harmony_conversation(chat)
    assert instructions == "Be brief.\n\nUse tools."
    assert messages == [
        Message.user("Weather in Paris?"),
        Message.analysis("I should call the tool."),
        Message("assistant", "Checking.", channel="commentary"),
        Message.tool_call("get_weather", '{"city": "Paris"}'),
        Message.tool_result("get_weather", "18C"),
        Message.final("It is 18C."),
        Message.user("Thanks"),
    ]
    # arguments given as an object are JSON-encoded; an assistant turn with only reasoning keeps only that
    _, messages = harmony_conversation([
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": {"k": 1}}}]},
        {"role": "tool", "tool_call_id": "a", "content": None},
    ])  # fmt: skip
    assert messages[1] == Message.tool_call("f", '{"k": 1}') and messages[2] == Message.tool_result("f", "")


@pytest.mark.parametrize(
    ("chat", "param"),
    [
        ([], "messages"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}], "messages[1].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
        ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}],
         "messages[1].tool_call_id"),
        ([{"role": "system", "content": "only instructions"}], "messages"),
        ([{"role": "assistant", "tool_calls": [{"type": "custom", "custom": {}}]}], "messages[0].tool_calls[0]"),
    ],
)  # fmt: skip
def test_chat_messages_harmony_cannot_hold_are_refused_with_the_param(chat, param):
    with pytest.raises(RequestError) as err:
        harmony_conversation(chat)
    assert err.value.param == param


def test_openai_tools_map_to_harmony_tool_definitions():
    (tool,) = harmony_tools([WEATHER])
    assert tool == Tool("get_weather", "Current weather in a city.", WEATHER["function"]["parameters"])
    assert harmony_tools(None) == [] and harmony_tools([{"type": "function", "function": {"name": "now"}}]) == [
        Tool("now", "", None)
    ]
    bad = [
        ([{"type": "web_search"}], "tools[0]"),
        ([{"type": "function", "function": {"name": "a.b"}}], "tools[0].function"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "u": {"type": "string", "enum": "celsius"}}}}}], "tools[0].function.parameters"),
        ([WEATHER, WEATHER], "tools"),
    ]  # fmt: skip
    for tools, param in bad:
        with pytest.raises(RequestError) as err:
            harmony_tools(tools)
        assert err.value.param == param


def test_decoder_reads_reasoning_final_and_tool_calls_as_parse_completion_does(tokenizer):
    cases = [
        [Message.analysis("Think about it."), Message.final("The answer is 4.")],
        [Message.analysis("Need the weather."), Message.tool_call("get_weather", {"city": "Paris"})],
        [Message("assistant", "Let me check.", channel="commentary"), Message.tool_call("now", {})],
        [Message.final("héllo wörld — 日本語 ✓")],  # multi-byte characters split over byte-level tokens
    ]
    for messages in cases:
        tokens = render_completion(messages, tokenizer)
        parsed = parse_completion(tokens, tokenizer)
        decoder, message, _ = decode_all(tokens, tokenizer)
        assert parsed.ok, parsed.problems
        assert message.reasoning == parsed.analysis_text
        assert decoder.ended == parsed.ended and decoder.tool_call == (parsed.tool_call is not None)
        if parsed.tool_call is not None:
            (call,) = message.tool_calls
            assert call["function"] == {"name": parsed.tool_call.name, "arguments": parsed.tool_call.raw_arguments}
            assert call["id"].startswith("call_") and call["type"] == "function"
            preamble = [m.content for m in parsed.messages if m.channel == "commentary" and not m.recipient]
            assert message.content == "".join(preamble)
            assert message.openai()["content"] == ("".join(preamble) or None)
        else:
            assert message.content == parsed.final_text and "tool_calls" not in message.openai()


def test_decoder_streams_a_truncated_answer_and_falls_back_to_raw_text(tokenizer):
    tokens = render_completion([Message.analysis("Hmm."), Message.final("A long answer")], tokenizer)[:-1]
    decoder, message, deltas = decode_all(tokens, tokenizer)  # cut before <|return|>: max_tokens ran out
    assert decoder.ended is None and message.reasoning == "Hmm." and message.content == "A long answer"
    assert "".join(d.text for d in deltas if d.kind == "content") == message.content
    raw = tokenizer.encode("not harmony at all", add_special_tokens=False)
    _, message, _ = decode_all(raw, tokenizer)
    assert message.content == "not harmony at all" and message.reasoning == ""


def test_a_response_fed_back_renders_the_tokens_the_model_sampled(tokenizer):
    """Harmony -> OpenAI -> Harmony: the assistant message a client sends back renders as the model wrote it."""
    sampled = render_completion([Message.analysis("Need the weather."),
                                 Message.tool_call("get_weather", {"city": "Paris"})], tokenizer)  # fmt: skip
    _, message, _ = decode_all(sampled, tokenizer)
    chat = [{"role": "user", "content": "Weather?"}, message.openai(),
            {"role": "tool", "tool_call_id": message.tool_calls[0]["id"], "content": "18C"}]  # fmt: skip
    instructions, messages = harmony_conversation(json.loads(json.dumps(chat)))
    tools = harmony_tools([WEATHER])
    history = render_conversation(messages, tokenizer, tools=tools, current_date=None)
    prompt = render_conversation(messages[:1], tokenizer, tools=tools, current_date=None)
    assert history[: len(prompt)] == prompt and history[len(prompt) : len(prompt) + len(sampled)] == sampled
    text = tokenizer.decode(history[len(prompt) + len(sampled) :])
    assert text == "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>18C<|end|>" \
                   "<|start|>assistant"  # fmt: skip


def test_detokenizer_and_stop_strings_across_pieces(tokenizer):
    text = "naïve café — ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    stops = StopStrings(["world", "END"])
    out = [stops.feed(p) for p in ["Hello wo", "r", "ld and more"]]
    assert "".join(out) == "Hello " and stops.stopped and stops.feed("x") == ""
    stops = StopStrings(["world"])
    assert stops.feed("abcdefgh") == "abcdefgh" and stops.feed("a wor") == "a " and stops.feed("m") == "worm"
    assert stops.feed("ww") == "w" and stops.flush() == "w" and not stops.stopped
