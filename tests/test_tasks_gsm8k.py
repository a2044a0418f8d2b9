"""gsm8k (and the math-answer checking it shares with retool) on the shared train file."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from test_tasks_common import GSM8K_TRAIN, final_ids, tiny_tokenizer

from ossrl.harmony import Message, render_completion
from ossrl.tasks import answers_match, extract_answer, get_task, read_local
from ossrl.tasks.gsm8k import gold_from_solution

pytestmark = pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"{GSM8K_TRAIN} is not here")


@pytest.fixture(scope="module")
def task():
    return get_task("gsm8k", path=str(GSM8K_TRAIN), limit=200, eval_size=0)


def test_reference_answers_score_one_off_by_one_scores_zero(task):
    rows = task.rows("train")
    assert len(rows) == 200 and rows[0]["gold"] == "72"
    tok = tiny_tokenizer()
    right = [final_ids(r["answer"]) for r in rows]  # the whole reference solution, ending in "#### 72"
    bare = [final_ids(r["gold"]) for r in rows]
    off = [final_ids(f"#### {int(r['gold']) + 1}") for r in rows]
    out = task.score(rows * 3, right + bare + off, tokenizer=tok)
    correct = out.values["correct"]
    assert correct[:200] == [1.0] * 200
    assert correct[200:400] == [1.0] * 200
    assert correct[400:] == [0.0] * 200
    assert out.values["format"][:200] == [1.0] * 200  # "#### x" is the asked format
    assert out.values["format"][200:400] == [0.0] * 200  # a bare number is right but not in the asked format
    assert out.means()["correct"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "gold, text, ok",
    [
        ("1000", "The total is 1,000.", True),
        ("1000", "#### $1,000", True),
        ("18", "She earns $18.00 per day, so the answer is $18.00", True),
        ("18", "The answer is 18 dollars", True),
        ("0.75", "\\boxed{\\frac{3}{4}}", True),
        ("0.75", "#### 3/4", True),
        ("5", "I think \\boxed{5} cookies", True),
        ("72", "48 + 24 = 72 clips", True),
        ("72", "72 or 73", False),  # one candidate: the last number
        ("72", "The answer is 73. (72 was a typo)", False),
        ("72", "", False),
        ("72", "no idea", False),
    ],
)
def test_math_answers(gold, text, ok):
    answer, _ = extract_answer(text)
    assert answers_match(gold, answer) is ok


def test_malformed_and_empty_completions(task):
    tok = tiny_tokenizer()
    row = task.rows("train")[0]
    truncated = final_ids("#### 72")[:-3]
    no_final = render_completion([Message.tool_call("python", {"code": "1"})], tok)
    garbage = tok.encode("#### 72", add_special_tokens=False)  # no Harmony structure at all
    failed = SimpleNamespace(token_ids=[])  # an engine Completion with no tokens (the engine failed)
    out = task.score([row] * 4, [truncated, no_final, garbage, failed], tokenizer=tok)
    assert out.values["correct"] == [0.0] * 4 and out.values["format"] == [0.0] * 4


def test_bad_rows_are_skipped_and_logged(tmp_path, caplog):
    good = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
    lines = [
        json.dumps(good),
        json.dumps({"question": "no answer"}),
        "{not json",
        json.dumps({"question": "x", "answer": "no hashes here"}),
        json.dumps({"question": "x", "answer": "#### ???"}),
        json.dumps({"question": "", "answer": "#### 3"}),
        json.dumps({"question": "big", "answer": "#### 1,234"}),
    ]
    path = tmp_path / "mini.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="ossrl.tasks"):
        rows = get_task("gsm8k", path=str(path), eval_size=0).rows("train")
    assert [r["gold"] for r in rows] == ["2", "1234"]
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 5 of 7 rows" in msg
    assert "first bad rows (0-based): 1 (missing field 'answer'); 2 (invalid JSON" in msg


def test_parquet_and_held_out_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_local(GSM8K_TRAIN)[:50]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    task = get_task("gsm8k", path=str(tmp_path / "train.parquet"), eval_size=10, seed=3)
    train, held = task.rows("train"), task.rows("eval")
    assert len(train) == 40 and len(held) == 10
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    again = get_task("gsm8k", path=str(tmp_path / "train.parquet"), eval_size=10, seed=3).rows("eval")
    assert [r["question"] for r in again] == [r["question"] for r in held]


def test_hub_loading_fails_clearly_offline(monkeypatch):
    import datasets

    seen = {}

    def offline(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="Offline\\? Pass a local .jsonl/.parquet file"):
        get_task("gsm8k").rows("eval")
    assert seen == {"name": "openai/gsm8k", "config": "main", "split": "test"}


def test_hub_rows_are_used_when_online(monkeypatch):
    import datasets

    rows = read_local(GSM8K_TRAIN)[:5]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None: rows)
    assert [r["gold"] for r in get_task("gsm8k").rows("train")] == [gold_from_solution(r["answer"]) for r in rows]


def test_missing_file_and_prompt(task):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task("gsm8k", path="nope/train.jsonl").rows("train")
    text = task.prompt(task.rows("train")[0]).text()
    assert "Natalia sold clips" in text and "Reasoning: low" in text and text.endswith("<|start|>assistant")
