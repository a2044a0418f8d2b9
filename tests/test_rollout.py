"""The rollout engine against the model it runs: greedy == naive re-forward loop, sampler log-probs == trainer
log-probs, continuous batching == one at a time, multi-turn tool calls with the right loss mask, bad input."""

import asyncio
import threading
import time

import pytest
import torch
from rollout_helpers import prompts, scripted_policy

from ossrl.harmony import Message, render_completion, render_conversation
from ossrl.rollout import Engine, Request, SamplingParams


def test_greedy_equals_naive_full_forward_loop(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, kv_cache_tokens=2048)
    ps = prompts(4)  # 40 + 16 tokens cross the 8-token window and several 16-token pages
    out = engine.generate([Request(p) for p in ps], SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=[]))
    for p, (completion,) in zip(ps, out, strict=True):
        ids = list(p)
        with torch.no_grad():
            for _ in range(16):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert completion.token_ids == ids[len(p) :]
        assert completion.finish_reason == "length" and completion.loss_mask == [1] * 16


def trainer_logprobs(model, ps, completions, temperature):
    """What the trainer computes: one packed forward over prompt + completion, log_softmax(logits / T)."""
    seqs = [p + c.token_ids for p, c in zip(ps, completions, strict=True)]
    cu = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        logits = model(torch.tensor([t for s in seqs for t in s]), cu_seqlens=cu)
    out = []
    for i, (p, c) in enumerate(zip(ps, completions, strict=True)):
        rows = logits[cu[i] + len(p) - 1 : cu[i + 1] - 1] / temperature
        out.append(torch.log_softmax(rows, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(1))
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_trainer_logprobs(tiny, temperature):
    model, tokenizer = tiny
    ps = prompts(3)
    sampling = SamplingParams(temperature=temperature, max_new_tokens=30, stop_token_ids=[], seed=3, top_k=50)
    out = Engine(model, tokenizer).generate([Request(p, n=2) for p in ps], sampling)
    flat_p = [p for p in ps for _ in range(2)]
    flat_c = [c for group in out for c in group]
    assert flat_c[0].token_ids != flat_c[1].token_ids  # n samples of one prompt differ
    diffs = [
        (torch.tensor(c.logprobs) - ref).abs().max().item()
        for c, ref in zip(flat_c, trainer_logprobs(model, flat_p, flat_c, temperature), strict=True)
    ]
    assert max(diffs) < 1e-4, diffs


def test_continuous_batching_gives_the_same_samples_as_one_at_a_time(tiny):
    model, tokenizer = tiny
    requests = [Request(p, n=2) for p in prompts(6)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7, stop_token_ids=[5, 9, 13])
    # a small batch limit and cache force admissions while others run, and queueing
    together = Engine(model, tokenizer, max_num_seqs=3, kv_cache_tokens=160).generate(requests, sampling)
    one_at_a_time = Engine(model, tokenizer, max_num_seqs=1).generate(requests, sampling)
    greedy = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[])
    greedy_pairs = zip(Engine(model, tokenizer, max_num_seqs=4).generate(requests, greedy),
                       Engine(model, tokenizer, max_num_seqs=1).generate(requests, greedy), strict=True)  # fmt: skip
    for group_a, group_b in [*zip(together, one_at_a_time, strict=True), *greedy_pairs]:
        for a, b in zip(group_a, group_b, strict=True):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            # fp32 matmuls of different batch sizes differ in the last bits (BLAS blocking), nothing more
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


def test_stop_tokens_max_tokens_and_seeds(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    p = prompts(1)[0]
    free = engine.generate([Request(p)], SamplingParams(max_new_tokens=40, seed=1, stop_token_ids=[]))[0][0]
    stop = free.token_ids[5]
    first = free.token_ids.index(stop)
    stopped = engine.generate([Request(p)], SamplingParams(max_new_tokens=40, seed=1, stop_token_ids=[stop]))[0][0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]
    again = engine.generate([Request(p)], SamplingParams(max_new_tokens=40, seed=1, stop_token_ids=[]))[0][0]
    other = engine.generate([Request(p)], SamplingParams(max_new_tokens=40, seed=2, stop_token_ids=[]))[0][0]
    assert again.token_ids == free.token_ids and other.token_ids != free.token_ids
    assert len(free.token_ids) == 40 and free.finish_reason == "length"


def test_tool_loop_runs_several_turns_with_the_right_loss_mask(tiny):
    model, tokenizer = tiny
    turns = [
        [Message.analysis("add them"), Message.tool_call("add", {"a": 2, "b": 3})],
        [Message.tool_call("slow_add", {"a": 1, "b": 1})],
        [Message.tool_call("boom", {})],
        [Message.tool_call("invented", {"x": 1})],
        [Message.final("5")],
    ]
    script = [t for turn in turns for t in render_completion(turn, tokenizer)]

    async def slow_add(a, b):
        await asyncio.sleep(0.01)
        return a + b

    def boom():
        raise RuntimeError("kaput")

    tools = {"add": lambda a, b: a + b, "slow_add": slow_add, "boom": boom}
    policy = scripted_policy(model, script)
    prompt = render_conversation([Message.user("2+3?")], tokenizer)
    (completion,) = Engine(policy, tokenizer).generate(
        [Request(prompt)], SamplingParams(temperature=0, max_new_tokens=200, max_turns=6), tools=tools
    )[0]
    assert completion.finish_reason == "stop" and completion.num_tool_calls == 4 and completion.tool_errors == 2
    assert completion.sampled_ids == script
    text = tokenizer.decode(completion.token_ids)
    assert "<|start|>functions.add to=assistant<|channel|>commentary<|message|>5<|end|>" in text
    assert "<|message|>2<|end|>" in text and "RuntimeError: kaput" in text and "unknown tool" in text
    for token, mask, logprob in zip(completion.token_ids, completion.loss_mask, completion.logprobs, strict=True):
        assert (mask == 1) == (logprob != 0.0) or token in script  # appended tokens carry logprob 0
    tool_tokens = [t for t, m in zip(completion.token_ids, completion.loss_mask, strict=True) if m == 0]
    assert tokenizer.decode(tool_tokens).count("<|start|>assistant") == 4


def test_tool_timeout_and_max_turns(tiny):
    """A tool past its timeout is abandoned: the rollout returns while the tool is still blocked (an order of events,
    not a wall-clock bound, so machine load cannot fail it)."""
    model, tokenizer = tiny
    release, events = threading.Event(), []

    def blocked():
        release.wait(60)  # until the test lets it go, long after its 0.2 s timeout
        events.append("tool returned")

    call = render_completion([Message.tool_call("blocked", {})], tokenizer)
    policy = scripted_policy(model, call * 3)
    prompt = render_conversation([Message.user("hi")], tokenizer)
    (completion,) = Engine(policy, tokenizer).generate(
        [Request(prompt)],
        SamplingParams(temperature=0, max_new_tokens=200, max_turns=2, tool_timeout_s=0.2),
        tools={"blocked": blocked},
    )[0]
    events.append("rollout returned")
    release.set()
    for _ in range(600):  # the abandoned thread finishes now that it is released
        if len(events) == 2:
            break
        time.sleep(0.05)
    assert events == ["rollout returned", "tool returned"]
    assert "timed out" in tokenizer.decode(completion.token_ids)
    assert completion.finish_reason == "tool_call" and completion.num_tool_calls == 1  # turn 2 ended in a call


def test_bad_requests_fail_alone(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, kv_cache_tokens=256, max_model_len=100)
    good = prompts(1)[0]
    out = engine.generate(
        [Request(good), Request(list(range(10, 130))), Request([]), Request([99999]), Request(good, n=0)],
        SamplingParams(max_new_tokens=8),
    )
    assert out[0][0].finish_reason in ("stop", "length") and out[0][0].error is None
    assert "does not fit the context" in out[1][0].error
    assert out[2][0].error == "empty prompt" and "outside the vocabulary" in out[3][0].error
    assert "n must be" in out[4][0].error
    too_long = Engine(model, tokenizer, kv_cache_tokens=32).generate([Request(good)], SamplingParams(max_new_tokens=64))
    assert "can never fit the KV cache" in too_long[0][0].error
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.generate([Request(good)], SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([Request(good)], SamplingParams(temperature=-1))


def test_sliding_layers_keep_only_the_window(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, page_size=4)
    seen = []
    original = engine._forward

    def spy(seqs, fresh):
        out = original(seqs, fresh)
        seen.append(max(sum(p >= 0 for p in s.pages.sliding) for s in seqs))
        return out

    engine._forward = spy
    engine.generate([Request(prompts(1, lengths=(60,))[0])], SamplingParams(max_new_tokens=30, stop_token_ids=[]))
    window_pages = -(-8 // 4) + 1
    assert max(seen) <= window_pages + 1  # not 90 / 4 = 23 pages
