"""GSM8K: grade-school math word problems, graded on the final answer with math-verify.

Data: ``openai/gsm8k`` ("main" config, splits train/test) from the Hub, or local files (``path=`` a .jsonl/.parquet
file with ``question`` and ``answer`` columns, as the Hub's; ``eval_path=`` the held-out file). Without an eval file,
``eval_size`` rows of the train file are held out (a seeded choice). The gold answer is what follows ``####`` in
``answer``. Rows without a question, without ``####`` or whose gold does not parse are skipped (counted, logged).
"""

from __future__ import annotations

import random
from typing import Any

from ossrl.harmony import ParsedCompletion
from ossrl.tasks.base import Task, register_task
from ossrl.tasks.data import BadRow, clean_rows, is_local, load_hub, read_local, require
from ossrl.tasks.math_answer import check_answer, extract_answer, parse_gold, simple_number
from ossrl.tasks.rewards import Reward, final_text, per_sample

HUB_NAME, HUB_CONFIG = "openai/gsm8k", "main"
MATH_INSTRUCTIONS = (
    "Solve the math problem. Reason step by step, then end your final answer with a line of the form "
    "'#### <answer>' holding the number only."
)


def gold_from_solution(solution: str) -> str:
    """The gold answer of a GSM8K solution: the text after the last ``####``, commas removed (``1,000`` -> ``1000``).
    Raises BadRow when there is no ``####`` or the answer is not a number math-verify can read."""
    if "####" not in solution:
        raise BadRow("no '####' in the answer")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise BadRow("empty answer after '####'")
    if simple_number(gold) is None and not parse_gold(gold):
        raise BadRow("unparseable answer")
    return gold


def math_row(row: dict[str, Any], question_key: str = "question", answer_key: str = "answer") -> dict[str, Any]:
    """A problem row: ``question``, ``answer`` (the reference solution), ``gold`` (the final answer)."""
    question, solution = require(row, question_key, answer_key)
    if "####" in solution:
        gold = gold_from_solution(solution)
    else:  # datasets whose answer column is the bare final answer
        gold = solution.strip().replace(",", "") if simple_number(solution) is not None else solution.strip()
        if simple_number(gold) is None and not parse_gold(gold):
            raise BadRow("unparseable answer")
    return {**row, "question": question, "answer": solution, "gold": gold}


@per_sample
def correct_reward(prompt: Any, completion: ParsedCompletion, *, gold: str, **_: Any) -> float:
    """1.0 when the final answer equals ``gold`` (see math_answer.extract_answer for which number counts)."""
    return 1.0 if check_answer(gold, completion.final_text)[0] else 0.0


@per_sample
def format_reward(prompt: Any, completion: ParsedCompletion, **_: Any) -> float:
    """1.0 for well-formed Harmony that ends in a final answer marked as asked (``#### x`` or ``\\boxed{x}``)."""
    if not completion.ok or completion.ended != "return":
        return 0.0
    return 1.0 if extract_answer(final_text(completion))[1] in ("hashes", "boxed") else 0.0


class MathTask(Task):
    """Shared by gsm8k and retool: question/answer rows from the Hub or local files, math-verify rewards."""

    hub_name: str = HUB_NAME
    hub_config: str | None = HUB_CONFIG
    default_instructions = MATH_INSTRUCTIONS

    def __init__(
        self,
        *,
        path: str | None = None,
        eval_path: str | None = None,
        eval_size: int = 500,
        limit: int | None = None,
        question_key: str = "question",
        answer_key: str = "answer",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if limit is not None and limit < 1:
            raise ValueError(f"task {self.name}: limit must be >= 1, got {limit}")
        self.path, self.eval_path, self.eval_size, self.limit = path, eval_path, eval_size, limit
        self.question_key, self.answer_key = question_key, answer_key

    def _raw(self, split: str) -> tuple[list[Any], str]:
        if split == "eval" and self.eval_path:
            return read_local(self.eval_path), str(self.eval_path)
        if self.path is not None and is_local(self.path):
            return read_local(self.path), str(self.path)
        name = self.path or self.hub_name
        hub_split = "test" if split == "eval" else "train"
        return load_hub(name, self.hub_config if self.path is None else None, hub_split), f"{name}[{hub_split}]"

    def load_split(self, split: str) -> list[dict[str, Any]]:
        raw, source = self._raw(split)
        if self.limit is not None:
            raw = raw[: self.limit]
        rows = clean_rows(
            raw, lambda r: math_row(r, self.question_key, self.answer_key), source=f"{self.name}: {source}"
        )
        local_single = self.path is not None and is_local(self.path) and not self.eval_path
        if not local_single:
            return rows
        # One local file: hold out a seeded set of rows for eval, the rest trains (same split every run).
        held = set(random.Random(self.seed).sample(range(len(rows)), min(self.eval_size, len(rows) // 2)))
        return [r for i, r in enumerate(rows) if (i in held) == (split == "eval")]

    def user_message(self, row: dict[str, Any]) -> str:
        return row["question"]

    def reward_definitions(self) -> dict[str, Reward]:
        return {"correct": Reward("correct", correct_reward, 1.0), "format": Reward("format", format_reward, 0.1)}


@register_task
class GSM8K(MathTask):
    """``gsm8k``: options ``path``, ``eval_path``, ``eval_size`` (held out of a single local file, default 500),
    ``limit`` (first N rows of each file), ``question_key``/``answer_key``; rewards ``correct`` (1.0) and
    ``format`` (0.1); no tools."""

    name = "gsm8k"
