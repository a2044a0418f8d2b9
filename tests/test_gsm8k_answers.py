"""Which number is THE answer (ossrl.tasks.math_answer.extract_answer): marks beat trailing numbers, the precedence
of marks, and the attacks a policy optimised against the reward would try (hedging over several marks)."""

from __future__ import annotations

import pytest
from test_tasks_common import parsed_final

from ossrl.tasks import answers_match, check_answer, extract_answer
from ossrl.tasks.gsm8k import correct_reward, format_reward


@pytest.mark.parametrize(
    "text, answer, how",
    [
        ("She pays **18** dollars in total over 3 weeks.", "18", "bold"),  # issue 12
        ("She pays \\boxed{18} dollars in total over 3 weeks.", "18", "boxed"),
        ("#### 18\n\nThat is over 3 weeks.", "18", "hashes"),
        ("The answer is 18 dollars for 3 weeks.", "18", "answer_is"),
        ("**Answer:** 18 dollars, paid over 3 weeks", "18", "answer_is"),
        ("**Answer**: $18 for 3 weeks", "$18", "answer_is"),
        ("Final answer: 18 (over 3 weeks)", "18", "answer_is"),
        ("The answer is:\n\n**18** dollars over 3 weeks", "18", "answer_is"),
        ("She pays **$1,234.50** over 3 weeks.", "$1,234.50", "bold"),
        ("It drops to **-5** degrees after 3 hours.", "-5", "bold"),
        ("They ate **3/4** of the 12 cakes.", "3/4", "bold"),
        ("They ate **\\frac{3}{4}** of the 12 cakes.", "\\frac{3}{4}", "bold"),
        ("So **18 dollars** in 3 weeks.", "18", "bold"),
        ("**Total: 72 clips** in 2 months", "72", "bold"),
        ("**48 + 24 = 72** clips in 2 months", "72", "bold"),
        ("She pays **\\$18** over 3 weeks.", "$18", "bold"),
        # bold results on earlier lines are steps; the last line holding a bold number has the answer
        ("- April: **48** clips\n- May: 48 / 2 = **24** clips\n- Total: 48 + 24 = **72** clips in 2 months",
         "72", "bold"),
        # bold text that is not a number is no mark
        ("**Step 1:** 48 / 2 = 24\n**Step 2:** 48 + 24 = 72", "72", "last_number"),
        ("**1.** May: 48 / 2 = 24\n**2.** Total: 48 + 24 = 72", "72", "last_number"),
        # a markdown heading is no '####' mark; '####' with a number or LaTeX after it is
        ("#### Step 1: April\nShe sold 48.\n#### Step 2: May\n48 / 2 = 24\n#### Total\n48 + 24 = 72", "72",
         "last_number"),
        ("#### 1. April\n48 clips\n#### 2. May\n24 clips\n#### 72", "72", "hashes"),
        ("####\n**72**", "72", "hashes"),
        ("#### 72.\nThat is 48 + 24.", "72", "hashes"),
        ("#### \\(72\\)", "72", "hashes"),
        ("#### \\sqrt{2}\nfrom 2 squares", "\\sqrt{2}", "hashes"),
        ("#### $1,000 for 12 months", "$1,000", "hashes"),
        # "answer" in passing is no mark
        ("To answer this, note 3 weeks at 6 dollars: 18", "18", "last_number"),
        # no mark: the last number, as before
        ("72 or 73", "73", "last_number"),
        ("The total is 1,000.", "1,000", "last_number"),
        ("", None, "none"),
        ("no idea", None, "none"),
        ("\\boxed{} 18", "18", "last_number"),  # an empty box is no mark
    ],
)  # fmt: skip
def test_marked_answer_wins_over_trailing_numbers(text, answer, how):
    assert extract_answer(text) == (answer, how)


@pytest.mark.parametrize(
    "text, answer, how",
    [
        ("\\boxed{18} #### 17 The answer is 16. **15** 14", "18", "boxed"),
        ("#### 18\nThe answer is 17. **16** then 15", "18", "hashes"),
        ("The answer is 18. Next **17**, then 16", "18", "answer_is"),
        ("**18**, then 17", "18", "bold"),
        # marks of a weaker kind do not make the strongest one ambiguous
        ("**17** or **16**, so \\boxed{18}", "18", "boxed"),
        ("The answer is 17 when rounded; \\fbox{18} exactly", "18", "boxed"),
    ],
)
def test_precedence_boxed_hashes_answer_is_bold(text, answer, how):
    assert extract_answer(text) == (answer, how)


@pytest.mark.parametrize(
    "text",
    [
        "She pays **17** or **18** dollars.",  # several different bold numbers on the answer's line
        "**17**, no wait, **18**",
        "\\boxed{17} or \\boxed{18}",  # two boxes
        "Maybe \\boxed{17}.\n\nOr else \\boxed{18}.",
        "#### 17\n#### 18",  # two '####'
        "The answer is 17. Or the answer is 18.",  # two 'answer is'
        "\\boxed{17 \\text{ or } 18}",  # one mark holding two answers
        "\\boxed{17 \\lor 18}",
        "#### 17 or 18",
        "The answer is 17 or 18.",
        "**17 or 18**",
        "**17** or **18** or **19**",
    ],
)
def test_hedging_over_several_answers_gets_no_credit(text):
    assert extract_answer(text) == (None, "ambiguous")
    for gold in ("17", "18"):
        assert check_answer(gold, text)[0] is False
        completion = parsed_final(text)
        assert correct_reward([None], [completion], gold=[gold]) == [0.0]
        assert format_reward([None], [completion]) == [0.0]


@pytest.mark.parametrize(
    "text, answer, how",
    [
        ("\\boxed{18} dollars. To check: \\boxed{18}", "18", "boxed"),
        ("\\boxed{18} dollars, that is \\boxed{18.00}", "18.00", "boxed"),  # same value, written differently
        ("\\boxed{0.75}, i.e. \\boxed{\\frac{3}{4}}", "\\frac{3}{4}", "boxed"),  # equal per math-verify
        ("#### 18\n(check: 3 * 6 = 18)\n#### $18", "$18", "hashes"),
        ("The answer is 18. Yes, the answer is 18 dollars.", "18", "answer_is"),
        ("**18** dollars, so **$18** in all", "$18", "bold"),
        ("18 dollars or so, in **18** payments... no: **18**", "18", "bold"),
        ("The answer is 18 dollars for 3 weeks, or 6 dollars a week.", "18", "answer_is"),  # "or" not at the answer
    ],
)
def test_repeated_marks_that_agree_are_one_answer(text, answer, how):
    assert extract_answer(text) == (answer, how)
    assert answers_match("18" if "18" in text else "0.75", answer)


@pytest.mark.parametrize(
    "gold, text",
    [("18", "\\boxed{\\$18}"), ("45", "\\boxed{45\\%}"), ("1000", "\\boxed{\\$1,000}"), ("18", "#### \\$18.00")],
)
def test_latex_escaped_dollar_and_percent(gold, text):
    assert check_answer(gold, text)[0] is True


def test_many_marks_stay_cheap():
    # a wall of boxes is not a way to make grading slow: distinct values are compared until the first mismatch
    text = " ".join(f"\\boxed{{{i}}}" for i in range(5000))
    assert extract_answer(text) == (None, "ambiguous")
    same = " ".join("\\boxed{18}" for _ in range(5000))
    assert extract_answer(same) == ("18", "boxed")


def test_adversarial_text_is_read_in_linear_time():
    import time

    t0 = time.perf_counter()
    assert extract_answer("\\boxed{" * 10000 + " 18") == ("18", "last_number")  # unclosed boxes: no mark
    assert extract_answer("answer: " * 10000 + "18") == ("18", "answer_is")
    assert extract_answer("**18** " * 10000) == ("18", "bold")
    assert extract_answer("#### 18 " * 10000) == ("18", "hashes")
    assert time.perf_counter() - t0 < 5.0
