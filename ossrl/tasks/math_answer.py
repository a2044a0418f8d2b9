"""Math answers: find THE answer in a model's final text, and check it against a gold answer with math-verify.

Which text is the answer. A final text may mark its answer; the marks, strongest first:

1. ``\\boxed{x}`` (or ``\\fbox{x}``): the content, braces balanced (an empty box is no mark).
2. ``#### x``: the number right after the ``####``, or the rest of its line when LaTeX follows (``#### \\sqrt{2}``);
   a markdown heading (``#### Step 1``) is no mark.
3. "answer is x" / "answer: x" / "answer = x", any case, ``**Answer:** x`` too: the first number on the line after
   it (a bare "answer", as in "to answer this", is no mark).
4. bold ``**x**`` whose content is a number, with optional units after it, a ``Label:`` before it or an equation
   before it (``**48 + 24 = 72 clips**`` is 72); a list label such as ``**1.**`` is no mark.

The answer is read from the strongest kind present, so a marked number wins over the numbers after it ("She pays
**18** dollars over 3 weeks" is 18) and over marks of weaker kinds; a text with no mark keeps the last number in it.
Why this order: ``\\boxed`` and ``####`` are the formal answer conventions (MATH, GSM8K) and are written only to
state the answer; a box has an exact extent (its braces) where ``####`` runs to the end of its line, so the box comes
first. "The answer is" states the answer too, but in prose, where the phrase also comes up in passing. Bold is mere
emphasis: worked solutions also bold their intermediate results, so it is the weakest mark, and only the last line
holding a bold number counts (a bolded step result on an earlier line is not a competing answer).

Hedging gets no credit (the policy is optimised against this function):

- the marks of the winning kind must agree: two boxes, two ``####`` or two "answer is" with different values, or
  two different bold numbers on the bold answer's line (``**17** or **18**``), make the answer ambiguous:
  ``(None, "ambiguous")``, which scores 0 for correctness and for format;
- so does one mark holding two answers joined by "or" (``\\boxed{17 \\text{ or } 18}``, ``#### 17 or 18``,
  "the answer is 17 or 18");
- otherwise ONE candidate is chosen, by these rules alone, before the gold is looked at, so writing more numbers
  never raises the chance of credit (math-verify's parse of a box holding a list also yields one value: the last).

Marks agree when they are the same number or math-verify finds them equal (``18``, ``$18.00``; ``0.75``,
``\\frac{3}{4}``); the last of them is returned. math-verify then compares the answer with the gold answer (commas in
numbers, ``$``, units, fractions, LaTeX).
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from itertools import islice
from typing import Any

log = logging.getLogger("ossrl.tasks")
MAX_ANSWER_CHARS = 200  # a longer "answer" is not one; also bounds math-verify's work where it has no timeout
MAX_DISTINCT_MARKS = 8  # more differently written marks of one kind than this: ambiguous without comparing them

# A number as people write it: $1,234.50, -3, 0.5, 3/4, \frac{3}{4}, 45%.
_NUMBER = re.compile(
    r"-?\\d?frac\{[^{}]+\}\{[^{}]+\}"
    r"|-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?%?"
    r"|-?\$?\s?\.\d+"
)
_ANSWER_IS = re.compile(r"\banswer\b(?:\*\*|__)?\s*(?:is\b\s*:?|[:=])(?:\*\*|__)?\s*", re.IGNORECASE)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_BOLD = re.compile(r"\*\*([^*\n]{1,100}?)\*\*")
_LABEL = re.compile(r"[A-Za-z][A-Za-z ]{0,40}:\s*")  # "Total:" before a bold number
_NUMBERED_HEADING = re.compile(r"[.)][ \t]+[A-Za-z]")  # "#### 1. April"
_LIST_LABEL = re.compile(r"\d+[.):]")  # "**1.**" numbers a step, it is no answer
_OR = re.compile(r"\bor\b|\\lor\b", re.IGNORECASE)
_MAX_OR_GAP = 24  # "17 or 18", "17 \text{ or } 18", "17 apples, or 18": text between the two numbers


def _boxes(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` / ``\\fbox{...}``, braces balanced, in order (unclosed ones dropped).
    One pass over the braces: unclosed or nested boxes cost no rescans."""
    starts = [m.end() - 1 for m in _BOX.finditer(text)]
    if not starts:
        return []
    close, stack = {}, []
    for brace in _BRACE.finditer(text, starts[0]):
        if brace.group(0) == "{":
            stack.append(brace.start())
        elif stack:
            close[stack.pop()] = brace.start()
    return [text[i + 1 : close[i]].strip() for i in starts if i in close]


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if there is none."""
    boxes = _boxes(text)
    return boxes[-1] if boxes else None


def _or_hedge(segment: str, first_only: bool) -> bool:
    """Whether two different numbers in ``segment`` are joined by "or" (the first two only with ``first_only``)."""
    numbers = list(islice(_NUMBER.finditer(segment), 2 if first_only else None))
    for a, b in zip(numbers, numbers[1:], strict=False):
        gap = segment[a.end() : b.start()]
        if len(gap) <= _MAX_OR_GAP and _OR.search(gap) and not _same(a.group(0), b.group(0)):
            return True
    return False


def _same(a: str, b: str) -> bool:
    """Whether two marked values are one answer: equal as written (spaces aside), as numbers, or per math-verify."""
    if a.replace(" ", "") == b.replace(" ", ""):
        return True
    x, y = simple_number(a), simple_number(b)
    if x is not None and y is not None:
        return abs(x - y) <= 1e-9 * max(1.0, abs(x))
    return answers_match(a, b)


def _boxed(text: str) -> list[tuple[str, bool]]:
    return [(box, _or_hedge(box, first_only=False)) for box in _boxes(text) if box]


def _hashes(text: str) -> list[tuple[str, bool]]:
    """Each ``####`` followed by a number (``#### 72``, ``####\\n**72**``), or by LaTeX (``#### \\sqrt{2}``: the rest
    of its line); words (a markdown heading: ``#### Step 1``, ``#### 1. April``) are no mark."""
    out = []
    for segment in text.split("####")[1:]:
        body = segment.lstrip().lstrip("*_").removeprefix("\\(").lstrip()
        end = body.find("\n")
        line = body[: end if end >= 0 else len(body)]
        m = _NUMBER.match(body)
        if m is not None and not _NUMBERED_HEADING.match(body, m.end()):
            out.append((m.group(0).strip(), _or_hedge(line, first_only=True)))
        elif body.startswith("\\") and line.strip():
            out.append((line.strip(), _or_hedge(line, first_only=True)))
    return out


def _answer_is(text: str) -> list[tuple[str, bool]]:
    out = []
    for mark in _ANSWER_IS.finditer(text):
        end = text.find("\n", mark.end(), mark.end() + MAX_ANSWER_CHARS)  # the answer's line, or its start
        line = text[mark.end() : end if end >= 0 else mark.end() + MAX_ANSWER_CHARS]
        m = _NUMBER.match(line) or _NUMBER.search(line)
        if m is not None:
            out.append((m.group(0).strip(), _or_hedge(line[m.start() :], first_only=True)))
    return out


def _bold(text: str) -> list[tuple[str, bool]]:
    """The bold numbers on the last line that has any."""
    for line in reversed(text.splitlines()):
        marks = []
        for mark in _BOLD.finditer(line):
            content = mark.group(1).strip().replace("\\$", "$")
            if _LIST_LABEL.fullmatch(content):
                continue
            content = content.rsplit("=", 1)[-1].strip()
            label = _LABEL.match(content)
            content = content[label.end() :] if label else content
            m = _NUMBER.match(content)
            if m is not None:
                marks.append((m.group(0).strip(), _or_hedge(content, first_only=False)))
        if marks:
            return marks
    return []


def _decide(marks: list[tuple[str, bool]]) -> str | None:
    """The last mark when all agree and none hedges, else None."""
    if any(hedged for _, hedged in marks):
        return None
    distinct = list(dict.fromkeys(value for value, _ in marks))
    if len(distinct) > MAX_DISTINCT_MARKS:
        return None
    last = marks[-1][0]
    return last if all(_same(last, value) for value in distinct) else None


def extract_answer(text: str | None) -> tuple[str | None, str]:
    """``(answer, how)``: the answer string and the rule that found it (``boxed``, ``hashes``, ``answer_is``,
    ``bold``, ``last_number``), ``(None, "ambiguous")`` when the strongest marks disagree or hedge, or
    ``(None, "none")``. See the module docstring for the rules."""
    if not text or not text.strip():
        return None, "none"
    for how, find in (("boxed", _boxed), ("hashes", _hashes), ("answer_is", _answer_is), ("bold", _bold)):
        marks = find(text)
        if marks:
            answer = _decide(marks)
            return (answer, how) if answer is not None else (None, "ambiguous")
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].strip(), "last_number"
    return None, "none"


def simple_number(text: str) -> float | None:
    """A plain number after removing ``$``, ``,``, ``%`` (also LaTeX's ``\\$``, ``\\%``), spaces and a trailing ``.``;
    None for anything else."""
    s = text.strip().rstrip(".").replace("\\$", "$").replace("\\%", "%")
    s = s.replace(",", "").replace("$", "").replace(" ", "").rstrip("%")
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
