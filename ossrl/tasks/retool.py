"""ReTool-style math: the model may run Python (in ``ossrl.sandbox``) as many times as it likes before answering.

The ``python`` tool takes ``{"code": "..."}`` (or raw code, as the built-in python tool sends it), runs it in a
fresh sandboxed process and returns what it printed; a failed run returns ``error: KIND`` and the end of stderr.
The output is cut to ``max_output_chars`` (head and tail kept) so one call cannot flood the context; the engine
cuts the rendered result again to ``SamplingParams.max_tool_tokens``. Rewards are on the final answer only.
"""

from __future__ import annotations

from typing import Any

from ossrl.harmony import ParsedCompletion, Tool
from ossrl.tasks.base import ToolSpec, register_task
from ossrl.tasks.gsm8k import MathTask
from ossrl.tasks.rewards import Reward, per_sample, tool_calls

RETOOL_INSTRUCTIONS = (
    "Solve the math problem. You can run Python code with the `python` tool: send the code, you get back what it "
    "prints (use print). Check your arithmetic with code when it helps. End your final answer with a line of the "
    "form '#### <answer>' holding the number only."
)
PYTHON_TOOL = Tool(
    "python",
    "Run a Python 3 program in a fresh sandbox (no network, no files kept between calls) and return its printed "
    "output. Print the values you need.",
    {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "A complete Python program"}},
        "required": ["code"],
    },  # fmt: skip
)


def truncate_middle(text: str, budget: int) -> str:
    """``text`` cut to about ``budget`` characters, keeping its head and tail (errors and results live there)."""
    if len(text) <= budget:
        return text
    head = budget * 2 // 3
    tail = budget - head
    return f"{text[:head]}\n[... {len(text) - head - tail} characters cut ...]\n{text[len(text) - tail :]}"


def format_run(result: Any, max_output_chars: int) -> str:
    """A SandboxResult as the model reads it."""
    if result.ok:
        return truncate_middle(result.stdout, max_output_chars) if result.stdout else "(no output)"
    out = f"error: {result.error_kind}"
    if result.error_kind == "timeout":
        out += f" after {result.wall_time_s:.1f} s"
    body = "\n".join(part for part in (result.stdout, result.stderr) if part)
    return f"{out}\n{truncate_middle(body, max_output_chars)}" if body else out


def python_tool(*, timeout_s: float = 10.0, memory_mb: int = 1024, max_output_chars: int = 2000) -> ToolSpec:
    """The ``python`` tool: an async callable (the engine runs many at once, each in its own sandbox process)."""

    async def python(code: str | None = None, **extra: Any) -> str:
        if extra:
            return f"error: unexpected argument(s) {sorted(extra)}; python takes {{'code': '...'}}"
        if not isinstance(code, str) or not code.strip():
            return "error: no code: call python with {'code': '...'}"
        from ossrl.sandbox import run_python_async

        result = await run_python_async(code, timeout_s=timeout_s, memory_mb=memory_mb)
        return format_run(result, max_output_chars)

    return ToolSpec(PYTHON_TOOL, python)


@per_sample
def python_calls(prompt: Any, completion: ParsedCompletion, **_: Any) -> float:
    """How many tool calls the episode made (weight 0: logged, not paid)."""
    return float(len(tool_calls(completion)))


@register_task
class ReTool(MathTask):
    """``retool``: the gsm8k data options (``path``, ``eval_path``, ``eval_size``, ``limit``, keys) plus the python
    tool's ``timeout_s``, ``memory_mb`` and ``max_output_chars``. Rewards ``correct`` (1.0), ``format`` (0.1),
    ``tool_calls`` (0: a metric). Give the engine ``SamplingParams(max_turns=...)`` > 1 so calls get answered."""

    name = "retool"
    default_instructions = RETOOL_INSTRUCTIONS

    def __init__(
        self, *, timeout_s: float = 10.0, memory_mb: int = 1024, max_output_chars: int = 2000, **options: Any
    ) -> None:
        if max_output_chars < 100:
            raise ValueError(f"task retool: max_output_chars must be >= 100, got {max_output_chars}")
        self._tool = python_tool(timeout_s=timeout_s, memory_mb=memory_mb, max_output_chars=max_output_chars)
        super().__init__(**options)

    def tool_definitions(self) -> dict[str, ToolSpec]:
        return {"python": self._tool}

    def reward_definitions(self) -> dict[str, Reward]:
        return {**super().reward_definitions(), "tool_calls": Reward("tool_calls", python_calls, 0.0)}
