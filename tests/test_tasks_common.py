"""Helpers shared by the tests/test_tasks_*.py files (no tests here): one tiny tokenizer per process, and token ids
of hand-written completions."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ossrl.harmony import Message, build_tiny_tokenizer, parse_completion, render_completion

GSM8K_TRAIN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"


@functools.cache
def tiny_tokenizer() -> Any:
    return build_tiny_tokenizer()


def final_ids(text: str) -> list[int]:
    """Token ids of a completion that answers ``text`` on the final channel."""
    return render_completion([Message.final(text)], tiny_tokenizer())


def parsed_final(text: str, *, analysis: str | None = None):
    msgs = ([Message.analysis(analysis)] if analysis else []) + [Message.final(text)]
    return parse_completion(render_completion(msgs, tiny_tokenizer()), tiny_tokenizer())
