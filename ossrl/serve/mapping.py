"""OpenAI's chat API <-> Harmony.

Requests: OpenAI chat messages (system, developer, user, assistant with ``reasoning_content`` and ``tool_calls``,
tool) become developer instructions plus Harmony messages, and OpenAI function tools become Harmony tool
definitions (:func:`harmony_conversation`). Leading system/developer messages are the developer message's
instructions (Harmony has one, first); an assistant's ``content`` beside ``tool_calls`` is a commentary preamble; a
tool message is authored by ``functions.NAME``, the name found from its ``tool_call_id``.

Responses: the sampled tokens of one completion (after ``<|start|>assistant``) are read incrementally by
:class:`HarmonyDecoder` into OpenAI's fields: the analysis channel -> ``reasoning_content``, final (and commentary
preambles) -> ``content``, a message to ``functions.NAME`` ending in ``<|call|>`` -> a ``tool_calls`` entry. The same
decoder gives the streaming deltas and, fed everything, the whole message, so the two cannot disagree.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ossrl.harmony import HarmonyTokens, Message, Tool
from ossrl.harmony.tools import check_tool_schema

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule; Harmony's parser needs no dots in it
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(ValueError):
    """A request OpenAI would refuse with 400: ``param`` names the field, ``code`` is OpenAI's error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


# ---- requests ----------------------------------------------------------------------------------------------------
def text_of(content: Any, where: str) -> str:
    """A message's ``content``: a string, null, or a list of text parts (joined with new lines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RequestError(f"{where}.content[{k}]: only text content parts are supported; got {kind!r}",
                                   f"{where}.content")  # fmt: skip
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def harmony_tools(tools: Sequence[Any] | None) -> list[Tool]:
    """OpenAI tools (``{"type": "function", "function": {"name", "description", "parameters"}}``) -> Harmony."""
    out: list[Tool] = []
    for k, tool in enumerate(tools or []):
        where = f"tools[{k}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else type(tool).__name__
            raise RequestError(f"{where}: only function tools are supported; got {kind!r}", where)
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise RequestError(f"{where}.function.name is required", f"{where}.function")
        name = fn["name"]
        if not TOOL_NAME.match(name):
            raise RequestError(f"{where}.function.name {name!r} must match {TOOL_NAME.pattern}", f"{where}.function")
        parameters = fn.get("parameters")
        description = fn.get("description") or ""
        if parameters is not None and not isinstance(parameters, Mapping):
            raise RequestError(f"{where}.function.parameters must be a JSON schema object", f"{where}.function")
        if not isinstance(description, str):
            raise RequestError(f"{where}.function.description must be a string", f"{where}.function")
        try:
            check_tool_schema(name, parameters)
        except ValueError as err:
            raise RequestError(f"{where}: {err}", f"{where}.function.parameters") from err
        out.append(Tool(name, description, parameters))
    names = [t.name for t in out]
    if len(set(names)) < len(names):
        raise RequestError("tools: two tools have the same name", "tools")
    return out


def harmony_conversation(messages: Any) -> tuple[str | None, list[Message]]:
    """OpenAI chat messages -> (developer instructions, Harmony messages). RequestError on what cannot map."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    instructions: list[str] = []
    out: list[Message] = []
    calls: dict[str, str] = {}  # tool_call_id -> function name
    last_call: str | None = None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise RequestError(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role {role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
        text = text_of(m.get("content"), where)
        if role in ("system", "developer"):
            if out:
                raise RequestError(f"{where}: a {role} message after the conversation started; Harmony has one "
                                   "developer message, first (put system/developer messages before the others)",
                                   f"{where}.role")  # fmt: skip
            instructions.append(text)
        elif role == "user":
            out.append(Message.user(text))
        elif role == "assistant":
            reasoning = m.get("reasoning_content") or m.get("reasoning") or m.get("thinking")
            if reasoning is not None and not isinstance(reasoning, str):
                raise RequestError(f"{where}.reasoning_content must be a string", f"{where}.reasoning_content")
            tool_calls = m.get("tool_calls") or []
            if not isinstance(tool_calls, list):
                raise RequestError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
            if reasoning:
                out.append(Message.analysis(reasoning))
            if tool_calls:
                if text:  # said before the calls: a commentary preamble, as the model writes one
                    out.append(Message("assistant", text, channel="commentary"))
                for k, call in enumerate(tool_calls):
                    name, arguments = _tool_call(call, f"{where}.tool_calls[{k}]")
                    out.append(Message.tool_call(name, arguments))
                    if isinstance(call.get("id"), str):
                        calls[call["id"]] = name
                    last_call = name
            elif text or not reasoning:
                out.append(Message.final(text))
        else:  # tool
            call_id = m.get("tool_call_id")
            name = calls.get(call_id) if isinstance(call_id, str) else None
            name = name or m.get("name") or (last_call if call_id is None else None)
            if not isinstance(name, str) or not name:
                raise RequestError(f"{where}: tool_call_id {call_id!r} matches no earlier assistant tool call",
                                   f"{where}.tool_call_id")  # fmt: skip
            out.append(Message.tool_result(name, text))
    if not out:
        raise RequestError("messages: no user, assistant or tool message", "messages")
    return ("\n\n".join(instructions) if instructions else None), out


def _tool_call(call: Any, where: str) -> tuple[str, str]:
    if not isinstance(call, Mapping) or call.get("type", "function") != "function":
        raise RequestError(f"{where}: only function tool calls are supported", where)
    fn = call.get("function")
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RequestError(f"{where}.function.name is required", f"{where}.function")
    arguments = fn.get("arguments")
    if arguments is None:
        arguments = "{}"
    elif not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return fn["name"], arguments


# ---- responses ---------------------------------------------------------------------------------------------------
class Detokenizer:
    """Token ids -> text, incrementally: each ``add`` returns the new text, holding back a token whose bytes are an
    incomplete UTF-8 character (decoded with the tokens before it, as vLLM's incremental detokenizer does)."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = False) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is held back (an incomplete character at the very end comes out as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


@dataclass
class Delta:
    """A piece of the OpenAI message: ``kind`` is ``content``, ``reasoning``, ``tool_call`` (a call starts: ``text``
    is the function name, ``call_id`` its id) or ``arguments`` (of the current call)."""

    kind: str
    text: str
    call_id: str | None = None


@dataclass
class ChatMessage:
    """The OpenAI fields of a completion, accumulated from its deltas."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        if delta.kind == "content":
            self.content += delta.text
        elif delta.kind == "reasoning":
            self.reasoning += delta.text
        elif delta.kind == "tool_call":
            self.tool_calls.append({"id": delta.call_id, "type": "function",
                                    "function": {"name": delta.text, "arguments": ""}})  # fmt: skip
        elif delta.kind == "arguments" and self.tool_calls:
            self.tool_calls[-1]["function"]["arguments"] += delta.text

    def openai(self) -> dict[str, Any]:
        """``choices[i].message``: content is null beside tool calls when the model said nothing else."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content or (None if self.tool_calls else ""),
                                   "reasoning_content": self.reasoning or None}  # fmt: skip
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class HarmonyDecoder:
    """The sampled tokens of one completion (they follow ``<|start|>assistant``) -> :class:`Delta` s, one token at
    a time. A header is read when its ``<|message|>`` arrives: ``to=functions.NAME`` makes a tool call (the name,
    then the arguments as they are sampled), the analysis channel is reasoning, anything else (final, a commentary
    preamble, a missing or unknown channel) is content. ``<|return|>`` / ``<|call|>`` end the completion
    (``ended``: ``return`` / ``call``; a tool call is complete only when ``<|call|>`` ends it). Output that is not
    Harmony at all (no header ever ends) comes out at ``finish`` as content: its text without special tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tok = HarmonyTokens.from_tokenizer(tokenizer)
        self.special = set(self.tok.by_text.values())
        self.state = "header"  # header | content | between (after <|end|>) | done
        self.header: list[int] = []
        self.kind = "content"
        self.text: Detokenizer | None = None
        self.all: list[int] = []
        self.messages = 0  # messages whose header was read
        self.ended: str | None = None
        self.call: Delta | None = None  # the tool call being written

    def feed(self, token: int) -> list[Delta]:
        tok, out = self.tok, []
        self.all.append(token)
        if self.state == "done":
            return out
        if self.state == "content":
            if token in (tok.end, tok.return_, tok.call):
                out += self._close()
                if token == tok.end:
                    self.state = "between"
                else:
                    self.state, self.ended = "done", "return" if token == tok.return_ else "call"
            elif token == tok.start:  # a missing <|end|>: the next message begins
                out += self._close()
                self.state, self.header = "header", []
            elif token not in self.special:
                piece = self.text.add(token)
                if piece:
                    out.append(Delta(self.kind, piece))
        elif self.state == "between":
            if token == tok.start:
                self.state, self.header = "header", []
            elif token in (tok.return_, tok.call):
                self.state, self.ended = "done", "return" if token == tok.return_ else "call"
        elif token == tok.message:  # header
            out += self._open()
        elif token in (tok.return_, tok.call):
            self.state, self.ended = "done", "return" if token == tok.return_ else "call"
        elif token == tok.start:  # a header that never ended: start over
            self.header = []
        elif token == tok.end:
            self.state = "between"
        else:
            self.header.append(token)
        return out

    def _open(self) -> list[Delta]:
        header = self.tokenizer.decode(self.header, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        self.messages += 1
        self.state, self.call = "content", None
        self.text = Detokenizer(self.tokenizer, skip_special_tokens=True)  # e.g. <|endoftext|> is no text
        recipient = re.search(r"to=([^\s<]+)", header)
        channel = re.search(r"<\|channel\|>\s*([A-Za-z]+)", header)
        author = header.split("<|", 1)[0].split()
        if author and author[0] not in ("assistant",) and not author[0].startswith("to="):
            self.kind = "content"  # the model writing as someone else: show it, as text
        elif recipient and recipient.group(1) != "assistant":
            name = recipient.group(1)
            name = name.split(".", 1)[1] if name.startswith("functions.") else name
            self.kind, self.call = "arguments", Delta("tool_call", name, new_call_id())
            return [self.call]
        else:
            self.kind = "reasoning" if channel and channel.group(1) == "analysis" else "content"
        return []

    def _close(self) -> list[Delta]:
        piece = self.text.flush() if self.text is not None else ""
        self.text = None
        return [Delta(self.kind, piece)] if piece else []

    def finish(self) -> list[Delta]:
        """The end of the completion: what is held back, or the raw text when nothing was Harmony."""
        if self.state == "content":
            return self._close()
        if self.messages == 0:
            raw = self.tokenizer.decode(self.all, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            return [Delta("content", raw)] if raw else []
        return []

    @property
    def tool_call(self) -> bool:
        """The completion ended in a complete tool call (``<|call|>`` after a message to a function)."""
        return self.ended == "call" and self.call is not None


class StopStrings:
    """OpenAI's ``stop``: text is let through as it comes, minus a tail that is the start of a stop string (held
    until the next piece tells); at the first stop string everything from it on is dropped and ``stopped`` is set."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self.buffer + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.buffer = True, ""
            return buffer[: min(hits)]
        held = max((k for s in self.stops for k in range(min(len(s) - 1, len(buffer)), 0, -1)
                    if buffer.endswith(s[:k])), default=0)  # fmt: skip
        cut = len(buffer) - held
        self.buffer = buffer[cut:]
        return buffer[:cut]

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
