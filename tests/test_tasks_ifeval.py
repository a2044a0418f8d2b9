"""ifeval: every constraint with a passing and a failing text; the generator; the rewards."""

from __future__ import annotations

import json

import pytest

from ossrl.tasks import get_task
from ossrl.tasks.ifeval_constraints import CONFLICTS, KINDS, check, describe, generate_prompts

LOREM = "The river runs past the old mill. Birds sing at dawn. We walk to the bridge and back."

CASES = [
    ({"kind": "word_count", "relation": "at least", "n": 10}, LOREM, "Too short here."),
    ({"kind": "word_count", "relation": "at most", "n": 5}, "Just four words here.", LOREM),
    ({"kind": "word_count", "relation": "less than", "n": 5}, "One two three four.", "One two three four five."),
    ({"kind": "sentence_count", "relation": "at least", "n": 3}, LOREM, "One sentence only."),
    ({"kind": "sentence_count", "relation": "at most", "n": 1}, "One sentence only.", LOREM),
    ({"kind": "paragraph_count", "n": 2}, "First part.\n\nSecond part.", "First.\n\nSecond.\n\nThird."),
    ({"kind": "include_keywords", "keywords": ["river", "bridge"]}, LOREM, "The river is wide."),
    ({"kind": "forbidden_words", "words": ["very", "good"]}, "A fine day (goodness!).", "It was very warm."),
    ({"kind": "letter_frequency", "letter": "e", "relation": "at least", "n": 3}, "eee tree", "cat dog"),
    ({"kind": "letter_frequency", "letter": "a", "relation": "less than", "n": 2}, "A cow", "banana"),
    ({"kind": "json_format"}, '```json\n{"answer": [1, 2]}\n```', "{answer: 1}"),
    ({"kind": "json_format"}, '{"a": 1}', 'Here is JSON: {"a": 1}'),
    ({"kind": "bullet_count", "n": 3}, "Intro\n* one\n* two\n- three", "* one\n* two"),
    ({"kind": "title"}, "<<A Quiet Morning>>\nThe sun rose.", "A Quiet Morning\nThe sun rose."),
    ({"kind": "title"}, "<<x>>", "<<   >> empty title"),
    ({"kind": "postscript", "marker": "P.S."}, "Main text.\n\nP.S. See you soon.", "Main text. PS see you."),
    ({"kind": "lowercase"}, "all lower case, even numbers 12.", "Not all lower case."),
    ({"kind": "uppercase"}, "ALL CAPS HERE!", "ALL CAPS but one"),
    ({"kind": "start_with", "phrase": "My answer is"}, "my answer is  yes.", "Yes. My answer is yes."),
    ({"kind": "end_with", "phrase": "That is all."}, "Done.\nThat is all.", "That is all. Bye."),
]


@pytest.mark.parametrize("constraint, good, bad", CASES, ids=[f"{c['kind']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_constraint_pass_and_fail(constraint, good, bad):
    assert check(constraint, good), describe(constraint)
    assert not check(constraint, bad), describe(constraint)
    assert not check(constraint, None) and not check(constraint, "")


def test_every_kind_is_covered_and_described():
    assert {c["kind"] for c, _, _ in CASES} == set(KINDS)
    for kind in KINDS:
        row = generate_prompts(1, seed=0, kinds=[kind])[0]
        assert row["constraints"][0]["kind"] == kind
        assert describe(row["constraints"][0]) in row["prompt"]


def test_bad_constraints_raise():
    with pytest.raises(ValueError, match="unknown ifeval constraint 'haiku'"):
        check({"kind": "haiku"}, "x")
    with pytest.raises(ValueError, match="relation must be one of"):
        check({"kind": "word_count", "relation": "about", "n": 3}, "x")
    with pytest.raises(ValueError, match="bad parameters"):
        describe({"kind": "word_count", "n": 3})
    with pytest.raises(ValueError, match="unknown ifeval constraint"):
        get_task("ifeval", kinds=["haiku"])


def test_generator_is_seeded_and_never_combines_conflicts():
    rows = generate_prompts(300, seed=7, max_constraints=4)
    assert rows == generate_prompts(300, seed=7, max_constraints=4)
    assert rows != generate_prompts(300, seed=8, max_constraints=4)
    sizes = {len(r["constraints"]) for r in rows}
    assert sizes <= {1, 2, 3, 4} and len(sizes) > 2
    for r in rows:
        kinds = [c["kind"] for c in r["constraints"]]
        assert len(kinds) == len(set(kinds))
        assert not any(CONFLICTS[a] & set(kinds) for a in kinds), kinds
    json.dumps(rows)  # rows are plain data (a jsonl file of them is a valid `path=`)


def test_rewards_all_fraction_and_per_kind():
    task = get_task("ifeval", n_train=10, n_eval=5)
    row = {"id": 0, "prompt": "Write about rivers.", "constraints": [
        {"kind": "include_keywords", "keywords": ["river"]}, {"kind": "lowercase"}]}  # fmt: skip
    out = task.score([row] * 3, ["the river is long.", "The river is long.", "Mountains."])
    assert out.values["all"] == [1.0, 0.0, 0.0]
    assert out.values["fraction"] == [1.0, 0.5, 0.0]
    assert out.values["c/include_keywords"] == [1.0, 1.0, 0.0]
    assert out.values["c/lowercase"] == [1.0, 0.0, 0.0]
    assert out.values["c/title"] == [None, None, None]  # not in this prompt: not applicable
    assert out.total == pytest.approx([1.0, 0.25 / 1.5, 0.0])
    assert "reward/c/title" not in out.metrics() and out.metrics()["reward/c/lowercase"] == pytest.approx(1 / 3)


def test_splits_and_local_file(tmp_path, caplog):
    task = get_task("ifeval", n_train=50, n_eval=20, seed=3)
    assert len(task.rows("train")) == 50 and len(task.rows("eval")) == 20
    assert not {r["id"] for r in task.rows("train")} & {r["id"] for r in task.rows("eval")}
    rows = generate_prompts(10, seed=1) + [{"prompt": "x"}, {"prompt": "y", "constraints": [{"kind": "nope"}]}]
    path = tmp_path / "if.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    local = get_task("ifeval", path=str(path), eval_size=2)
    assert len(local.rows("train")) == 8 and len(local.rows("eval")) == 2
    assert "skipped 2 of 12 rows" in caplog.text
