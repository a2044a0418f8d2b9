"""Parse a sampled completion (the tokens after ``<|start|>assistant``) back into Harmony messages.

Never raises on model output: malformed completions (missing tokens, unknown channel, bad tool-call JSON,
truncation) give a result with ``ok=False`` and readable ``problems``, which a reward function can score.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ossrl.harmony.messages import CHANNELS, ROLES, Message, ToolCall
from ossrl.harmony.tokenizer import HarmonyTokens

Ended = Literal["return", "call", "end", "truncated"]


@dataclass
class ParsedCompletion:
    """``messages``: the complete messages, in order. ``ended``: how the completion ended (``return``: a final
    answer; ``call``: a tool call; ``end``: stopped after ``<|end|>`` with no answer; ``truncated``: ran out of
    tokens mid-message, whose text is in ``partial``). ``problems``: what is malformed; empty when ``ok``."""

    messages: list[Message] = field(default_factory=list)
    ended: Ended = "truncated"
    problems: list[str] = field(default_factory=list)
    partial: Message | None = None
    tool_call: ToolCall | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def error(self) -> str | None:
        return "; ".join(self.problems) if self.problems else None

    @property
    def final_text(self) -> str | None:
        """The text of the last complete message on the final channel (None if there is none)."""
        finals = [m.content for m in self.messages if m.role == "assistant" and m.channel == "final"]
        return finals[-1] if finals else None

    @property
    def analysis_text(self) -> str:
        """The chain of thought: all analysis-channel messages, joined by newlines."""
        return "\n".join(m.content for m in self.messages if m.channel == "analysis")


@dataclass
class _Header:
    role: str | None  # known role of the first message ("assistant", from the prompt), else None
    segments: list[tuple[str, list[int]]] = field(default_factory=lambda: [("role", [])])


_OTHER_SPECIAL: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def _other_special_ids(tokenizer: Any, tokens: HarmonyTokens) -> frozenset[int]:
    """Special/added token ids that are not Harmony structure (``<|endoftext|>``, reserved tokens, ...)."""
    try:
        return _OTHER_SPECIAL[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    other = frozenset(ids - set(tokens.by_text.values()))
    try:
        _OTHER_SPECIAL[tokenizer] = other
    except TypeError:
        pass
    return other


def parse_completion(token_ids: Sequence[int], tokenizer: Any, *, role: str | None = "assistant") -> ParsedCompletion:
    """Parse sampled tokens that follow ``<|start|>{role}`` (the generation prompt) into messages.

    With ``role=None`` the tokens are whole rendered messages (each starting with ``<|start|>``), any author is
    allowed and ending with ``<|end|>`` is normal: use it to read back a rendered conversation."""
    completion = role is not None
    tok = HarmonyTokens.from_tokenizer(tokenizer)
    other = _other_special_ids(tokenizer, tok)
    names = {v: k for k, v in tok.by_text.items()}
    ids = [int(t) for t in token_ids]
    while ids and tok.pad is not None and ids[-1] == tok.pad:  # right padding from a batch
        ids.pop()

    def decode(seq: list[int]) -> str:
        return tokenizer.decode(seq, skip_special_tokens=False, clean_up_tokenization_spaces=False) if seq else ""

    def name_of(t: int) -> str:
        return names.get(t) or tokenizer.convert_ids_to_tokens(t) or str(t)

    out = ParsedCompletion()
    problems = out.problems
    state = "header" if completion else "expect_start"
    header = _Header(role)
    content: list[int] = []
    msg: Message | None = None
    stop_at: int | None = None
    last_end: Ended = "end"
    n_vocab = len(tokenizer)
    for pos, t in enumerate(ids):
        if not 0 <= t < n_vocab:  # the model's embedding may be wider than the tokenizer: never a valid token
            problems.append(f"token id {t} at {pos} is outside the tokenizer's vocabulary ({n_vocab})")
            continue
        if state == "expect_start":
            if t == tok.start:
                state, header = "header", _Header(None)
            else:
                problems.append(f"expected <|start|> after <|end|>, got {name_of(t)!r} (token {pos})")
                state = "skip"
        elif state == "skip":  # resynchronize at the next message start
            if t == tok.start:
                state, header = "header", _Header(None)
        elif state == "header":
            if t == tok.message:
                msg = _build_header(header, decode, problems, index=len(out.messages), completion=completion)
                state, content = "content", []
            elif t in (tok.channel, tok.constrain):
                header.segments.append(("channel" if t == tok.channel else "constrain", []))
            elif t == tok.start:
                problems.append(f"message {len(out.messages)}: header without <|message|> (token {pos})")
                header = _Header(None)
            elif t in (tok.end, tok.return_, tok.call) or t in other:
                problems.append(f"message {len(out.messages)}: {name_of(t)} in the header, before <|message|> "
                                f"(token {pos})")  # fmt: skip
                if t in (tok.return_, tok.call):
                    out.ended, stop_at = ("return" if t == tok.return_ else "call"), pos
                    break
                state = "expect_start" if t == tok.end else "skip"
            else:
                header.segments[-1][1].append(t)
        else:  # content
            assert msg is not None
            if t in (tok.end, tok.return_, tok.call):
                msg.content = decode(content)
                _check_end(msg, names[t], problems, index=len(out.messages))
                out.messages.append(msg)
                msg = None
                last_end = "end" if t == tok.end else "return" if t == tok.return_ else "call"
                if t == tok.end or not completion:  # in a rendered history, calls and returns end messages too
                    state = "expect_start"
                else:
                    out.ended, stop_at = last_end, pos
                    break
            elif t == tok.start:
                problems.append(f"message {len(out.messages)}: <|start|> inside the content (missing <|end|>)")
                msg.content = decode(content)
                out.messages.append(msg)
                state, header, msg = "header", _Header(None), None
            elif t in names or t in other:
                problems.append(f"message {len(out.messages)}: {name_of(t)} inside the content (token {pos})")
            else:
                content.append(t)

    if stop_at is not None:
        extra = len(ids) - stop_at - 1
        if extra:
            problems.append(f"{extra} token(s) after <|{out.ended}|>")
    elif state == "expect_start" and (out.messages or not completion):
        out.ended = last_end
        if completion:
            problems.append("stopped after <|end|> with no final answer or tool call (no <|return|> or <|call|>)")
    else:
        out.ended = "truncated"
        if state == "content" and msg is not None:
            msg.content = decode(content)
            out.partial = msg
        problems.append("truncated: the completion ended inside a message, before <|return|> or <|call|>")

    if out.ended == "call" and out.messages and out.messages[-1].recipient:
        out.tool_call = _tool_call(out.messages[-1], problems)
    return out


def _build_header(header: _Header, decode: Any, problems: list[str], *, index: int, completion: bool) -> Message:
    """Turn header segments (``role ...``, ``<|channel|>channel ...``, ``<|constrain|>type``) into a Message."""
    role, name = header.role, None
    recipient = content_type = channel = None
    constrain = True
    seen_channel = False
    for kind, seg in header.segments:
        words = decode(seg).split()
        if kind == "constrain":
            content_type = " ".join(words) or None
            if content_type is None:
                problems.append(f"message {index}: empty content type after <|constrain|>")
            continue
        if kind == "role" and role is None:
            author = words.pop(0) if words else ""
            role, name = (author, None) if author in ROLES else ("tool", author)
            if not author:
                problems.append(f"message {index}: no author after <|start|>")
                role, name = "assistant", None
            elif role != "assistant" and completion:
                problems.append(f"message {index}: author {author!r} in a completion (only the assistant writes here)")
        elif kind == "channel":
            if seen_channel:
                problems.append(f"message {index}: two <|channel|> in one header")
            seen_channel = True
            channel = words.pop(0) if words and not words[0].startswith("to=") else ""
        for word in words:
            if word.startswith("to="):
                recipient = word[3:] or None
            else:  # a bare content type, e.g. `to=python code`
                content_type, constrain = word, False
    if role != "assistant":
        pass  # only assistant messages must name a channel
    elif channel is None:
        problems.append(f"message {index}: no channel (Harmony requires <|channel|>analysis/commentary/final)")
    elif channel not in CHANNELS:
        problems.append(f"message {index}: unknown channel {channel!r} (valid: {', '.join(CHANNELS)})")
    return Message(role, "", channel=channel, recipient=recipient, content_type=content_type,  # type: ignore[arg-type]
                   name=name, constrain=constrain)  # fmt: skip


def _check_end(msg: Message, end: str, problems: list[str], *, index: int) -> None:
    if end == "<|call|>" and not msg.recipient:
        problems.append(f"message {index}: <|call|> ends a message with no recipient (to=...)")
    elif end != "<|call|>" and msg.recipient and msg.role == "assistant":
        problems.append(f"message {index}: a call to {msg.recipient} ends with {end}, not <|call|>")
    elif end == "<|return|>" and msg.channel != "final":
        problems.append(f"message {index}: <|return|> ends a {msg.channel or 'channel-less'} message, not a final one")


def _tool_call(msg: Message, problems: list[str]) -> ToolCall:
    call = ToolCall(msg.recipient or "", msg.content, content_type=msg.content_type, channel=msg.channel)
    if call.content_type == "json" or call.namespace == "functions":
        try:
            call.arguments = json.loads(msg.content) if msg.content.strip() else {}
        except json.JSONDecodeError as e:
            call.error = f"tool call to {call.recipient}: arguments are not valid JSON ({e.msg} at char {e.pos})"
        else:
            if call.namespace == "functions" and not isinstance(call.arguments, dict):
                call.error = f"tool call to {call.recipient}: arguments must be a JSON object, got {msg.content!r}"
                call.arguments = None
        if call.error:
            problems.append(call.error)
    return call
