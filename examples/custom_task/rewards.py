"""Reward functions for the custom-task example, in TRL's shape.

Each gets, by keyword: ``prompts`` (the dataset's prompt column), ``completions`` (the policy's final answer as a
string: "" when it never finished one), ``completion_ids`` (the token ids) and every other column of the dataset
(here ``answer``) as a list aligned with ``completions``. It returns one float, or None for "does not apply", per
completion. ``**kwargs`` takes whatever it does not use.
"""

import re

NUMBER = re.compile(r"-?\d+")


def correct(completions, answer, **kwargs):
    """1.0 when the final answer is exactly the expected number (surrounding spaces and a final period allowed)."""
    pairs = zip(completions, answer, strict=True)
    return [1.0 if text.strip().rstrip(".") == str(expected) else 0.0 for text, expected in pairs]


def is_number(completions, **kwargs):
    """A small shaping reward: 1.0 when the final answer is a bare integer, whatever its value."""
    return [1.0 if NUMBER.fullmatch(text.strip()) else 0.0 for text in completions]
