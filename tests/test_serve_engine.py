"""The engine's incremental interface (``Engine.stream()``) and the server's engine thread (``EngineLoop``):
per-request sampling params sample what a rollout samples, requests join the running batch at the next step,
cancellation frees the cache, pausing holds the engine, a stopped loop refuses work."""

import threading
import time

import pytest
from rollout_helpers import prompts

from ossrl.rollout import Engine, Request, SamplingParams
from ossrl.serve import EngineLoop, Overloaded, Unavailable

PARAMS = [
    SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[]),
    SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3, stop_token_ids=[]),
    SamplingParams(temperature=0.7, top_k=20, max_new_tokens=9, seed=5),
    SamplingParams(temperature=1.3, min_p=0.05, max_new_tokens=7, seed=11, stop_token_ids=[40, 41, 42, 43, 44]),
]


def run_stream(stream, jobs, join_after=None):
    """Submit jobs (request, params), the last one only after ``join_after`` steps when given; step to the end.
    Returns per job per sample (tokens, finish) and the decode batch size of each step."""
    out = [[([], None) for _ in range(r.n)] for r, _ in jobs]

    def listener(k):
        def on(sample, token, finish):
            tokens, _ = out[k][sample]
            out[k][sample] = (tokens + [token] if token is not None else tokens, finish)

        return on

    late = len(jobs) - 1 if join_after is not None else None
    for k, (request, params) in enumerate(jobs):
        if k != late:
            stream.submit(request, params, listener(k))
    sizes = []
    while stream.busy or late is not None:
        if late is not None and len(sizes) == join_after:
            stream.submit(jobs[late][0], jobs[late][1], listener(late))
            late = None
        sizes.append(stream.step())
    return out, sizes


def test_each_request_samples_with_its_own_params_what_a_rollout_samples(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, kv_cache_tokens=4096)
    ps = prompts(4)
    jobs = [(Request(p, n=2 if k == 2 else 1), params) for k, (p, params) in enumerate(zip(ps, PARAMS, strict=True))]
    stream = engine.stream()
    got, sizes = run_stream(stream, jobs)
    stream.close()
    assert max(sizes) == 5  # every sequence in one decode forward, four sets of sampling params among them
    assert stream.stats["batched_steps"] > 0 and stream.stats["max_batch_requests"] == 4
    for (request, params), samples in zip(jobs, got, strict=True):
        want = engine.generate([request], params)[0]  # alone, in a rollout (request index 0 = seed key 0)
        assert [(c.token_ids, c.finish_reason) for c in want] == samples
    assert got[2][0][0] != got[2][1][0]  # a request's n samples differ
    assert {finish for samples in got for _, finish in samples} >= {"length"}


def test_a_request_joins_the_running_batch_at_the_next_step(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    ps = prompts(2)
    jobs = [(Request(ps[0]), PARAMS[1]), (Request(ps[1]), PARAMS[0])]
    stream = engine.stream()
    got, sizes = run_stream(stream, jobs, join_after=3)
    stream.close()
    assert sizes[:3] == [1, 1, 1] and sizes[3] == 2  # the late request decodes with the first one at once
    for (request, params), samples in zip(jobs, got, strict=True):
        want = engine.generate([request], params)[0][0]
        assert samples == [(want.token_ids, want.finish_reason)]


def test_cancel_drops_a_sample_or_a_request_and_frees_the_cache(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    stream = engine.stream()
    heard = []
    params = SamplingParams(max_new_tokens=50, stop_token_ids=[])
    rid = stream.submit(Request(prompts(1)[0], n=2), params, lambda *event: heard.append(event))
    queued = stream.submit(Request(prompts(2)[1]), params, lambda *event: heard.append(("queued", *event)))
    assert stream.cancel(queued) == 1 and stream.num_waiting == 1  # not admitted yet: it just leaves the queue
    stream.step()
    assert stream.cancel(rid, sample=1) == 1
    before = len(heard)
    stream.step()
    assert {sample for sample, *_ in heard[before:]} == {0} and stream.num_running == 1
    assert stream.cancel(rid) == 1 and not stream.busy and stream.cancel(rid) == 0
    assert stream.cache.full_pool.reserved == 0 and stream.cache.sliding_pool.reserved == 0
    assert not any(event[0] == "queued" for event in heard)
    assert stream.stats["cancelled"] == 3
    with pytest.raises(RuntimeError, match="stream"):
        engine.generate([Request(prompts(1)[0])], params)  # one cache: no rollout while a stream is open
    stream.close()
    assert engine.generate([Request(prompts(1)[0])], SamplingParams(max_new_tokens=3))[0][0].finish_reason


def test_a_request_that_can_never_run_is_refused_at_submission(tiny):
    model, tokenizer = tiny
    stream = Engine(model, tokenizer, max_model_len=64, kv_cache_tokens=256).stream()
    assert "context" in stream.check(Request(list(range(10, 80))), SamplingParams())
    assert "temperature" in stream.check(Request([10, 11]), SamplingParams(temperature=-1))
    assert "no tools" in stream.check(Request([10, 11]), SamplingParams(max_turns=2))
    with pytest.raises(ValueError, match="vocabulary"):
        stream.submit(Request([10**6]), SamplingParams(), lambda *e: None)
    stream.close()


def test_engine_loop_runs_requests_from_other_threads_and_pauses_between_steps(tiny):
    model, tokenizer = tiny
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[])
    want = Engine(model, tokenizer).generate([Request(prompts(1)[0])], params)[0][0].token_ids
    loop = EngineLoop(Engine(model, tokenizer), max_queue=2).start()
    done, events = threading.Event(), []

    def deliver(batch):
        events.extend(batch)
        if any(e.finish for e in batch):
            done.set()

    with loop.paused():
        loop.submit(Request(prompts(1)[0]), params, deliver)
        loop.submit(Request(prompts(1)[0]), params, lambda batch: None)
        time.sleep(0.1)
        assert not events and loop.stats()["pending"] == 2  # held between steps: nothing ran
        with pytest.raises(Overloaded):
            loop.submit(Request(prompts(1)[0]), params, deliver)
    assert done.wait(60)
    assert [e.token for e in events if e.token is not None] == want
    assert events[-1].finish == "length"
    loop.stop()
    assert not loop.running
    with pytest.raises(Unavailable):
        loop.submit(Request(prompts(1)[0]), params, deliver)
