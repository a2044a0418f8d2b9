"""Verifiable instruction-following constraints (in the spirit of Google's IFEval) and a seeded prompt generator.

A constraint is a JSON-friendly dict ``{"kind": ..., **params}``: :func:`describe` writes the instruction the model
reads, :func:`check` decides whether a response obeys it. Kinds that cannot hold together (all-lowercase and
all-caps, JSON and a title, ...) are never combined by the generator (``CONFLICTS``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Constraint = dict[str, Any]

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_RELATIONS = ("at least", "at most", "less than")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    """Sentences: pieces ending in . ! ? (or the end of text) that hold a word. "P.S." and "e.g." split too; a
    constraint on sentence counts is a rough measure, as in IFEval."""
    parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", text.strip())
    return [p for p in parts if words(p)]


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def bullets(text: str) -> list[str]:
    return re.findall(r"^\s*[*-]\s+\S.*$", text, flags=re.MULTILINE)


def _compare(value: int, relation: str, n: int) -> bool:
    return {"at least": value >= n, "at most": value <= n, "less than": value < n}[relation]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", text, flags=re.IGNORECASE) is not None


def _strip_fence(text: str) -> str:
    t = text.strip()
    m = re.fullmatch(r"```[a-zA-Z]*\s*\n(.*?)\n?```", t, flags=re.DOTALL)
    return m.group(1) if m else t


def _is_json(text: str) -> bool:
    try:
        json.loads(_strip_fence(text))
    except ValueError:
        return False
    return bool(text.strip())


def _case(text: str, lower: bool) -> bool:
    cased = [c for c in text if c.lower() != c.upper()]
    return bool(cased) and all(c.islower() if lower else c.isupper() for c in cased)


def _squash(text: str) -> str:
    return " ".join(text.split()).lower()


def _plural(noun: str, items: Sequence[str]) -> str:
    quoted = [f"'{x}'" for x in items]
    return f"{noun} {quoted[0]}" if len(quoted) == 1 else f"{noun}s {', '.join(quoted[:-1])} and {quoted[-1]}"


# kind -> (instruction writer, checker); each takes the constraint's params as keywords.
_KINDS: dict[str, tuple[Callable[..., str], Callable[..., bool]]] = {
    "word_count": (
        lambda relation, n: f"Answer with {relation} {n} words.",
        lambda text, relation, n: _compare(len(words(text)), relation, n),
    ),
    "sentence_count": (
        lambda relation, n: f"Your response should contain {relation} {n} sentences.",
        lambda text, relation, n: _compare(len(sentences(text)), relation, n),
    ),
    "paragraph_count": (
        lambda n: f"Your response must have exactly {n} paragraphs, separated from each other by one blank line.",
        lambda text, n: len(paragraphs(text)) == n,
    ),
    "include_keywords": (
        lambda keywords: f"Include the {_plural('keyword', keywords)} in your response.",
        lambda text, keywords: all(_has_word(text, k) for k in keywords),
    ),
    "forbidden_words": (
        lambda words: f"Do not include the {_plural('word', words)} in your response.",
        lambda text, words: not any(_has_word(text, w) for w in words),
    ),
    "letter_frequency": (
        lambda letter, relation, n: f"In your response, the letter '{letter}' should appear {relation} {n} times.",
        lambda text, letter, relation, n: _compare(text.lower().count(letter.lower()), relation, n),
    ),
    "json_format": (
        lambda: "Your entire output should be wrapped in JSON format (you may use a ```json code block).",
        lambda text: _is_json(text),
    ),
    "bullet_count": (
        lambda n: (
            f"Your answer must contain exactly {n} bullet points, written as markdown bullets such as:\n"
            "* This is a point."
        ),
        lambda text, n: len(bullets(text)) == n,
    ),
    "title": (
        lambda: "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
        lambda text: re.search(r"<<[^\n<>]*\S[^\n<>]*>>", text) is not None,
    ),
    "postscript": (
        lambda marker: f"At the end of your response, please explicitly add a postscript starting with {marker}",
        lambda text, marker: re.search(rf"^\s*{re.escape(marker)}\s*\S", text, flags=re.MULTILINE) is not None,
    ),
    "lowercase": (
        lambda: (
            "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed."
        ),
        lambda text: _case(text, lower=True),
    ),
    "uppercase": (
        lambda: "Your entire response should be in English, and in all capital letters.",
        lambda text: _case(text, lower=False),
    ),
    "start_with": (
        lambda phrase: f'Start your response with the exact phrase "{phrase}".',
        lambda text, phrase: _squash(text).startswith(_squash(phrase)),
    ),
    "end_with": (
        lambda phrase: f'Finish your response with this exact phrase: "{phrase}" No other words should follow it.',
        lambda text, phrase: _squash(text).endswith(_squash(phrase)),
    ),
}
KINDS: tuple[str, ...] = tuple(_KINDS)

_SHAPE = {"json_format", "paragraph_count", "bullet_count", "title", "postscript", "start_with", "end_with"}
CONFLICTS: dict[str, set[str]] = {
    "json_format": _SHAPE | {"uppercase", "sentence_count"},
    "lowercase": {"uppercase", "postscript"},
    "uppercase": {"lowercase"},
    "postscript": {"end_with", "lowercase"},
    "bullet_count": {"paragraph_count"},
}
for _k, _vs in list(CONFLICTS.items()):  # make the relation symmetric
    for _v in _vs - {_k}:
        CONFLICTS.setdefault(_v, set()).add(_k)
for _k in KINDS:
    CONFLICTS.setdefault(_k, set()).discard(_k)


def _split(constraint: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if not isinstance(constraint, Mapping) or constraint.get("kind") not in _KINDS:
        kind = constraint.get("kind") if isinstance(constraint, Mapping) else constraint
        raise ValueError(f"unknown ifeval constraint {kind!r}; kinds: {', '.join(KINDS)}")
    params = {k: v for k, v in constraint.items() if k != "kind"}
    relation = params.get("relation")
    if relation is not None and relation not in _RELATIONS:
        raise ValueError(f"constraint {constraint!r}: relation must be one of {_RELATIONS}")
    return constraint["kind"], params


def describe(constraint: Mapping[str, Any]) -> str:
    kind, params = _split(constraint)
    try:
        return _KINDS[kind][0](**params)
    except TypeError as err:
        raise ValueError(f"constraint {dict(constraint)!r}: bad parameters ({err})") from err


def check(constraint: Mapping[str, Any], text: str | None) -> bool:
    """Whether ``text`` obeys ``constraint``; no text (no final answer) obeys nothing."""
    kind, params = _split(constraint)
    return bool(text) and bool(_KINDS[kind][1](text, **params))


def check_all(constraints: Sequence[Mapping[str, Any]], text: str | None) -> list[bool]:
    return [check(c, text) for c in constraints]


# --- generator ----------------------------------------------------------------------------------------------------

TOPICS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle gear system works.",
    "Write a product description for a reusable water bottle.",
    "Describe your ideal weekend in the mountains.",
    "Write a letter to a friend recommending a book you enjoyed.",
    "Explain why the sky is blue to a ten-year-old.",
    "Give advice to a student starting their first programming course.",
    "Write a review of a small neighborhood bakery.",
    "Describe the life cycle of a butterfly.",
    "Write a short speech for the opening of a community garden.",
    "Summarize the benefits of regular exercise.",
    "Write a poem about the first snow of winter.",
    "Explain how to make a cup of tea.",
    "Describe a city you would like to visit and why.",
    "Write a job advertisement for a museum guide.",
    "Explain what a budget is and how to keep one.",
    "Write a diary entry of an astronaut on the first day in orbit.",
    "Give tips for a good night's sleep.",
    "Describe how rain forms.",
    "Write a pitch for a board game about trains.",
)
KEYWORDS = ("river", "lantern", "garden", "silver", "journey", "window", "coffee", "bridge", "thunder", "maple",
            "compass", "harbor", "whisper", "orbit", "meadow")  # fmt: skip
FORBIDDEN = ("very", "really", "thing", "good", "nice", "just", "actually", "basically", "great", "amazing")
START_PHRASES = ("My answer is", "Here is what I think", "Dear reader")
END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have additional questions.",
               "That is all.")  # fmt: skip


def random_constraint(kind: str, rng: random.Random) -> Constraint:
    """One constraint of ``kind`` with random parameters (always satisfiable)."""
    if kind == "word_count":
        relation = rng.choice(("at least", "at most"))
        return {"kind": kind, "relation": relation, "n": rng.choice((40, 80, 120, 200) if relation == "at least"
                                                                     else (30, 60, 100, 150))}  # fmt: skip
    if kind == "sentence_count":
        relation = rng.choice(("at least", "at most"))
        return {"kind": kind, "relation": relation, "n": rng.choice((3, 5, 8) if relation == "at least" else (2, 4, 6))}
    if kind in ("paragraph_count", "bullet_count"):
        return {"kind": kind, "n": rng.randint(2, 5)}
    if kind == "include_keywords":
        return {"kind": kind, "keywords": rng.sample(KEYWORDS, rng.randint(1, 3))}
    if kind == "forbidden_words":
        return {"kind": kind, "words": rng.sample(FORBIDDEN, rng.randint(1, 3))}
    if kind == "letter_frequency":
        relation = rng.choice(("at least", "less than"))
        n = rng.choice((5, 10, 15)) if relation == "at least" else rng.choice((20, 40, 60))
        return {"kind": kind, "letter": rng.choice("aeinorst"), "relation": relation, "n": n}
    if kind == "postscript":
        return {"kind": kind, "marker": "P.S."}
    if kind == "start_with":
        return {"kind": kind, "phrase": rng.choice(START_PHRASES)}
    if kind == "end_with":
        return {"kind": kind, "phrase": rng.choice(END_PHRASES)}
    if kind in _KINDS:
        return {"kind": kind}
    raise ValueError(f"unknown ifeval constraint {kind!r}; kinds: {', '.join(KINDS)}")


def generate_prompts(
    n: int, *, seed: int = 0, max_constraints: int = 3, kinds: Sequence[str] | None = None, start_id: int = 0
) -> list[dict[str, Any]]:
    """``n`` rows ``{"id", "prompt", "constraints"}``: a topic and 1..max_constraints compatible constraints.
    Deterministic in ``seed``."""
    kinds = list(kinds or KINDS)
    for k in kinds:
        if k not in _KINDS:
            raise ValueError(f"unknown ifeval constraint {k!r}; kinds: {', '.join(KINDS)}")
    if max_constraints < 1:
        raise ValueError(f"max_constraints must be >= 1, got {max_constraints}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chosen: list[str] = []
        for _ in range(rng.randint(1, max_constraints)):
            options = [k for k in kinds if k not in chosen and not CONFLICTS[k] & set(chosen)]
            if not options:
                break
            chosen.append(rng.choice(options))
        constraints = [random_constraint(k, rng) for k in chosen]
        prompt = " ".join([rng.choice(TOPICS), *(describe(c) for c in constraints)])
        rows.append({"id": start_id + i, "prompt": prompt, "constraints": constraints})
    return rows
