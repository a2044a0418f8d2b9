"""``arithmetic``: the tiny demo task. Multi-digit arithmetic a tiny model cannot do in its head, with a
``calculator`` tool it may call; the reward is on the final answer.

Everything is generated from the seed: problems (``What is 4821 * 37?``), the train / eval split (eval never repeats
a train expression) and the supervised demonstrations of the warm-start phase, some calling the calculator
(call, result, final answer) and some answering directly, rendered exactly as the rollout engine would write them.
"""

from __future__ import annotations

import random
import re
from typing import Any

from ossrl.harmony import Message, ParsedCompletion
from ossrl.tasks.base import Task, ToolSpec, register_task
from ossrl.tasks.calculator import CALCULATOR_TOOL, calculator, format_number, safe_eval
from ossrl.tasks.episode import render_episode
from ossrl.tasks.math_answer import extract_answer, simple_number
from ossrl.tasks.rewards import Reward, final_text, per_sample, tool_calls

ARITHMETIC_INSTRUCTIONS = "Use the calculator tool for arithmetic. Reply with the number only."
_OPS = ("+", "-", "*")


def make_problem(rng: random.Random, *, min_digits: int, max_digits: int, operands: int) -> dict[str, Any]:
    """One problem: ``{"question", "expression", "answer"}`` with ``answer`` the exact integer as text."""
    digits = [rng.randint(min_digits, max_digits) for _ in range(operands)]
    nums = [rng.randint(10 ** (d - 1), 10**d - 1) for d in digits]
    ops = [rng.choice(_OPS) for _ in range(operands - 1)]
    expression = str(nums[0]) + "".join(f" {op} {n}" for op, n in zip(ops, nums[1:], strict=True))
    return {
        "question": f"What is {expression}?",
        "expression": expression,
        "answer": format_number(safe_eval(expression)),
    }


def generate_problems(
    n: int, *, seed: int, min_digits: int = 2, max_digits: int = 4, operands: int = 2, exclude: set[str] | None = None
) -> list[dict[str, Any]]:
    """``n`` distinct problems, deterministic in ``seed``; expressions in ``exclude`` are never drawn."""
    if not 1 <= min_digits <= max_digits or operands < 2:
        raise ValueError(f"arithmetic: need 1 <= min_digits <= max_digits and operands >= 2; got {min_digits=}, "
                         f"{max_digits=}, {operands=}")  # fmt: skip
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[dict[str, Any]] = []
    for _ in range(100 * n + 1000):
        if len(rows) == n:
            break
        p = make_problem(rng, min_digits=min_digits, max_digits=max_digits, operands=operands)
        if p["expression"] not in seen:
            seen.add(p["expression"])
            rows.append({"id": len(rows), **p})
    if len(rows) < n:
        raise ValueError(f"arithmetic: only {len(rows)} distinct problems of this size exist; asked for {n}")
    return rows


def answer_of(text: str | None) -> str | None:
    """The number the final answer gives: the whole text if it is a number, else the last number in it."""
    if not text:
        return None
    if simple_number(text) is not None:
        return text.strip().rstrip(".")
    return extract_answer(text)[0]


@per_sample
def correct_reward(prompt: Any, completion: ParsedCompletion, *, answer: str, **_: Any) -> float:
    got = answer_of(completion.final_text)
    value = simple_number(got) if got is not None else None
    return 1.0 if value is not None and value == float(answer) else 0.0


@per_sample
def format_reward(prompt: Any, completion: ParsedCompletion, **_: Any) -> float:
    """Well-formed Harmony ending in a final answer that is a number and nothing else."""
    ok = completion.ok and completion.ended == "return" and simple_number(final_text(completion)) is not None
    return 1.0 if ok else 0.0


@per_sample
def calculator_calls(prompt: Any, completion: ParsedCompletion, **_: Any) -> float:
    return float(len(tool_calls(completion)))


@register_task
class Arithmetic(Task):
    """``arithmetic``: options ``n_train`` (2000), ``n_eval`` (200), ``min_digits`` (2), ``max_digits`` (4),
    ``operands`` (2). Tool ``calculator``. Rewards ``correct`` (1.0), ``format`` (0.1), ``tool_calls`` (0: a
    metric: how many calls)."""

    name = "arithmetic"
    default_instructions = ARITHMETIC_INSTRUCTIONS

    def __init__(
        self,
        *,
        n_train: int = 2000,
        n_eval: int = 200,
        min_digits: int = 2,
        max_digits: int = 4,
        operands: int = 2,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.n_train, self.n_eval = n_train, n_eval
        self.sizes = {"min_digits": min_digits, "max_digits": max_digits, "operands": operands}
        generate_problems(1, seed=self.seed, **self.sizes)  # checks the options now

    def load_split(self, split: str) -> list[dict[str, Any]]:
        train = generate_problems(self.n_train, seed=self.seed, **self.sizes)
        if split == "train":
            return train
        seen = {r["expression"] for r in train}
        return generate_problems(self.n_eval, seed=self.seed + 1_000_003, exclude=seen, **self.sizes)

    def user_message(self, row: dict[str, Any]) -> str:
        return row["question"]

    def tool_definitions(self) -> dict[str, ToolSpec]:
        return {"calculator": ToolSpec(CALCULATOR_TOOL, calculator)}

    def reward_definitions(self) -> dict[str, Reward]:
        return {
            "correct": Reward("correct", correct_reward, 1.0),
            "format": Reward("format", format_reward, 0.1),
            "tool_calls": Reward("tool_calls", calculator_calls, 0.0),
        }

    # --- supervised warm start ------------------------------------------------------------------------------------

    def demonstration(self, row: dict[str, Any], *, use_tool: bool) -> list[Message]:
        """The episode after the prompt: a calculator call, its result and the answer; or the answer directly."""
        if not use_tool:
            return [Message.final(row["answer"])]
        expression = re.sub(r"\s+", " ", row["expression"])
        return [
            Message.tool_call("calculator", {"expression": expression}),
            Message.tool_result("calculator", calculator(expression)),
            Message.final(row["answer"]),
        ]

    def demonstrations(self, n: int, *, tool_fraction: float = 0.5, seed: int | None = None) -> list[dict[str, Any]]:
        """``n`` supervised examples from the train split: ``{**row, "messages", "uses_tool"}``, the calculator
        used in a ``tool_fraction`` share of them (seeded: which rows, and which use the tool)."""
        if not 0.0 <= tool_fraction <= 1.0:
            raise ValueError(f"tool_fraction must be in [0, 1], got {tool_fraction}")
        rng = random.Random(self.seed + 17 if seed is None else seed)
        train = self.rows("train")
        rows = rng.sample(train, n) if n <= len(train) else [rng.choice(train) for _ in range(n)]
        n_tool = round(tool_fraction * n)
        flags = [True] * n_tool + [False] * (n - n_tool)
        rng.shuffle(flags)
        return [
            {**row, "messages": self.demonstration(row, use_tool=f), "uses_tool": f}
            for row, f in zip(rows, flags, strict=True)
        ]

    def render_demonstration(self, demo: dict[str, Any], tokenizer: Any) -> dict[str, list[int]]:
        """``{"prompt_ids", "completion_ids", "loss_mask"}``: the prompt as rollouts render it, the episode's tokens,
        and 1 on the tokens the policy writes (0 on the tool result the engine appends)."""
        ids, mask = render_episode(demo["messages"], tokenizer)
        return {"prompt_ids": self.render_prompt(demo, tokenizer), "completion_ids": ids, "loss_mask": mask}
