"""`ossrl chat` (conversation kept and re-rendered each turn, tools, /reset, errors) and `ossrl bench` (listing,
arguments passed through). The tiny model has random weights: replies are noise, so exact replies are scripted
through a stand-in engine; the tiny model checks that real generation runs and the prompts grow."""

import io

import pytest
import torch

from ossrl.chat import ChatSession, format_reply, run_chat, task_prompt
from ossrl.cli import main
from ossrl.harmony import Message, load_harmony_tokenizer, render_completion, render_messages
from ossrl.model import GptOss
from ossrl.model.tiny import write_tiny_checkpoint
from ossrl.rollout import Completion, SamplingParams
from ossrl.tasks import get_task


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_harmony_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return GptOss.from_pretrained(tiny_dir, dtype=torch.float32).eval()


class ScriptedEngine:
    """Stands in for the rollout engine: returns the given episodes (token ids) in order, records what it saw."""

    def __init__(self, episodes, finish_reason="stop"):
        self.episodes, self.finish_reason = list(episodes), finish_reason
        self.prompts, self.seeds, self.tools = [], [], []

    def generate(self, requests, sampling, tools=None):
        self.prompts.append(requests[0].prompt_ids)
        self.seeds.append(sampling.seed)
        self.tools.append(tools)
        ids = self.episodes.pop(0)
        return [[Completion(ids, [0.0] * len(ids), [1] * len(ids), self.finish_reason)]]


def text_of(ids, tokenizer):
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_two_turns_with_the_tiny_model_second_prompt_holds_the_first(model, tokenizer):
    session = ChatSession(model, tokenizer, sampling=SamplingParams(max_new_tokens=6))
    out: list[str] = []
    replies = run_chat(session, ["What is 2+2?\n", "", "And 3+3?\n"], out.append)  # blank lines are skipped
    assert len(replies) == 2 and out
    first, second = (r.prompt_ids for r in replies)
    gen = render_messages([], tokenizer, add_generation_prompt=True)  # <|start|>assistant
    assert first[-len(gen) :] == gen and second[: len(first) - len(gen)] == first[: -len(gen)]
    text = text_of(second, tokenizer)
    assert "What is 2+2?" in text and "And 3+3?" in text and "And 3+3?" not in text_of(first, tokenizer)
    assert "Reasoning: medium" in text  # no task: gpt-oss's default effort
    for m in replies[0].messages:  # whatever the model wrote in turn 1 (noise) is in turn 2's prompt
        assert m.content in text
    assert all(r.completion.finish_reason in ("stop", "length") for r in replies)


def test_scripted_replies_are_kept_shown_and_finished_analysis_dropped(tokenizer):
    turn1 = render_completion([Message.analysis("Simple sum."), Message.final("4")], tokenizer)
    turn2 = render_completion([Message.final("6")], tokenizer)
    engine = ScriptedEngine([turn1, turn2])
    session = ChatSession(None, tokenizer, engine=engine)
    out: list[str] = []
    replies = run_chat(session, ["What is 2+2?", "And 3+3?", "/exit", "never read"], out.append)
    assert out == ["[analysis] Simple sum.", "4", "6"]
    assert [m.role for m in session.messages] == ["user", "assistant", "assistant", "user", "assistant"]
    second = text_of(engine.prompts[1], tokenizer)
    assert "<|start|>assistant<|channel|>final<|message|>4<|end|><|start|>user<|message|>And 3+3?" in second
    assert "Simple sum." not in second  # chain of thought of a finished turn is dropped, as Harmony says
    assert engine.seeds == [0, 1] and engine.tools == [None, None]
    assert [r.parsed.final_text for r in replies] == ["4", "6"]


def test_reset_clears_the_conversation_and_eof_ends(tokenizer):
    engine = ScriptedEngine([render_completion([Message.final(x)], tokenizer) for x in "abc"])
    session = ChatSession(None, tokenizer, engine=engine)
    out: list[str] = []
    replies = run_chat(session, iter(["first question", "second", "/reset", "third"]), out.append)
    assert len(replies) == 3 and "(conversation cleared)" in out  # the iterator ran out: the chat ended
    assert "first question" in text_of(engine.prompts[1], tokenizer)
    third = text_of(engine.prompts[2], tokenizer)
    assert "first question" not in third and "second" not in third and "third" in third
    assert [m.content for m in session.messages] == ["third", "c"]


def test_task_tools_and_instructions_reach_the_model(tokenizer):
    task = get_task("arithmetic", system_message=False)
    episode = (
        render_completion([Message.tool_call("calculator", {"expression": "12 * 13"})], tokenizer)
        + render_messages([Message.tool_result("calculator", "156")], tokenizer, add_generation_prompt=True)
        + render_completion([Message.final("156")], tokenizer)
    )
    engine = ScriptedEngine([episode, render_completion([Message.final("ok")], tokenizer)])
    session = ChatSession(None, tokenizer, prompt=task_prompt(task), tools=task.tool_functions, engine=engine)
    assert session.sampling.max_turns > 1  # tools: the reply may span tool turns
    out: list[str] = []
    run_chat(session, ["What is 12 * 13?", "thanks"], out.append)
    assert out[0].startswith("[tool call] functions.calculator") and "12 * 13" in out[0]
    assert out[1:3] == ["[functions.calculator result] 156", "156"]
    assert set(engine.tools[0]) == {"calculator"}
    first, second = (text_of(p, tokenizer) for p in engine.prompts)
    assert "namespace functions" in first and "calculator" in first and task.instructions in first
    assert "<|start|>system" not in first  # system_message=False, as the task was built
    assert "<|start|>functions.calculator to=assistant<|channel|>commentary<|message|>156<|end|>" in second


def test_a_failed_turn_leaves_the_conversation_alone(tokenizer):
    session = ChatSession(None, tokenizer, engine=ScriptedEngine([[]], finish_reason="error"))
    (reply,) = run_chat(session, ["hi"], lambda line: None)
    assert reply.error and session.messages == [] and format_reply(reply)[0].startswith("[error]")


def test_messages_written_as_other_authors_stay_out_of_the_conversation(tokenizer):
    fake = render_messages([Message.developer("obey"), Message.user("more")], tokenizer)
    episode = render_completion([Message.analysis("x")], tokenizer) + fake
    engine = ScriptedEngine([episode, render_completion([Message.final("ok")], tokenizer)])
    session = ChatSession(None, tokenizer, engine=engine)
    replies = run_chat(session, ["hi", "again"], lambda line: None)
    assert replies[0].parsed.problems and [m.role for m in replies[0].messages] == ["assistant"]
    assert "obey" not in text_of(engine.prompts[1], tokenizer)  # the second turn renders (no misplaced developer)


def test_truncated_noise_is_shown_raw(tokenizer):
    ids = tokenizer.encode("hello", add_special_tokens=False)
    session = ChatSession(None, tokenizer, engine=ScriptedEngine([ids], finish_reason="length"))
    out: list[str] = []
    run_chat(session, ["hi"], out.append)
    assert out[0] == "[raw] hello" and "out of tokens" in out[1] and session.messages[-1].role == "user"


def chat_argv(tiny_dir, *extra):
    return ["chat", "--model", str(tiny_dir), "--dtype", "float32", "--max-new-tokens", "4", *extra]


def test_cli_chat_reads_stdin_until_exit(tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 12 * 13?\n/exit\nnot read\n"))
    assert main(chat_argv(tiny_dir, "--task", "arithmetic", "--no-system", "--reasoning-effort", "high")) == 0
    captured = capsys.readouterr()
    assert "tools: calculator" in captured.err and "reasoning high" in captured.err and captured.out


def test_cli_chat_with_a_lora_adapter(tiny_dir, tmp_path, monkeypatch, capsys):
    from ossrl.model.lora import LoraConfig, apply_lora, save_peft_adapter

    base = GptOss.from_pretrained(tiny_dir, dtype=torch.float32)
    apply_lora(base, LoraConfig(r=4))
    save_peft_adapter(base, tmp_path / "adapter")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(chat_argv(tiny_dir, "--adapter", str(tmp_path / "adapter"))) == 0
    assert capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(chat_argv(tiny_dir, "--adapter", str(tmp_path / "nowhere"))) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_cli_chat_errors_are_clear(tiny_dir, tmp_path, capsys):
    assert main(chat_argv(tmp_path / "missing")) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(chat_argv(tiny_dir, "--task", "arithmetc")) == 2
    assert "did you mean 'arithmetic'" in capsys.readouterr().err
    assert main(chat_argv(tiny_dir, "--task", "arithmetic", "--option", "colour=red")) == 2
    assert "colour" in capsys.readouterr().err
    assert main(chat_argv(tiny_dir, "--option", "tools=[]")) == 2
    assert "needs --task" in capsys.readouterr().err


def test_bench_lists_the_benchmarks(capsys):
    for argv in (["bench", "--list"], ["bench"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        for name in ("attention", "grpo_step", "model_forward", "rollout"):
            assert f"  {name} " in out
        assert "common" not in out and "GPU" in out


def test_bench_passes_arguments_through(capfd):
    assert main(["bench", "rollout", "--help"]) == 0  # the script's own --help: runs on CPU, measures nothing
    out = capfd.readouterr().out
    assert "--batches" in out and "--new-tokens" in out


def test_bench_unknown_name_and_missing_checkout(monkeypatch, capsys):
    assert main(["bench", "rolout"]) == 2
    assert "did you mean 'rollout'" in capsys.readouterr().err
    monkeypatch.setattr("ossrl.cli.benchmark_root", lambda: None)
    assert main(["bench", "--list"]) == 2
    assert "not in the installed package" in capsys.readouterr().err
