"""Multi-turn episodes as the rollout engine writes them, parsed for rewards and rendered for supervised warm starts.

An episode is every token after the prompt: assistant turns, each ending in ``<|call|>`` or ``<|return|>``, with the
engine's tool results (``<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>...<|end|>``) and the
next generation prompt ``<|start|>assistant`` in between. A single-turn completion is the one-turn case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ossrl.harmony import HarmonyTokens, Message, ParsedCompletion, parse_completion, render_completion, render_messages


def _generation_prompt(tokenizer: Any) -> list[int]:
    return render_messages([], tokenizer, add_generation_prompt=True)


def parse_episode(token_ids: Sequence[int], tokenizer: Any) -> ParsedCompletion:
    """Parse an episode into one ParsedCompletion: all messages in order (tool results included, as ``tool``
    messages), ``ended``/``tool_call``/``partial`` from the last assistant turn, problems of every turn.

    Each assistant turn goes through :func:`ossrl.harmony.parse_completion`, so a policy that writes a fake tool
    result inside its own turn gets a problem ("author ... in a completion"), not a tool message."""
    tok = HarmonyTokens.from_tokenizer(tokenizer)
    gen = _generation_prompt(tokenizer)
    ids = [int(t) for t in token_ids]
    out = ParsedCompletion()
    pos, turn = 0, 0
    while True:
        stop = next((i for i in range(pos, len(ids)) if ids[i] in (tok.call, tok.return_)), None)
        last = stop is None or ids[stop] != tok.call or stop + 1 >= len(ids)  # no tool result follows
        part = parse_completion(ids[pos:] if last else ids[pos : stop + 1], tokenizer)
        prefix = f"turn {turn}: " if turn else ""
        out.messages += part.messages
        out.problems += [prefix + p for p in part.problems]
        out.ended, out.partial, out.tool_call = part.ended, part.partial, part.tool_call
        if last:
            return out
        # A tool result: one rendered message up to <|end|>, then the generation prompt <|start|>assistant.
        end = next((i for i in range(stop + 1, len(ids)) if ids[i] == tok.end), None)
        if end is None or ids[end + 1 : end + 1 + len(gen)] != gen:
            out.problems.append(f"turn {turn}: a tool call is followed by tokens that are not a tool result and "
                                "<|start|>assistant")  # fmt: skip
            out.ended = "truncated" if end is None or end + 1 + len(gen) > len(ids) else out.ended
            return out
        result = parse_completion(ids[stop + 1 : end + 1], tokenizer, role=None)
        out.messages += result.messages
        out.problems += [f"turn {turn} tool result: {p}" for p in result.problems]
        out.tool_call = None
        pos, turn = end + 1 + len(gen), turn + 1
        if pos >= len(ids):  # stopped right after a tool result (e.g. out of tokens)
            out.ended = "truncated"
            out.problems.append(f"turn {turn}: truncated before the assistant wrote anything")
            return out


def render_episode(messages: Sequence[Message], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of an episode after the prompt, exactly as the engine would produce it: assistant
    turns (mask 1; a turn ends at a tool call or the final answer) and tool results followed by
    ``<|start|>assistant`` (mask 0). The inverse of :func:`parse_episode`; the supervised warm start's targets."""
    ids: list[int] = []
    mask: list[int] = []
    turn: list[Message] = []
    for i, m in enumerate(messages):
        if m.role == "assistant":
            turn.append(m)
            if m.is_tool_call or i == len(messages) - 1:
                part = render_completion(turn, tokenizer)
                ids += part
                mask += [1] * len(part)
                turn = []
        elif m.role == "tool":
            if i == 0 or not messages[i - 1].is_tool_call:
                raise ValueError(f"message {i}: a tool result must follow a tool call")
            part = render_messages([m], tokenizer, add_generation_prompt=True)
            ids += part
            mask += [0] * len(part)
        else:
            raise ValueError(f"message {i}: an episode holds assistant and tool messages, not {m.role!r}")
    if turn:
        raise ValueError("an episode's assistant turn must end with a tool call or a final answer")
    if messages and messages[-1].role == "tool":
        raise ValueError("an episode must end with an assistant message, not a tool result")
    return ids, mask
