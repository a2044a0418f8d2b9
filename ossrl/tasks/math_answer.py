"""Math answers: find THE answer in a model's final text, and check it against a gold answer with math-verify.

One candidate per completion, chosen by fixed rules, so listing many numbers cannot win: the last ``\\boxed{...}``;
else what follows the last ``####``; else what follows the last "answer is" / "answer:"; else the last number in the
text. math-verify then compares it with the gold answer (commas in numbers, ``$``, units, fractions, LaTeX).
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from typing import Any

log = logging.getLogger("ossrl.tasks")
MAX_ANSWER_CHARS = 200  # a longer "answer" is not one; also bounds math-verify's work where it has no timeout

# A number as people write it: $1,234.50, -3, 0.5, 3/4, \frac{3}{4}, 45%.
_NUMBER = re.compile(
    r"-?\\d?frac\{[^{}]+\}\{[^{}]+\}"
    r"|-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?%?"
    r"|-?\$?\s?\.\d+"
)
_ANSWER_IS = re.compile(r"answer(?:\s+is)?\s*[:=]?\s*", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def extract_answer(text: str | None) -> tuple[str | None, str]:
    """``(answer, how)``: the answer string and the rule that found it (``boxed``, ``hashes``, ``answer_is``,
    ``last_number``), or ``(None, "none")``."""
    if not text or not text.strip():
        return None, "none"
    boxed = last_boxed(text)
    if boxed:
        return boxed, "boxed"
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        m = _NUMBER.search(tail)
        if tail:
            return (m.group(0).strip() if m else tail.splitlines()[0].strip()), "hashes"
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        m = _NUMBER.match(text, matches[-1].end()) or _NUMBER.search(text[matches[-1].end() :].split("\n")[0])
        if m:
            return m.group(0).strip(), "answer_is"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].strip(), "last_number"
    return None, "none"


def simple_number(text: str) -> float | None:
    """A plain number after removing ``$``, ``,``, ``%``, spaces and a trailing ``.``; None for anything else."""
    s = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "").rstrip("%")
    try:
        return float(s)
    except ValueError:
        return None


_warned = threading.Event()


def _quiet_timeout_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):  # we say it once ourselves, not once per answer
    logging.getLogger(_name).addFilter(_quiet_timeout_warning)


def _timeout() -> int | None:
    # math-verify's timeout uses SIGALRM, which only the main thread may set; rewards may run in threads.
    if threading.current_thread() is threading.main_thread():
        return 5
    if not _warned.is_set():
        _warned.set()
        log.info("math answers checked outside the main thread: math-verify runs without its timeout "
                 "(answers are capped at %d characters)", MAX_ANSWER_CHARS)  # fmt: skip
    return None


@lru_cache(maxsize=65536)
def _parse(text: str) -> Any:
    from math_verify import parse

    return parse(text, parsing_timeout=_timeout())  # type: ignore[arg-type]


def parse_gold(gold: str) -> Any:
    """The gold answer as math-verify sees it (cached); an empty list when it cannot be parsed."""
    return _parse(gold.strip())


def answers_match(gold: str, answer: str | None) -> bool:
    """Whether ``answer`` equals ``gold``: exact for plain numbers (fast, no tolerance surprises), math-verify
    for anything else (fractions, LaTeX, units, percentages)."""
    if answer is None or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return False
    g, a = simple_number(gold), simple_number(answer)
    if g is not None and a is not None:
        return abs(g - a) <= 1e-9 * max(1.0, abs(g))
    from math_verify import verify

    gold_parsed, answer_parsed = parse_gold(gold), _parse(answer.strip())
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=_timeout()))


def check_answer(gold: str, text: str | None) -> tuple[bool, str | None, str]:
    """``(correct, extracted answer, rule)`` for a completion's final text."""
    answer, how = extract_answer(text)
    return answers_match(gold, answer), answer, how
