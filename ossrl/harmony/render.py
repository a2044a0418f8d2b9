"""Render a conversation in the Harmony format, as text (goldens, debugging) or token ids (the model's input).

Both forms come from one list of pieces (text or special token), so they cannot disagree. Text is encoded piece by
piece with special-token parsing off: a user who types ``<|end|>`` gets the characters, never the control token.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from ossrl.harmony.messages import CHANNELS, REASONING_EFFORTS, Message, Tool, messages_from_chat
from ossrl.harmony.tokenizer import HarmonyTokens
from ossrl.harmony.tools import render_tools_section

DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
GENERATION_PROMPT = "<|start|>assistant"

Piece = tuple[str, bool]  # (text, is_special_token)


def system_text(
    *,
    reasoning_effort: str | None = "medium",
    current_date: str | None = "today",
    model_identity: str | None = DEFAULT_IDENTITY,
    knowledge_cutoff: str | None = KNOWLEDGE_CUTOFF,
    builtin_tools: Sequence[str] = (),
    has_function_tools: bool = False,
    channels: Sequence[str] = CHANNELS,
) -> str:
    """The content of Harmony's system message. ``current_date="today"`` writes today's date; None leaves it out."""
    if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort={reasoning_effort!r}; expected one of {', '.join(REASONING_EFFORTS)}")
    if current_date == "today":
        current_date = datetime.date.today().isoformat()
    top = [model_identity]
    top += [f"Knowledge cutoff: {knowledge_cutoff}" if knowledge_cutoff else None]
    top += [f"Current date: {current_date}" if current_date else None]
    sections = ["\n".join(line for line in top if line)] if any(top) else []
    if reasoning_effort:
        sections.append(f"Reasoning: {reasoning_effort}")
    if builtin_tools:
        sections.append(render_tools_section(builtin=builtin_tools))
    if channels:
        header = f"# Valid channels: {', '.join(channels)}. Channel must be included for every message."
        if has_function_tools:
            header += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(header)
    return "\n\n".join(sections)


def developer_text(instructions: str | None = None, tools: Sequence[Tool | Mapping[str, Any]] = ()) -> str:
    """The content of the developer message: ``# Instructions`` and the ``# Tools`` / ``## functions`` block."""
    sections = ["# Instructions", instructions] if instructions else []
    if tools:
        sections.append(render_tools_section(tools))
    return "\n\n".join(sections)


def message_pieces(message: Message, *, end: str | None = None) -> list[Piece]:
    """``<|start|>{header}<|message|>{content}{end}``. The header text between two special tokens is one piece,
    so encoding the pieces gives the same ids as encoding the whole rendered string."""
    m = message
    author = (m.name or "") if m.role == "tool" else m.role
    to = f" to={m.recipient}" if m.recipient else ""
    bare_type = f" {m.content_type}" if m.content_type and not m.constrain else ""
    # The recipient goes in the channel section of assistant messages, as the model writes tool calls
    # (`<|channel|>commentary to=functions.f`), and in the role section of others (`functions.f to=assistant`).
    if m.channel is not None and m.role == "assistant":
        header: list[Piece] = [(author, False), ("<|channel|>", True), (m.channel + to + bare_type, False)]
    elif m.channel is not None:
        header = [(author + to, False), ("<|channel|>", True), (m.channel + bare_type, False)]
    else:
        header = [(author + to + bare_type, False)]
    if m.content_type and m.constrain:
        header[-1] = (header[-1][0] + " ", False)
        header += [("<|constrain|>", True), (m.content_type, False)]
    if end is None:
        end = "<|call|>" if m.is_tool_call else "<|end|>"
    return [("<|start|>", True), *header, ("<|message|>", True), (m.content, False), (end, True)]


def _coerce(messages: Sequence[Message | Mapping[str, Any]]) -> list[Message]:
    if all(isinstance(m, Message) for m in messages):
        return list(messages)  # type: ignore[arg-type]
    if all(isinstance(m, Mapping) for m in messages):
        return messages_from_chat(messages)  # type: ignore[arg-type]
    raise TypeError("messages must be all ossrl.harmony.Message or all chat dicts, not a mix")


def drop_old_analysis(messages: Sequence[Message]) -> list[Message]:
    """Drop chain-of-thought of finished turns: an analysis message before the last user message is dropped when a
    final answer follows it. The current turn keeps its analysis (after tool calls the model needs its CoT back)."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    keep, answered = [], False  # answered: a final answer follows, before the last user message
    for i in reversed(range(len(messages))):
        m = messages[i]
        if i < last_user and m.role == "assistant":
            if m.channel == "analysis" and answered:
                continue
            answered = answered or m.channel == "final"
        keep.append(m)
    return keep[::-1]


def conversation_pieces(
    messages: Sequence[Message | Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    reasoning_effort: str | None = "medium",
    tools: Sequence[Tool | Mapping[str, Any]] | None = None,
    instructions: str | None = None,
    current_date: str | None = "today",
    model_identity: str | None = DEFAULT_IDENTITY,
    knowledge_cutoff: str | None = KNOWLEDGE_CUTOFF,
    builtin_tools: Sequence[str] = (),
    system: bool = True,
    drop_analysis: bool = True,
) -> list[Piece]:
    msgs = _coerce(messages)
    if msgs and msgs[0].role in ("system", "developer"):
        if instructions is not None:
            raise ValueError("instructions given twice: as instructions= and as a leading system/developer message")
        instructions, msgs = msgs[0].content, msgs[1:]
    misplaced = [i for i, m in enumerate(msgs) if m.role in ("system", "developer")]
    if misplaced:
        raise ValueError(
            f"system/developer messages are only allowed first (found at {misplaced}); Harmony has one system "
            "message (from the render options) and one developer message (instructions)"
        )
    tools = list(tools or [])
    pieces: list[Piece] = []
    if system:
        content = system_text(
            reasoning_effort=reasoning_effort,
            current_date=current_date,
            model_identity=model_identity,
            knowledge_cutoff=knowledge_cutoff,
            builtin_tools=builtin_tools,
            has_function_tools=bool(tools),
        )
        pieces += message_pieces(Message("system", content))
    if instructions or tools:
        pieces += message_pieces(Message("developer", developer_text(instructions, tools)))
    if drop_analysis:
        msgs = drop_old_analysis(msgs)
    for i, m in enumerate(msgs):
        # A final answer that ends the conversation is a training target: it ends as sampled, with <|return|>.
        last_final = i == len(msgs) - 1 and not add_generation_prompt and m.role == "assistant"
        last_final = last_final and m.channel == "final" and m.recipient is None
        pieces += message_pieces(m, end="<|return|>" if last_final else None)
    if add_generation_prompt:
        pieces += [("<|start|>", True), ("assistant", False)]
    return [p for p in pieces if p[0]]


def messages_pieces(messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[Piece]:
    pieces = [p for m in messages for p in message_pieces(m)]
    return pieces + ([("<|start|>", True), ("assistant", False)] if add_generation_prompt else [])


def completion_pieces(messages: Sequence[Message]) -> list[Piece]:
    """The pieces of assistant messages as sampled after the generation prompt ``<|start|>assistant``: the first
    message's ``<|start|>assistant`` is left out, a trailing final answer ends with ``<|return|>``."""
    if not messages or messages[0].role != "assistant":
        raise ValueError("a completion starts with an assistant message")
    pieces: list[Piece] = []
    for i, m in enumerate(messages):
        last_final = i == len(messages) - 1 and m.channel == "final" and not m.is_tool_call
        pieces += message_pieces(m, end="<|return|>" if last_final else None)
    return [(pieces[1][0][len("assistant") :], False), *pieces[2:]]


def render_messages_text(messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
    """Messages rendered as they are (no generated system message, no dropping): e.g. a tool result to append."""
    return "".join(text for text, _ in messages_pieces(messages, add_generation_prompt=add_generation_prompt))


def render_messages(messages: Sequence[Message], tokenizer: Any, *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of :func:`render_messages_text`: in a multi-turn rollout, the tool output to append after a
    ``<|call|>``, with ``add_generation_prompt=True`` to let the model continue."""
    return encode_pieces(messages_pieces(messages, add_generation_prompt=add_generation_prompt), tokenizer)


def render_completion_text(messages: Sequence[Message]) -> str:
    return "".join(text for text, _ in completion_pieces(messages))


def render_completion(messages: Sequence[Message], tokenizer: Any) -> list[int]:
    """The token ids a model samples for these assistant messages (a training target; inverse of parse)."""
    return encode_pieces(completion_pieces(messages), tokenizer)


def render_conversation_text(messages: Sequence[Message | Mapping[str, Any]], **options: Any) -> str:
    """The Harmony string of a conversation; same options as :func:`render_conversation`."""
    return "".join(text for text, _ in conversation_pieces(messages, **options))


def render_conversation(
    messages: Sequence[Message | Mapping[str, Any]],
    tokenizer: Any,
    *,
    add_generation_prompt: bool = True,
    reasoning_effort: str | None = "medium",
    tools: Sequence[Tool | Mapping[str, Any]] | None = None,
    instructions: str | None = None,
    current_date: str | None = "today",
    model_identity: str | None = DEFAULT_IDENTITY,
    knowledge_cutoff: str | None = KNOWLEDGE_CUTOFF,
    builtin_tools: Sequence[str] = (),
    system: bool = True,
    drop_analysis: bool = True,
) -> list[int]:
    """Token ids of a conversation, ending with ``<|start|>assistant`` when ``add_generation_prompt``.

    The system message is generated (identity, knowledge cutoff, date, reasoning effort, channels); ``system=False``
    leaves it out. The developer message holds ``instructions`` (or a leading system/developer message) and the
    function ``tools`` (OpenAI tool dicts or :class:`Tool`). With ``drop_analysis`` the CoT of finished turns is
    dropped, per the spec. Without a generation prompt, a trailing final answer ends with ``<|return|>``.
    """
    pieces = conversation_pieces(
        messages,
        add_generation_prompt=add_generation_prompt,
        reasoning_effort=reasoning_effort,
        tools=tools,
        instructions=instructions,
        current_date=current_date,
        model_identity=model_identity,
        knowledge_cutoff=knowledge_cutoff,
        builtin_tools=builtin_tools,
        system=system,
        drop_analysis=drop_analysis,
    )
    return encode_pieces(pieces, tokenizer)


def encode_pieces(pieces: Sequence[Piece], tokenizer: Any) -> list[int]:
    special = HarmonyTokens.from_tokenizer(tokenizer).by_text
    pieces = [p for p in pieces if p[0]]
    texts = [text for text, is_special in pieces if not is_special]
    encoded = iter(tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else [])
    ids: list[int] = []
    for text, is_special in pieces:
        if is_special:
            ids.append(special[text])
        else:
            ids.extend(next(encoded))
    return ids
