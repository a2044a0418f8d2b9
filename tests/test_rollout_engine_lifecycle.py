"""One engine for a whole run: ``rollout`` returns the packed ``RolloutBatch`` (what ``generate`` lists), sampler
log-probs stay on the device until the end, the KV cache is laid out and allocated once across rollouts (again after
``release_memory``, laid out again only when a request outgrows it), tool results are fed in chunks, and new
weights reach the engine in place (``update_weights``, or the optimizer changing the shared model)."""

import copy
import logging

import pytest
import torch
from rollout_helpers import prompts, scripted_policy

from ossrl.harmony import Message, render_completion, render_conversation
from ossrl.model.lora import LoraConfig, apply_lora
from ossrl.rollout import Engine, Request, RolloutBatch, SamplingParams

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=10, seed=4, stop_token_ids=[])


def requests_with_errors():
    good = prompts(3)
    return [Request(good[0], n=2), Request([]), Request(good[1]), Request(good[2], n=0), Request([10**6])]


def test_rollout_batch_holds_what_generate_lists(tiny):
    model, tokenizer = tiny
    requests = requests_with_errors()
    batch = Engine(model, tokenizer, kv_cache_tokens=1024).rollout(requests, SAMPLING)
    listed = Engine(model, tokenizer, kv_cache_tokens=1024).generate(requests, SAMPLING)
    assert isinstance(batch, RolloutBatch) and batch.num_seqs == 6  # 2 + 1 + 1 + 1 + 1 (an error: max(n, 1))
    assert batch.group.tolist() == [0, 0, 1, 2, 3, 4] and batch.sample.tolist() == [0, 1, 0, 0, 0, 0]
    assert batch.finish_reasons == ["length", "length", "error", "length", "error", "error"]
    assert batch.errors[2] == "empty prompt" and "n must be" in batch.errors[4] and "vocabulary" in batch.errors[5]
    assert batch.errors[0] is None and batch.seq_lens[[2, 4, 5]].tolist() == [0, 0, 0]  # errors: no tokens at all
    assert batch.prompt_lens.tolist() == [len(requests[0].prompt_ids)] * 2 + [0, len(requests[2].prompt_ids), 0, 0]
    assert (batch.seconds[[0, 1, 3]] > 0).all() and (batch.seconds[[2, 4, 5]] == 0).all()
    assert batch.tokens.dtype == torch.long and batch.cu_seqlens.dtype == torch.int32
    assert batch.loss_mask.dtype == torch.bool and batch.sampler_logprobs.dtype == torch.float32
    assert not batch.sampler_logprobs.is_inference()  # the trainer computes with it, autograd included
    assert batch.prompt_ids()[0] == requests[0].prompt_ids
    # generate() is rollout() as lists: same tokens, masks, and bitwise the same log-probs
    for group_a, group_b in zip(batch.completions(), listed, strict=True):
        for a, b in zip(group_a, group_b, strict=True):
            assert (a.token_ids, a.loss_mask, a.logprobs) == (b.token_ids, b.loss_mask, b.logprobs)
            assert (a.finish_reason, a.error) == (b.finish_reason, b.error)
    assert [len(g) for g in listed] == [2, 1, 1, 1, 1] and listed[1][0].token_ids == []


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampler_logprobs_equal_a_packed_trainer_forward_over_the_batch(tiny, temperature):
    """The trainer's computation straight from the batch: one packed forward over ``tokens`` / ``cu_seqlens``."""
    model, tokenizer = tiny
    # (seed 3: these samples keep clear of near-tied router logits, where 1e-6 of rounding flips an expert)
    sampling = SamplingParams(temperature=temperature, top_k=50, max_new_tokens=20, seed=3, stop_token_ids=[])
    batch = Engine(model, tokenizer).rollout([Request(p, n=2) for p in prompts(3)], sampling)
    with torch.no_grad():
        logits = model(batch.tokens, cu_seqlens=batch.cu_seqlens)
    # token t is predicted by row t - 1; a sampled token is never the first of its sequence (the prompt is)
    lp = torch.log_softmax(logits[:-1] / temperature, -1).gather(-1, batch.tokens[1:, None]).squeeze(1)
    mask = batch.loss_mask[1:]
    assert int(mask.sum()) == 6 * 20 and not batch.loss_mask[batch.cu_seqlens[:-1].long()].any()
    assert (lp[mask] - batch.sampler_logprobs[1:][mask]).abs().max() < 1e-4
    assert (batch.sampler_logprobs[~batch.loss_mask] == 0).all()


def test_sampler_logprobs_never_become_python_floats_during_the_rollout(tiny, monkeypatch):
    """Per step only the sampled token ids come to the host; log-probs stay tensors until the batch gathers them."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, cuda_graphs=True, max_num_seqs=4)  # the fixed-buffer step too (CPU)
    seen, tolist, item = [], torch.Tensor.tolist, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: seen.append(t.dtype) or tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: seen.append(t.dtype) or item(t))
    batch = engine.rollout([Request(p) for p in prompts(3)], SAMPLING)
    assert seen and not [d for d in seen if d.is_floating_point], seen
    assert batch.loss_mask.sum() == 30


def test_one_cache_across_rollouts_and_again_after_release_memory(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, kv_cache_tokens=512, page_size=4)
    requests = [Request(p, n=2) for p in prompts(2)]
    outs = [engine.rollout(requests, SAMPLING) for _ in range(3)]
    cache = engine._cache
    assert engine.stats == {"rollouts": 3, "cache_layouts": 1, "cache_allocations": 1, "graph_captures": 0}
    engine.release_memory()
    assert engine._cache is cache and not cache.allocated and cache.k == []
    outs.append(engine.rollout(requests, SAMPLING))
    outs.append(engine.rollout(requests, SAMPLING))
    assert engine._cache is cache and cache.allocated
    assert engine.stats["cache_allocations"] == 2 and engine.stats["cache_layouts"] == 1
    for out in outs[1:]:
        assert torch.equal(out.tokens, outs[0].tokens) and torch.equal(out.sampler_logprobs, outs[0].sampler_logprobs)


def test_a_group_larger_than_the_layout_lays_the_cache_out_again(tiny, caplog):
    model, tokenizer = tiny
    p = prompts(1)[0]
    engine = Engine(model, tokenizer, kv_cache_tokens=1024, max_num_seqs=2)
    engine.rollout([Request(p)], SAMPLING)
    with caplog.at_level(logging.WARNING, logger="ossrl.rollout.engine"):
        got = engine.generate([Request(p, n=5)], SAMPLING)[0]
    assert [r for r in caplog.records if "outnumbers the 2 sequences" in r.getMessage()]
    assert engine.stats["cache_layouts"] == 2 and engine.stats["cache_allocations"] == 2
    fresh = Engine(model, tokenizer, kv_cache_tokens=1024, max_num_seqs=2)
    want = fresh.generate([Request(p, n=5)], SAMPLING)[0]
    assert fresh.stats["cache_layouts"] == 1  # a first rollout lays out for its largest group at once
    assert [c.token_ids for c in got] == [c.token_ids for c in want] and all(c.error is None for c in got)
    engine.rollout([Request(p, n=3)], SAMPLING)  # fits the new layout: nothing changes
    assert engine.stats["cache_layouts"] == 2 and engine.stats["cache_allocations"] == 2


def test_a_cache_sized_from_free_memory_that_no_longer_fits_is_laid_out_again(tiny, monkeypatch, caplog):
    """After ``release_memory`` the trainer may keep some of the memory (optimizer state): a cache sized from free
    GPU memory that no longer fits is laid out again, smaller, with a warning (the check itself needs CUDA: forced
    here), rather than failing to allocate."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_num_seqs=2)
    engine.rollout([Request(prompts(1)[0])], SAMPLING)
    engine.release_memory()
    monkeypatch.setattr(engine, "_shrink_needed", lambda cache: True)
    with caplog.at_level(logging.WARNING, logger="ossrl.rollout.engine"):
        engine.rollout([Request(prompts(1)[0])], SAMPLING)
    assert [r for r in caplog.records if "no longer fits free GPU memory" in r.getMessage()]
    assert engine.stats["cache_layouts"] == 2 and engine.stats["cache_allocations"] == 2
    engine.rollout([Request(prompts(1)[0])], SAMPLING)  # allocated: nothing to check
    assert engine.stats["cache_layouts"] == 2 and engine.stats["cache_allocations"] == 2


def test_tool_results_are_fed_in_chunks_of_append_chunk(tiny):
    """A tool result longer than ``append_chunk`` goes in over several steps (the sliding pool is sized for the
    chunk, not for the tool budget); the sequence continues exactly as when it goes in whole."""
    model, tokenizer = tiny
    script = [*render_completion([Message.tool_call("add", {"a": 2, "b": 3})], tokenizer),
              *render_completion([Message.final("5")], tokenizer)]  # fmt: skip
    prompt = render_conversation([Message.user("2+3?")], tokenizer)
    sampling = SamplingParams(temperature=0, max_new_tokens=80, max_turns=3)
    tools = {"add": lambda a, b: "the sum is " + str(a + b) * 20}
    whole = Engine(scripted_policy(model, script), tokenizer).generate([Request(prompt)], sampling, tools=tools)[0][0]
    engine = Engine(scripted_policy(model, script), tokenizer, append_chunk=3)
    fed = []
    original = engine._forward

    def spy(seqs, fresh):
        fed.append((fresh, [len(s.pending) for s in seqs]))
        return original(seqs, fresh)

    engine._forward = spy
    chunked = engine.generate([Request(prompt)], sampling, tools=tools)[0][0]
    assert (chunked.token_ids, chunked.loss_mask) == (whole.token_ids, whole.loss_mask)
    assert chunked.num_tool_calls == 1 and chunked.finish_reason == "stop"
    appended = len(whole.loss_mask) - sum(whole.loss_mask)
    assert appended > 10 and max(n for fresh, lens in fed if not fresh for n in lens) > 3  # pending was longer
    assert sum(1 for fresh, lens in fed if not fresh and lens[0] > 1) >= appended // 3  # fed 3 at a time
    torch.testing.assert_close(torch.tensor(chunked.logprobs), torch.tensor(whole.logprobs), atol=1e-5, rtol=0)


def test_update_weights_copies_by_name_in_place_and_checks_names_and_shapes(tiny):
    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    apply_lora(policy, LoraConfig(r=2, targets=("q_proj",)), generator=torch.Generator().manual_seed(0))
    trainer = copy.deepcopy(policy)
    with torch.no_grad():
        for name, p in trainer.named_parameters():
            if "lora_B" in name or name.endswith("sinks"):
                p.add_(0.05)
    engine = Engine(policy, tokenizer)
    before = engine.rollout([Request(prompts(1)[0])], SAMPLING)
    addresses = {name: p.data_ptr() for name, p in policy.named_parameters()}
    changed = [(n, p) for n, p in trainer.named_parameters() if "lora_B" in n or n.endswith("sinks")]
    assert engine.update_weights(iter(changed)) == len(changed) and engine.weights_version == 1
    assert {name: p.data_ptr() for name, p in policy.named_parameters()} == addresses  # in place
    for name, p in changed:
        assert torch.equal(policy.get_parameter(name), p)
    after = engine.rollout([Request(prompts(1)[0])], SAMPLING)
    want = Engine(trainer, tokenizer).rollout([Request(prompts(1)[0])], SAMPLING)
    assert not torch.equal(after.sampler_logprobs, before.sampler_logprobs)
    assert torch.equal(after.tokens, want.tokens) and torch.equal(after.sampler_logprobs, want.sampler_logprobs)

    name, p = changed[0]
    snapshot = {n: q.clone() for n, q in policy.named_parameters()}
    with pytest.raises(ValueError, match="no parameter or buffer 'model.nope'"):
        engine.update_weights([(name, p + 1), ("model.nope", p)])
    with pytest.raises(ValueError, match=f"'{name}' has shape"):
        engine.update_weights([(name, p[:1])])
    assert all(torch.equal(q, snapshot[n]) for n, q in policy.named_parameters())  # nothing copied on an error
    assert engine.update_weights() == 0 and engine.weights_version == 2  # shared model: nothing to copy


def test_the_next_rollout_sees_weights_changed_in_place(tiny):
    """The optimizer updates the shared model in place between rollouts: the same engine then samples what a
    fresh engine samples from the new weights."""
    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    requests = [Request(p, n=2) for p in prompts(2)]
    for options in ({}, {"cuda_graphs": True, "max_num_seqs": 4}):
        engine = Engine(policy, tokenizer, **options)
        engine.rollout(requests, SAMPLING)
        with torch.no_grad():
            for p in policy.parameters():
                p.mul_(0.97)
        got = engine.rollout(requests, SAMPLING)
        want = Engine(policy, tokenizer, **options).rollout(requests, SAMPLING)
        assert torch.equal(got.tokens, want.tokens)
        assert torch.equal(got.sampler_logprobs, want.sampler_logprobs)
