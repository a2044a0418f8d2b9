"""Rollout throughput at gpt-oss-20b shapes (random bf16 weights): our engine next to transformers' ``generate``.

    python -m benchmarks.rollout                          # batch 1 / 16 / 64 / 256, 128-token prompts, 256 new tokens
    python -m benchmarks.rollout --batches 1 64 --skip-hf
    python -m benchmarks.rollout --tiny                   # a few-second smoke run of every phase (CPU is fine)

Every sequence runs the full ``--new-tokens`` (``stop_token_ids=[]``); tokens/s counts new tokens over the whole
``rollout`` call (prefill included), and ``decode_ms_per_step`` is (t(new tokens) - t(1 token)) / (new tokens - 1).

Phases, in one process on one GPU:
1. ours: ``Engine(model).rollout`` at each batch (KV cache sized to batch x (prompt + new tokens)). One engine per
   batch, kept across its calls as a trainer keeps it across RL steps: the timed call at ``--new-tokens`` is the
   first of that length (graphs, when on, are captured inside it for its page-table width); ``repeat_*`` is the same
   call again (cache and graphs kept: what every RL step after the first costs).
2. log-prob mismatch in bf16 at batch 16: the engine's log-prob of every sampled token against one packed forward
   of prompt + completion (what the trainer computes), ``log_softmax(logits / T)``; control: the trainer's packed
   forward against one forward per sequence (the bf16 noise floor of the network itself).
3. graph probe: one decode step (forward + lm_head + sampler) eager vs replayed from a CUDA graph, at each batch:
   the ceiling for the engine's graphed step (``ours_cuda_graphs``: ``Engine(cuda_graphs=True)``, with the host
   bookkeeping, and whether its first 32 tokens equal the eager engine's).
4. a short profile of decode steps (GPU busy time vs wall time, top kernels) and the sampler alone.
5. transformers: ``GptOssForCausalLM`` (eager attention) built on the meta device and given OUR weight tensors
   (shared storage, so both run the same network without a second 39 GiB copy; fp32 norms and sinks become small
   bf16 copies, as in a bf16 HF model). HF is slow, so it runs ``--hf-new-tokens`` new tokens (plus a 1-token run for
   its prefill) and its time for ``--new-tokens`` is extrapolated linearly: t(1) + (N - 1) * per-step time. The JSON
   says which numbers are measured and which extrapolated. Control for "same network": our logits for a prompt
   alone vs packed after another prompt.
6. ours with the experts packed as MXFP4 in memory (``quantize_experts``, as the release ships them) at
   ``--mxfp4-batches``, eager and with CUDA graphs: each step dequantizes the chosen experts (decode-sized batches)
   or all of them.
7. ours with a LoRA adapter (r=16 on attention and experts, B = 0) on those weights.

Measured on an H100: ``benchmarks/results/rollout_h100.json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import time
from typing import Any

import torch

from benchmarks.common import environment, peak_memory_gib, reset_peak, save_results, sync, time_it
from ossrl.model.checkpoint import quantize_experts
from ossrl.model.config import GptOssConfig
from ossrl.model.gpt_oss import GptOss
from ossrl.rollout import Engine, Request, SamplingParams
from ossrl.rollout.sampling import sample_tokens

TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=16)  # fmt: skip


def make_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(min(1000, vocab // 4), vocab - min(1000, vocab // 4), (batch, length), generator=gen).tolist()


def sampling(new_tokens: int, seed: int = 0) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_new_tokens=new_tokens, stop_token_ids=[], seed=seed)


def timed(fn) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


# ---- ours ------------------------------------------------------------------------------------------------------
def make_engine(model: GptOss, batch: int, prompt_len: int, new_tokens: int, page: int = 16, **options: bool) -> Engine:
    """``options``: Engine's ``cuda_graphs`` / ``torch_compile``."""
    tokens = -(-(prompt_len + new_tokens) // page) * page  # whole pages per sequence
    return Engine(model, page_size=page, kv_cache_tokens=batch * tokens, max_num_seqs=batch, **options)


def bench_ours(
    model: GptOss, batch: int, prompts: list[list[int]], new_tokens: int, **options: bool
) -> tuple[dict, list]:
    """Tokens/s of one rollout call on an engine kept across calls (graphs, when on, are captured inside the first
    timed call, as in the first RL step; ``repeat_*`` replays them, as every later step does; torch.compile compiles
    in the warm-up call, once per bucket per process)."""
    engine = make_engine(model, batch, len(prompts[0]), new_tokens, **options)
    requests = [Request(p) for p in prompts[:batch]]
    engine.rollout(requests, sampling(4))  # warm-up: Triton compiles for this batch's shapes; the cache is allocated
    t1, _ = timed(lambda: engine.rollout(requests, sampling(1)))
    reset_peak()
    seconds, out = timed(lambda: engine.rollout(requests, sampling(new_tokens)))
    captures = engine.stats["graph_captures"]
    repeat, _ = timed(lambda: engine.rollout(requests, sampling(new_tokens)))
    completions = [group[0] for group in out.completions()]
    short = [c for c in completions if len(c.token_ids) != new_tokens]
    assert not short, f"a sequence stopped early: {short[0].finish_reason} {short[0].error}"
    step = (seconds - t1) / max(1, new_tokens - 1)
    row = {
        "seconds": seconds, "tokens_per_s": batch * new_tokens / seconds, "prefill_plus_1_token_seconds": t1,
        "decode_ms_per_step": 1e3 * step, "decode_tokens_per_s": batch / step if step > 0 else None,
        "repeat_seconds": repeat, "repeat_tokens_per_s": batch * new_tokens / repeat,
        "peak_gib": peak_memory_gib(), "engine_stats": dict(engine.stats),
        "graph_captures_in_repeat": engine.stats["graph_captures"] - captures,
    }  # fmt: skip
    if options:  # decode bucket -> whether it was captured in a CUDA graph
        row["graph_buckets_captured"] = {str(k): v for k, v in engine.graph_buckets.items()}
    engine.release_memory(graphs=True)
    return row, completions


def trainer_logprobs(model: GptOss, prompts, completions, temperature: float, packed: bool = True) -> list:
    """What the trainer computes: log_softmax(logits / T) of the sampled tokens from a forward over prompt +
    completion; ``packed`` runs all sequences in one varlen forward, else one forward per sequence."""
    device = model.device
    seqs = [p + c.token_ids for p, c in zip(prompts, completions, strict=True)]
    groups = [seqs] if packed else [[s] for s in seqs]
    out = []
    with torch.no_grad():  # not inference_mode: see ossrl.rollout.kv_cache.to_device
        for group in groups:
            cu = torch.zeros(len(group) + 1, dtype=torch.int32)
            cu[1:] = torch.tensor([len(s) for s in group]).cumsum(0)
            flat = torch.tensor([t for s in group for t in s], device=device)
            hidden = model.hidden_states(flat, cu_seqlens=cu.to(device))
            for i, seq in enumerate(group):
                n_new = len(seq) - len(prompts[0])
                rows = hidden[int(cu[i + 1]) - n_new - 1 : int(cu[i + 1]) - 1]
                logits = model.lm_head(rows).float() / temperature
                ids = torch.tensor(seq[-n_new:], device=device)[:, None]
                out.append(torch.log_softmax(logits, dim=-1).gather(-1, ids).squeeze(1).cpu())
    return out


def logprob_mismatch(model: GptOss, prompts: list[list[int]], completions: list, temperature: float) -> dict:
    """Engine log-probs vs one packed forward of prompt + completion (the trainer's computation), with a control:
    the trainer's packed forward vs one forward per sequence (same kernels, only the GEMM shapes differ)."""
    packed = torch.stack(trainer_logprobs(model, prompts, completions, temperature))
    single = torch.stack(trainer_logprobs(model, prompts, completions, temperature, packed=False))
    lp = torch.tensor([c.logprobs for c in completions], dtype=torch.float32)  # [B, new tokens]
    diff = lp - packed
    absd, control = diff.abs(), (single - packed).abs()
    return {
        "batch": len(prompts), "tokens": diff.numel(), "temperature": temperature, "dtype": str(model.dtype),
        "mean_abs_diff": absd.mean().item(), "max_abs_diff": absd.max().item(), "mean_diff": diff.mean().item(),
        "p99_abs_diff": absd.flatten().kthvalue(max(1, int(0.99 * absd.numel()))).values.item(),
        "frac_abs_diff_gt_0.01": (absd > 0.01).float().mean().item(),
        "mean_abs_ratio_minus_1": (diff.exp() - 1).abs().mean().item(),
        "first_token_mean_abs_diff": absd[:, 0].mean().item(),  # from the prefill (varlen kernel, as the trainer)
        "decoded_tokens_mean_abs_diff": absd[:, 1:].mean().item() if absd.shape[1] > 1 else None,  # paged decode
        "control_trainer_packed_vs_per_sequence": {"mean_abs_diff": control.mean().item(),
                                                   "max_abs_diff": control.max().item()},
        "engine_mean_logprob": lp.mean().item(),
        "note": "the control is the bf16 noise floor of this network: the trainer against itself, same kernels, only "
        "the packing (GEMM shapes) differs. Random weights (init std 0.02) have near-tied router top-k logits, so "
        "rounding flips experts and differences grow through the layers; a trained checkpoint should show less",
    }  # fmt: skip


def sharp_router_mismatch(model: GptOss, prompts: list[list[int]], new_tokens: int, factor: float = 8.0) -> dict:
    """The same measurement with every router's weights scaled by ``factor`` (a power of two: exact in bf16, undone
    after). Off by default: it was meant to make expert choices robust to rounding, but bf16 rounding of the router
    logits scales with them, so the flip rate stays and only the mixture weights get peakier (the mismatch grew on
    an H100, control included: see benchmarks/results/rollout_h100.json)."""
    routers = [layer.mlp.router for layer in model.model.layers]
    with torch.no_grad():
        for r in routers:
            r.weight.mul_(factor)
    try:
        engine = make_engine(model, len(prompts), len(prompts[0]), new_tokens)
        out = engine.generate([Request(p) for p in prompts], sampling(new_tokens))
        result = logprob_mismatch(model, prompts, [g[0] for g in out], 1.0)
    finally:
        with torch.no_grad():
            for r in routers:
                r.weight.div_(factor)
    return {"router_weight_scale": factor, "new_tokens": new_tokens, **result}


def graph_probe(model: GptOss, batch: int, cached: int, iters: int = 20) -> dict:
    """One decode step (forward + lm_head + sampler) on a cache holding ``cached`` tokens per sequence, eager vs
    replayed from a CUDA graph: the ceiling a graphed decode step would approach (no host bookkeeping included)."""
    from ossrl.model.gpt_oss import PackedBatch
    from ossrl.rollout.kv_cache import CacheStep

    engine = make_engine(model, batch, cached, 16)
    cache = engine._layout(1)
    cache.allocate()
    pages = [cache.admit(cached + 16, 1) for _ in range(batch)]
    for p in pages:
        p.cached_len = cached - 1
    step = CacheStep(cache, pages, [1] * batch, fresh=False)
    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    positions = torch.full((batch,), cached - 1, device=device)
    seeds = torch.arange(batch, device=device)
    packed = PackedBatch(ids, step.cu_q_lens, 1, positions, kv_cache=step)
    params = sampling(1)

    def decode_step():
        logits = model.lm_head(model.forward_packed(packed)).float()
        return sample_tokens(logits, params, seeds, positions)

    result: dict[str, Any] = {"batch": batch, "cached_tokens": cached}
    with torch.no_grad():
        result["eager_ms"] = 1e3 * time_it(decode_step, warmup=2, repeat=iters)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    decode_step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                decode_step()
            result["graph_ms"] = 1e3 * time_it(graph.replay, warmup=2, repeat=iters)
            result["graph_tokens_per_s"] = batch / (result["graph_ms"] / 1e3)
            del graph
        except Exception as err:  # a capture failure is a finding, not a crash
            result["graph_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    del cache, step
    gc.collect()
    return result


# ---- transformers --------------------------------------------------------------------------------------------------
def hf_sharing_weights(model: GptOss):
    """transformers' GptOssForCausalLM (bf16, eager attention) whose parameters ARE our tensors (no copy)."""
    from transformers import GptOssConfig as HFConfig
    from transformers import GptOssForCausalLM

    config = HFConfig(**model.config.to_hf_dict())
    with torch.device("meta"):
        hf = GptOssForCausalLM._from_config(config, torch_dtype=model.dtype, attn_implementation="eager")
    ours = model.state_dict()
    state = {}
    for name, ref in hf.state_dict().items():
        value = ours[name]
        if value.shape != ref.shape and value.dim() == 3 and value.transpose(1, 2).shape == ref.shape:
            value = value.transpose(1, 2)  # some transformers versions store experts [E, out, in]
        state[name] = value if value.dtype == ref.dtype else value.to(ref.dtype)  # fp32 norms / sinks: small copies
    hf.load_state_dict(state, strict=True, assign=True)
    for name, module in list(hf.named_modules()):  # non-persistent buffers (RoPE inv_freq) are still on meta
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, attr = name.rpartition(".")
            fresh = type(module)(config=hf.config).to(model.device)
            setattr(hf.get_submodule(parent) if parent else hf, attr, fresh)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers model still has meta tensors: {left[:5]}")
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def hf_same_network_check(model: GptOss, hf, prompt: list[int], other: list[int]) -> dict:
    """HF's logits vs ours on one prompt, next to a control: ours on the same prompt packed after another one (same
    network, same kernels; only the GEMM shapes and so the bf16 rounding differ)."""
    ids = torch.tensor([prompt], device=model.device)
    cu = torch.tensor([0, len(other), len(other) + len(prompt)], dtype=torch.int32, device=model.device)
    with torch.no_grad():  # not inference_mode: see ossrl.rollout.kv_cache.to_device
        a = model(ids)[0].float()
        b = hf(input_ids=ids).logits[0].float()
        c = model(torch.tensor(other + prompt, device=model.device), cu_seqlens=cu)[len(other) :].float()

    def compare(x: torch.Tensor, y: torch.Tensor) -> dict:
        return {"logits_max_abs_diff": (x - y).abs().max().item(), "logits_mean_abs_diff": (x - y).abs().mean().item(),
                "argmax_agreement": (x.argmax(-1) == y.argmax(-1)).float().mean().item()}  # fmt: skip

    return {"hf_vs_ours": compare(a, b), "control_ours_alone_vs_packed": compare(a, c), "logits_std": a.std().item()}


def hf_generate(hf, x: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():  # not inference_mode: see ossrl.rollout.kv_cache.to_device
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)  # fmt: skip
    assert out.shape == (x.shape[0], x.shape[1] + new_tokens), tuple(out.shape)
    return out


def bench_hf(hf, batch: int, prompts: list[list[int]], new_tokens: int, hf_tokens: int, max_seconds: float) -> dict:
    x = torch.tensor(prompts[:batch], device=hf.device)
    try:
        t1, _ = timed(lambda: hf_generate(hf, x, 1))
        if t1 * hf_tokens > max_seconds:  # decode steps cost no more than a prefill plus a step here
            hf_tokens = max(2, int(max_seconds / t1))
        reset_peak()
        tn, _ = timed(lambda: hf_generate(hf, x, hf_tokens))
    except torch.OutOfMemoryError:
        gc.collect()
        return {"error": "OOM", "peak_gib": peak_memory_gib()}
    step = (tn - t1) / (hf_tokens - 1)
    extrapolated = t1 + (new_tokens - 1) * step
    return {
        "measured_new_tokens": hf_tokens, "measured_seconds": tn, "measured_tokens_per_s": batch * hf_tokens / tn,
        "prefill_plus_1_token_seconds": t1, "decode_ms_per_step": 1e3 * step,
        "extrapolated_seconds": extrapolated, "tokens_per_s": batch * new_tokens / extrapolated,
        "peak_gib_at_measured_tokens": peak_memory_gib(), "extrapolated": True,
    }  # fmt: skip


# ---- LoRA, profile, sampler --------------------------------------------------------------------------------------
def attach_lora(model: GptOss, rank: int) -> str:
    """Attach a fresh rank-``rank`` adapter on attention and experts (B = 0: same outputs, all the extra compute)."""
    from ossrl.model.lora import ATTENTION_TARGETS, EXPERT_TARGETS, LoraConfig, apply_lora

    config = LoraConfig(r=rank, targets=(*ATTENTION_TARGETS, *EXPERT_TARGETS))
    apply_lora(model, config)
    return f"apply_lora(model, {config})"


def profile_decode(model: GptOss, batch: int, prompts: list[list[int]], steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    engine = make_engine(model, batch, len(prompts[0]), steps)
    requests = [Request(p) for p in prompts[:batch]]
    engine.generate(requests, sampling(2))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        wall, _ = timed(lambda: engine.generate(requests, sampling(steps)))

    def device_us(e) -> float:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, attr):
                return float(getattr(e, attr))
        return 0.0

    events = [e for e in prof.key_averages() if device_us(e) > 0]
    busy = sum(device_us(e) for e in events) / 1e6
    top = sorted(events, key=device_us, reverse=True)[:12]
    return {
        "batch": batch, "new_tokens": steps, "wall_seconds_profiled": wall, "gpu_busy_seconds": busy,
        "gpu_busy_fraction": busy / wall, "launches_per_step": sum(e.count for e in events) / steps,
        "top_kernels": [{"name": e.key[:90], "ms": device_us(e) / 1e3, "count": e.count} for e in top],
    }  # fmt: skip


def bench_sampler(vocab: int, batches: list[int], device: str) -> dict:
    out = {}
    for b in batches:
        logits = torch.randn(b, vocab, device=device)
        seeds, positions = torch.arange(b, device=device), torch.full((b,), 200, device=device)
        out[str(b)] = 1e3 * time_it(lambda x=logits, s=seeds, p=positions: sample_tokens(x, sampling(1), s, p))
    return out


# ---- report --------------------------------------------------------------------------------------------------------
def table(results: dict, batches: list[int]) -> str:
    lines = ["batch | ours tok/s | ours decode ms/step | ours peak GiB | HF tok/s | HF peak GiB | ours/HF"]
    for b in map(str, batches):
        o = results["ours"].get(b, {})
        h = results.get("transformers", {}).get("batches", {}).get(b, {})
        otps, htps = o.get("tokens_per_s"), h.get("tokens_per_s")
        hcell = f"{htps:.0f} (extrap. from {h['measured_new_tokens']})" if htps else h.get("error", "-")
        ratio = f"{otps / htps:.1f}x" if otps and htps else "-"
        lines.append(f"{b:>5} | {otps or 0:>10.0f} | {o.get('decode_ms_per_step', 0):>19.1f} | "
                     f"{o.get('peak_gib') or 0:>13} | {hcell:>24} | {h.get('peak_gib_at_measured_tokens', '-')} | "
                     f"{ratio}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--hf-new-tokens", type=int, default=16, help="tokens HF really generates (then extrapolated)")
    parser.add_argument("--hf-max-seconds", type=float, default=40.0, help="cap on one HF measurement")
    parser.add_argument("--mismatch-batch", type=int, default=16)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--profile-steps", type=int, default=16, help="0 skips the profile")
    parser.add_argument("--sharp-router-tokens", type=int, default=0, help="> 0: also the sharp-router mismatch")
    parser.add_argument("--no-graph-probe", dest="graph_probe", action="store_false")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="skip the run of ours with Engine(cuda_graphs=True)")  # fmt: skip
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="also ours with Engine(cuda_graphs=True, torch_compile=True) (compiles once per batch)",
    )
    parser.add_argument("--mxfp4-batches", type=int, nargs="*", default=[1, 64],
                        help="then ours with the experts packed as MXFP4 (none: skip)")  # fmt: skip
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny random config (smoke test)")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = GptOssConfig(**TINY) if args.tiny else GptOssConfig()
    results: dict[str, Any] = {
        "env": environment(),
        "settings": {"model": "tiny" if args.tiny else "gpt-oss-20b shapes, random weights (from_config, seed 0)",
                     "params": config.num_params, "dtype": str(dtype), "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "batches": args.batches,
                     "sampling": "temperature 1.0, no truncation, stop_token_ids=[] (every sequence runs all tokens)",
                     "engine": "Engine(model, kv_cache_tokens=batch*(prompt+new), max_num_seqs=batch), defaults "
                               "otherwise (page 16, max_prefill_tokens 16384); eager PyTorch + Triton, no CUDA graphs; "
                               "one engine per batch, kept across its calls (repeat_*: the same call again)",
                     "hf": f"GptOssForCausalLM eager attention, generate(do_sample=True, top_k=0), sharing our "
                           f"weights; {args.hf_new_tokens} new tokens measured, {args.new_tokens} extrapolated",
                     "tokens_per_s": "new tokens / wall time of the whole rollout call (prefill included)"},
    }  # fmt: skip
    print(results["env"], results["settings"], sep="\n")

    def save() -> None:
        save_results("rollout", results, args.out)

    reset_peak()
    init_s, model = timed(lambda: GptOss.from_config(config, device=device, dtype=dtype).eval())
    results["ours_model"] = {"init_seconds": init_s, "weights_gib": peak_memory_gib()}
    prompts = make_prompts(max(args.batches + [args.mismatch_batch]), args.prompt_len, config.vocab_size)

    results["ours"] = {}
    mismatch_done = False
    for b in args.batches:
        results["ours"][str(b)], completions = bench_ours(model, b, prompts, args.new_tokens)
        print(f"ours batch {b}: {results['ours'][str(b)]}", flush=True)
        if b == args.mismatch_batch:
            results["logprob_mismatch"] = logprob_mismatch(model, prompts[:b], completions, 1.0)
            mismatch_done = True
        del completions
        save()
    variants = {"ours_cuda_graphs": {"cuda_graphs": True}}
    if args.torch_compile:
        variants["ours_compiled_cuda_graphs"] = {"cuda_graphs": True, "torch_compile": True}
    for name, options in variants.items() if args.cuda_graphs and (device == "cuda" or args.tiny) else ():
        results[name] = {}
        for b in args.batches:
            row, graphed = bench_ours(model, b, prompts, args.new_tokens, **options)
            n = min(32, args.new_tokens)
            eager = make_engine(model, b, args.prompt_len, n).generate([Request(p) for p in prompts[:b]], sampling(n))
            row[f"same_first_{n}_tokens_as_eager"] = sum(
                g.token_ids[:n] == e[0].token_ids for g, e in zip(graphed, eager, strict=True)
            ) / b  # fmt: skip
            if b == args.mismatch_batch:  # the trainer against what the graphed (and compiled) step sampled
                row["logprob_mismatch"] = logprob_mismatch(model, prompts[:b], graphed, 1.0)
            results[name][str(b)] = row
            print(f"{name}, batch {b}: {row}", flush=True)
            del graphed, eager
            save()
    if not mismatch_done:
        engine = make_engine(model, args.mismatch_batch, args.prompt_len, args.new_tokens)
        out = engine.generate([Request(p) for p in prompts[: args.mismatch_batch]], sampling(args.new_tokens))
        results["logprob_mismatch"] = logprob_mismatch(model, prompts[: args.mismatch_batch], [g[0] for g in out], 1.0)
    print(f"log-prob mismatch: {results['logprob_mismatch']}", flush=True)
    if args.sharp_router_tokens:
        mb = args.mismatch_batch
        results["logprob_mismatch_sharp_router"] = sharp_router_mismatch(model, prompts[:mb], args.sharp_router_tokens)
        print(f"log-prob mismatch, sharp routers: {results['logprob_mismatch_sharp_router']}", flush=True)
    save()
    if args.graph_probe and device == "cuda":
        results["graph_probe"] = [graph_probe(model, b, args.prompt_len + args.new_tokens // 2) for b in args.batches]
        print(f"graph probe: {results['graph_probe']}", flush=True)
        save()
    gc.collect()
    reset_peak()

    if args.profile_steps:
        results["profile"] = [
            profile_decode(model, b, prompts, args.profile_steps) for b in (1, 64) if b <= len(prompts)
        ]
        results["sampler_ms"] = bench_sampler(config.vocab_size, args.batches, device)
        print(f"profile: {results['profile']}\nsampler ms: {results['sampler_ms']}", flush=True)
        save()

    if not args.skip_hf:
        hf = hf_sharing_weights(model)
        theirs: dict[str, Any] = {
            "same_network_check": hf_same_network_check(model, hf, prompts[0], prompts[1]),
            "batches": {},
        }
        print(f"transformers vs ours, same weights: {theirs['same_network_check']}", flush=True)
        hf_generate(hf, torch.tensor(prompts[:1], device=device), 2)  # warm-up
        results["transformers"] = theirs
        for b in args.batches:
            theirs["batches"][str(b)] = bench_hf(
                hf, b, prompts, args.new_tokens, args.hf_new_tokens, args.hf_max_seconds
            )
            print(f"transformers batch {b}: {theirs['batches'][str(b)]}", flush=True)
            save()
        del hf
        gc.collect()
        reset_peak()

    if args.mxfp4_batches:  # the released format: experts packed, dequantized per step (only the chosen at decode)
        quantize_experts(model)
        gc.collect()
        reset_peak()
        for name, options in (("ours_mxfp4", {}), ("ours_mxfp4_cuda_graphs", {"cuda_graphs": True})):
            if options and not (args.cuda_graphs and device == "cuda"):
                continue
            results[name] = {}
            for b in [b for b in args.mxfp4_batches if b <= len(prompts)]:
                results[name][str(b)], _ = bench_ours(model, b, prompts, args.new_tokens, **options)
                print(f"{name} batch {b}: {results[name][str(b)]}", flush=True)
                save()

    if importlib.util.find_spec("ossrl.model.lora") is None:
        results["lora"] = {"available": False, "note": "ossrl.model.lora does not exist in this checkout yet"}
    else:
        try:
            how = attach_lora(model, args.lora_rank)
            results["lora"] = {"available": True, "how": how, "batches": {}}
            for b in [b for b in args.lora_batches if b <= len(prompts)]:
                results["lora"]["batches"][str(b)], _ = bench_ours(model, b, prompts, args.new_tokens)
                print(f"ours + LoRA batch {b}: {results['lora']['batches'][str(b)]}", flush=True)
                save()
        except Exception as err:  # the LoRA module is being written beside this benchmark; record, do not crash
            results["lora"] = {"available": True, "error": f"{type(err).__name__}: {err}"}

    results["ratios_ours_over_hf"] = {
        str(b): results["ours"][str(b)]["tokens_per_s"] / h["tokens_per_s"]
        for b in args.batches
        if (h := results.get("transformers", {}).get("batches", {}).get(str(b), {})).get("tokens_per_s")
    }
    print("\n" + table(results, args.batches))
    save()


if __name__ == "__main__":
    main()
