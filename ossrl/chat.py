"""Talk to a model in Harmony: ``ossrl chat``.

The conversation is a list of Harmony messages (user turns and the assistant's parsed replies, tool calls and
results included); each turn renders the whole conversation with :class:`ossrl.tasks.base.Prompt` (system message,
developer instructions and tool definitions; analysis of finished turns dropped, as the spec says) and generates
with the rollout engine, which runs the task's tools in the loop. :func:`run_chat` reads lines from any iterator and
writes through a callback, so it runs the same from a terminal, a pipe or a test.

    session = ChatSession(model, tokenizer, prompt=task_prompt(task), tools=task.tool_functions)
    run_chat(session, stdin_lines(), print)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ossrl.harmony import Message, ParsedCompletion
from ossrl.rollout import Completion, Engine, Request, SamplingParams
from ossrl.tasks.base import Prompt, Task
from ossrl.tasks.episode import parse_episode

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
HELP = "Type a message; /reset clears the conversation, /exit (or end of input) quits."


def task_prompt(task: Task) -> Prompt:
    """The task's prompt options (instructions, tool definitions, reasoning effort, date, system message) around an
    empty conversation: what ``task.prompt(row)`` builds, without a dataset row."""
    return Prompt(
        [],
        instructions=task.instructions,
        tools=[t.definition for t in task.tools.values()],
        reasoning_effort=task.reasoning_effort,
        current_date=task.current_date,
        system=task.system_message,
    )


@dataclass
class Reply:
    """One turn: the prompt the model saw, the engine's completion, its text (special tokens included), the parsed
    episode and the messages that joined the conversation (``error``: the turn failed, the conversation is as it
    was)."""

    prompt_ids: list[int]
    completion: Completion
    parsed: ParsedCompletion
    text: str = ""
    messages: list[Message] = field(default_factory=list)
    error: str | None = None


class ChatSession:
    """A conversation with a model. ``prompt`` carries the render options (its messages are ignored), ``tools``
    maps tool names to callables (``task.tool_functions``), ``engine`` defaults to ``Engine(model, tokenizer)``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        prompt: Prompt | None = None,
        tools: Mapping[str, Callable[..., Any]] | None = None,
        sampling: SamplingParams | None = None,
        engine: Any = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = prompt if prompt is not None else Prompt([], reasoning_effort="medium")
        self.tools = dict(tools or {})
        self.sampling = sampling or SamplingParams(max_new_tokens=1024, max_turns=4 if self.tools else 1)
        self.engine = engine if engine is not None else Engine(model, tokenizer)
        self.messages: list[Message] = []
        self.turns = 0

    def prompt(self) -> Prompt:
        return replace(self.template, messages=list(self.messages))

    def prompt_ids(self) -> list[int]:
        """Token ids of the whole conversation, ending in the generation prompt ``<|start|>assistant``."""
        return self.prompt().render(self.tokenizer)

    def reset(self) -> None:
        self.messages = []

    def send(self, text: str) -> Reply:
        """Add a user message, generate the assistant's reply (tool calls run by the engine) and keep it."""
        self.messages.append(Message.user(text))
        ids = self.prompt_ids()
        sampling = replace(self.sampling, seed=self.sampling.seed + self.turns)  # fresh randomness each turn
        self.turns += 1
        completion = self.engine.generate([Request(ids)], sampling, tools=self.tools or None)[0][0]
        parsed = parse_episode(completion.token_ids, self.tokenizer)
        text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=False)
        if completion.finish_reason == "error":
            self.messages.pop()  # the turn never happened: the user can rephrase, or /reset
            return Reply(ids, completion, parsed, text, error=completion.error or "generation failed")
        # Only the assistant's messages and tool results join the conversation: a model that writes as another
        # author (a user or developer message in its own turn) would give a conversation Harmony cannot render.
        new = [m for m in parsed.messages if m.role in ("assistant", "tool")]
        partial = parsed.partial
        if partial is not None and partial.role == "assistant" and partial.channel == "final" and partial.content:
            new.append(Message.final(partial.content))  # cut at max_new_tokens: keep what the user saw
        while new and new[-1].is_tool_call:  # a call the engine did not run (out of turns or tokens)
            new.pop()
        self.messages += new
        return Reply(ids, completion, parsed, text, new)


def format_reply(reply: Reply, *, color: bool = False) -> list[str]:
    """Lines to show for a reply: the final answer plainly, analysis / commentary / tool traffic prefixed (and
    dimmed with ``color``), the raw text when nothing parsed, then how the turn ended if not in an answer."""

    def dim(s: str) -> str:
        return f"\x1b[2m{s}\x1b[0m" if color else s

    if reply.error:
        return [f"[error] {reply.error}"]
    lines: list[str] = []
    for m in reply.parsed.messages:
        if m.role == "tool":
            lines.append(dim(f"[{m.name} result] {m.content}"))
        elif m.is_tool_call:
            lines.append(dim(f"[tool call] {m.recipient} {m.content}"))
        elif m.channel == "final":
            lines.append(m.content)
        else:
            lines.append(dim(f"[{m.channel or 'no channel'}] {m.content}"))
    parsed, partial = reply.parsed, reply.parsed.partial
    if partial is not None and partial.content:
        label = "" if partial.channel == "final" else f"[{partial.channel or 'no channel'}] "
        lines.append(dim(label + partial.content) if label else partial.content)
    if not lines and reply.text:  # nothing parsed: show what the model wrote
        lines.append(dim("[raw] " + (reply.text if len(reply.text) <= 300 else reply.text[:300] + " ...")))
    if parsed.ended != "return":
        why = {"truncated": "out of tokens", "call": "tool call not run", "end": "no final answer"}[parsed.ended]
        lines.append(dim(f"[{why}; finish reason {reply.completion.finish_reason}]"))
    if parsed.problems:
        lines.append(dim("[format problems] " + "; ".join(parsed.problems[:3])))
    return lines


def run_chat(
    session: ChatSession, lines: Iterable[str], out: Callable[[str], None], *, color: bool = False
) -> list[Reply]:
    """Read user lines until ``/exit`` or the end of ``lines``; ``/reset`` clears the conversation. Each reply is
    written through ``out`` one line at a time. Returns the replies, in order."""
    replies: list[Reply] = []
    for line in lines:
        text = line.rstrip("\r\n")
        command = text.strip()
        if command in EXIT_COMMANDS:
            break
        if command == RESET_COMMAND:
            session.reset()
            out("(conversation cleared)")
            continue
        if command in ("/help", "/?"):
            out(HELP)
            continue
        if not command:
            continue
        reply = session.send(text)
        replies.append(reply)
        for shown in format_reply(reply, color=color):
            out(shown)
    return replies


def stdin_lines(prompt: str = "you> ") -> Iterator[str]:
    """User lines: with a prompt from a terminal, plainly from a pipe; ends at end of input (Ctrl-D)."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def use_color() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def describe(session: ChatSession) -> str:
    """One line about the session's setup, shown when a chat starts."""
    p = session.template
    tools = ", ".join(session.tools) or "none"
    return (f"reasoning {p.reasoning_effort or 'unset'}, tools: {tools}, temperature {session.sampling.temperature}, "
            f"max new tokens {session.sampling.max_new_tokens}. {HELP}")  # fmt: skip
