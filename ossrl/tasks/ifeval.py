"""``ifeval``: verifiable instruction following on generated prompts (or a local jsonl of the same rows).

Rows are ``{"id", "prompt", "constraints": [{"kind": ..., **params}, ...]}`` (see ifeval_constraints.py). The
constraints are checked on the final-channel text. Rewards: ``all`` (1.0 when every constraint holds), ``fraction``
(the share that holds) and, per constraint kind, ``c/KIND`` (whether this prompt's KIND constraint holds; None when
the prompt has none; weight 0, so they are logged, not paid).
"""

from __future__ import annotations

from typing import Any

from ossrl.harmony import ParsedCompletion
from ossrl.tasks.base import Task, register_task
from ossrl.tasks.data import BadRow, clean_rows, read_local
from ossrl.tasks.ifeval_constraints import KINDS, check, check_all, describe, generate_prompts
from ossrl.tasks.rewards import Reward, per_sample


def ifeval_row(row: dict[str, Any]) -> dict[str, Any]:
    prompt, constraints = row.get("prompt"), row.get("constraints")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRow("missing field 'prompt'")
    if not isinstance(constraints, list) or not constraints:
        raise BadRow("missing field 'constraints'")
    try:
        for c in constraints:
            describe(c)
    except ValueError as err:
        raise BadRow(f"bad constraint ({err})") from err
    return row


@per_sample
def all_reward(prompt: Any, completion: ParsedCompletion, *, constraints: list[dict], **_: Any) -> float:
    return 1.0 if all(check_all(constraints, completion.final_text)) else 0.0


@per_sample
def fraction_reward(prompt: Any, completion: ParsedCompletion, *, constraints: list[dict], **_: Any) -> float:
    ok = check_all(constraints, completion.final_text)
    return sum(ok) / len(ok)


def kind_reward(kind: str) -> Any:
    @per_sample
    def reward(prompt: Any, completion: ParsedCompletion, *, constraints: list[dict], **_: Any) -> float | None:
        mine = [c for c in constraints if c.get("kind") == kind]
        if not mine:
            return None
        return sum(check(c, completion.final_text) for c in mine) / len(mine)

    reward.__name__ = f"ifeval_{kind}"
    return reward


@register_task
class IFEval(Task):
    """``ifeval``: options ``path`` (a local jsonl/json/parquet of rows; its ``eval_size`` last rows are held out)
    or generated rows: ``n_train`` (default 2000), ``n_eval`` (200), ``max_constraints`` (3), ``kinds`` (a subset
    of the constraint kinds). Rewards ``all`` (1.0), ``fraction`` (0.5), ``c/KIND`` (0). No tools."""

    name = "ifeval"
    accuracy_reward = "all"

    def __init__(
        self,
        *,
        path: str | None = None,
        eval_size: int = 200,
        n_train: int = 2000,
        n_eval: int = 200,
        max_constraints: int = 3,
        kinds: list[str] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.path, self.eval_size = path, eval_size
        self.n_train, self.n_eval, self.max_constraints, self.kinds = n_train, n_eval, max_constraints, kinds
        if path is None:  # fail now, not at the first rows() call
            generate_prompts(1, max_constraints=max_constraints, kinds=kinds)

    def load_split(self, split: str) -> list[dict[str, Any]]:
        if self.path is not None:
            rows = clean_rows(read_local(self.path), ifeval_row, source=f"ifeval: {self.path}")
            cut = len(rows) - min(self.eval_size, len(rows) // 2)
            return rows[cut:] if split == "eval" else rows[:cut]
        # Train and eval come from different seeds (and id ranges), so they never share a prompt by construction.
        n, seed, start = (
            (self.n_eval, self.seed + 1_000_003, 10**9) if split == "eval" else (self.n_train, self.seed, 0)
        )
        return generate_prompts(n, seed=seed, max_constraints=self.max_constraints, kinds=self.kinds, start_id=start)

    def user_message(self, row: dict[str, Any]) -> str:
        return row["prompt"]

    def reward_definitions(self) -> dict[str, Reward]:
        rewards = {"all": Reward("all", all_reward, 1.0), "fraction": Reward("fraction", fraction_reward, 0.5)}
        rewards |= {f"c/{k}": Reward(f"c/{k}", kind_reward(k), 0.0) for k in KINDS}
        return rewards
