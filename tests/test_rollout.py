"""The rollout engine against the model it runs: greedy == naive re-forward loop, sampler log-probs == trainer
log-probs, continuous batching == one at a time, multi-turn tool calls with the right loss mask, bad input."""

import asyncio
import time

import pytest
import torch

from ossrl.harmony import Message, load_harmony_tokenizer, render_completion, render_conversation
from ossrl.model import GptOss
from ossrl.model.tiny import write_tiny_checkpoint
from ossrl.rollout import Engine, Request, SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", sliding_window=8)
    tokenizer = load_harmony_tokenizer(path)
    model = GptOss.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():  # sharper than the init scale, so sampled text is not uniform noise
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(6)
    return model, tokenizer


def prompts(n, lengths=(5, 23, 11, 40, 2, 17)):
    """Random prompts of token ids below the tiny tokenizer's vocabulary (~1260 tokens)."""
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(10, 1200, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


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


class ScriptedHead(torch.nn.Module):
    """Replaces lm_head: the next token comes from a script, one entry per forward (one running sequence)."""

    def __init__(self, vocab_size: int, script: list[int]):
        super().__init__()
        self.vocab_size, self.script, self.cursor = vocab_size, script, 0

    def forward(self, hidden):
        logits = torch.full((hidden.shape[0], self.vocab_size), -30.0)
        logits[:, self.script[min(self.cursor, len(self.script) - 1)]] = 30.0
        self.cursor += 1
        return logits


def scripted_policy(base: GptOss, script: list[int]) -> GptOss:
    """The real model and KV-cache path, with a scripted next token."""
    policy = GptOss(base.config)
    policy.load_state_dict(base.state_dict())
    policy.lm_head = ScriptedHead(base.config.vocab_size, script)
    return policy.eval()


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
    model, tokenizer = tiny

    async def sleepy():
        await asyncio.sleep(30)

    call = render_completion([Message.tool_call("sleepy", {})], tokenizer)
    policy = scripted_policy(model, call * 3)
    prompt = render_conversation([Message.user("hi")], tokenizer)
    start = time.perf_counter()
    (completion,) = Engine(policy, tokenizer).generate(
        [Request(prompt)],
        SamplingParams(temperature=0, max_new_tokens=200, max_turns=2, tool_timeout_s=0.2),
        tools={"sleepy": sleepy},
    )[0]
    assert time.perf_counter() - start < 10  # the 30 s tool was abandoned after its 0.2 s timeout
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

    def spy(seqs, cache, fresh):
        out = original(seqs, cache, fresh)
        seen.append(max(sum(p >= 0 for p in s.pages.sliding) for s in seqs))
        return out

    engine._forward = spy
    engine.generate([Request(prompts(1, lengths=(60,))[0])], SamplingParams(max_new_tokens=30, stop_token_ids=[]))
    window_pages = -(-8 // 4) + 1
    assert max(seen) <= window_pages + 1  # not 90 / 4 = 23 pages


def test_fixed_buffer_decode_step_gives_the_same_samples(tiny, monkeypatch):
    """cuda_graphs=True on CPU runs the graphs' fixed-buffer step without capture: bucketed batches padded with
    scratch-page rows must sample exactly what the plain step samples, tool turns included."""
    from ossrl.rollout import graphs

    model, tokenizer = tiny
    padded_steps = []
    original = graphs.StaticDecodeStep.load

    def spy(self, seqs, *args):
        padded_steps.append(self.batch - len(seqs))
        return original(self, seqs, *args)

    monkeypatch.setattr(graphs.StaticDecodeStep, "load", spy)
    requests = [Request(p, n=2) for p in prompts(5)]
    calls = render_completion([Message.tool_call("add", {"a": 2, "b": 3})], tokenizer)
    tools = {"add": lambda a, b: a + b}
    for temperature in (0.0, 1.0):
        sampling = SamplingParams(temperature=temperature, max_new_tokens=24, seed=5, stop_token_ids=[])
        plain = Engine(model, tokenizer, kv_cache_tokens=2048, page_size=4).generate(requests, sampling)
        fixed = Engine(model, tokenizer, kv_cache_tokens=2048, page_size=4, max_num_seqs=7, cuda_graphs=True)
        for a, b in zip(plain, fixed.generate(requests, sampling), strict=True):
            for x, y in zip(a, b, strict=True):
                assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
                assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)) < 1e-5
    assert padded_steps and max(padded_steps) > 0 and min(padded_steps) == 0  # buckets 1, 2, 4, 7: some padding
    # a tool turn: the tool result goes through the plain step (several tokens), decoding through the fixed one
    script = [*calls, *render_completion([Message.final("5")], tokenizer)]
    prompt = render_conversation([Message.user("2+3?")], tokenizer)
    sampling = SamplingParams(temperature=0, max_new_tokens=80, max_turns=3)
    want = Engine(scripted_policy(model, script), tokenizer).generate([Request(prompt)], sampling, tools=tools)[0][0]
    fixed = Engine(scripted_policy(model, script), tokenizer, cuda_graphs=True)
    got = fixed.generate([Request(prompt)], sampling, tools=tools)[0][0]
    assert got.token_ids == want.token_ids and got.loss_mask == want.loss_mask and got.num_tool_calls == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_replay_the_same_samples(tiny, dtype):
    model, tokenizer = tiny
    gpu = GptOss.from_config(model.config, device="cuda", dtype=dtype, seed=None)
    gpu.load_state_dict(model.state_dict())  # copies into each parameter's dtype (norms and sinks stay fp32)
    gpu.eval()
    requests = [Request(p, n=2) for p in prompts(5)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=40, seed=7, stop_token_ids=[])
    plain = Engine(gpu, tokenizer, kv_cache_tokens=4096, max_num_seqs=7).generate(requests, sampling)
    graphed = Engine(gpu, tokenizer, kv_cache_tokens=4096, max_num_seqs=7, cuda_graphs=True)
    for a, b in zip(plain, graphed.generate(requests, sampling), strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.token_ids == y.token_ids
            assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)) < 1e-3
