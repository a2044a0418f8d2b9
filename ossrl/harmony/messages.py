"""Harmony messages: one dataclass for every role, spec-default constructors, and conversion from OpenAI-style chat
dicts (``{"role", "content", "thinking", "tool_calls"}``, the input convention of gpt-oss's HF chat template)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")
CHANNELS: tuple[str, ...] = ("analysis", "commentary", "final")
REASONING_EFFORTS: tuple[str, ...] = ("low", "medium", "high")


@dataclass
class Message:
    """One Harmony message: ``<|start|>{header}<|message|>{content}<|end|>``.

    Rendering is faithful to the fields (a missing channel is not invented); the constructors below fill in the
    spec's defaults. ``name`` is the author of a tool message (``functions.get_weather``, ``python``): Harmony
    writes it in place of the role. ``content_type`` is what follows ``<|constrain|>`` (``json``) or, with
    ``constrain=False``, a bare word in the header (``code``, as the built-in python tool uses).
    """

    role: Role
    content: str = ""
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None
    constrain: bool = True

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown Harmony role {self.role!r}; expected one of {', '.join(ROLES)}")
        if self.role == "tool" and not self.name:
            raise ValueError("a tool message needs name= (its author, e.g. 'functions.get_weather' or 'python')")

    @property
    def is_tool_call(self) -> bool:
        return self.role == "assistant" and self.recipient is not None

    # Constructors with the spec's defaults -------------------------------------------------------------------

    @classmethod
    def user(cls, content: str) -> Message:
        return cls("user", content)

    @classmethod
    def developer(cls, instructions: str) -> Message:
        return cls("developer", instructions)

    @classmethod
    def assistant(cls, content: str, channel: str = "final") -> Message:
        return cls("assistant", content, channel=channel)

    @classmethod
    def analysis(cls, content: str) -> Message:
        return cls("assistant", content, channel="analysis")

    @classmethod
    def final(cls, content: str) -> Message:
        return cls("assistant", content, channel="final")

    @classmethod
    def tool_call(cls, name: str, arguments: Mapping[str, Any] | str, *, namespace: str = "functions") -> Message:
        """A function call as the model writes it: commentary channel, ``to=functions.NAME``, ``<|constrain|>json``."""
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        recipient = f"{namespace}.{name}" if namespace else name
        return cls("assistant", args, channel="commentary", recipient=recipient, content_type="json")

    @classmethod
    def tool_result(cls, name: str, content: str, *, namespace: str = "functions") -> Message:
        """A tool's output: ``<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>...<|end|>``."""
        author = f"{namespace}.{name}" if namespace and "." not in name else name
        return cls("tool", content, channel="commentary", recipient="assistant", name=author)


@dataclass
class ToolCall:
    """The tool call that ended a completion (``<|call|>``). ``arguments`` is the parsed JSON (None if the content
    is not JSON, e.g. python code for the built-in ``python`` tool, or if it failed to parse)."""

    recipient: str
    raw_arguments: str
    arguments: Any = None
    content_type: str | None = None
    channel: str | None = None
    error: str | None = None

    @property
    def namespace(self) -> str | None:
        return self.recipient.split(".", 1)[0] if "." in self.recipient else None

    @property
    def name(self) -> str:
        """The function name without its namespace: ``get_weather`` for ``functions.get_weather``."""
        return self.recipient.split(".", 1)[1] if "." in self.recipient else self.recipient


@dataclass
class Tool:
    """A function tool: JSON-schema ``parameters`` (None or no properties: the function takes no arguments)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = field(default=None)

    @classmethod
    def coerce(cls, tool: Tool | Mapping[str, Any]) -> Tool:
        """Accept a Tool, an OpenAI tool ``{"type": "function", "function": {...}}`` or a bare ``{name, ...}``."""
        if isinstance(tool, Tool):
            return tool
        spec = tool.get("function", tool)
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise ValueError(f"a tool needs a name: {tool!r}")
        return cls(spec["name"], spec.get("description") or "", spec.get("parameters"))


def messages_from_chat(chat: Iterable[Mapping[str, Any]]) -> list[Message]:
    """OpenAI-style chat dicts -> Harmony messages, as gpt-oss's HF chat template reads them.

    ``system``/``developer`` dicts become a developer message (Harmony's system message is generated from the
    render options). An assistant dict gives an analysis message from ``thinking`` (or ``reasoning_content``)
    then either its ``tool_calls`` (with no thinking, its ``content`` is the analysis, as in the HF template) or
    a final message with ``content``. A ``tool`` dict takes its author from ``name`` or the last tool call.
    """
    out: list[Message] = []
    last_call: str | None = None
    for i, m in enumerate(chat):
        role = m.get("role")
        content = m.get("content")
        text = (
            content if isinstance(content, str) else "" if content is None else json.dumps(content, ensure_ascii=False)
        )
        if role in ("system", "developer"):
            out.append(Message("developer", text))
        elif role == "user":
            out.append(Message.user(text))
        elif role == "assistant":
            thinking = m.get("thinking") or m.get("reasoning_content")
            calls = m.get("tool_calls") or []
            if calls:
                if thinking and text:
                    raise ValueError(f"chat message {i}: tool calls with both thinking and content; put the "
                                     "chain of thought in one of them")  # fmt: skip
                analysis = thinking or text
                if analysis:
                    out.append(Message.analysis(analysis))
                for call in calls:
                    fn = call.get("function", call)
                    out.append(Message.tool_call(fn["name"], fn.get("arguments") or {}))
                    last_call = fn["name"]
            else:
                if thinking:
                    out.append(Message.analysis(thinking))
                out.append(Message.final(text))
        elif role == "tool":
            name = m.get("name") or last_call
            if not name:
                raise ValueError(f"chat message {i}: tool message with no name and no earlier tool call")
            out.append(Message.tool_result(name, text))
        else:
            raise ValueError(f"chat message {i}: unknown role {role!r}")
    return out
