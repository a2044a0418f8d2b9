"""One GRPO step at gpt-oss-20b shapes (random bf16 weights, LoRA r=16): rollout and train time, peak memory.

    python -m benchmarks.grpo_step                          # 4 prompts x 4 generations, 512 new tokens
    python -m benchmarks.grpo_step --layers 4 --new-tokens 64

The step is the trainer's: engine rollout (stop tokens off, so every sample runs to the limit), rewards stand-in
(random, since random weights solve no task), GRPO advantages, one packed forward/backward with chunked log-probs
and gradient checkpointing, AdamW on the adapters.

Rollouts: ONE engine for the run, as the trainer keeps it. ``--rollout-steps`` (default 3) rollouts run on it, each
followed by ``engine.release_memory()`` (the update gets the cache's memory back) and ``engine.update_weights()``
(the shared model: nothing to copy); the last one's samples feed the training step. ``rollouts`` in the results has
each step's seconds and the engine's counters (the cache is allocated once per rollout after a release, laid out
once; graphs, with ``--cuda-graphs``, are captured in the first rollout and replayed after).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import environment, peak_memory_gib, reset_peak, save_results, sync
from ossrl import rl
from ossrl.model import GptOss, GptOssConfig
from ossrl.model.lora import LoraConfig, apply_lora, lora_parameters
from ossrl.rollout import Engine, Request, SamplingParams
from ossrl.train.batching import Episode, episode_logprobs, padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj")
    parser.add_argument("--rollout-steps", type=int, default=3, help="rollouts on one engine (the last one trains)")
    parser.add_argument("--cuda-graphs", action="store_true", help="Engine(cuda_graphs=True)")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = GptOssConfig() if args.layers is None else GptOssConfig(num_hidden_layers=args.layers)
    settings = {**vars(args), "device": device, "layers": config.num_hidden_layers}
    results: dict = {"env": environment(), "settings": settings}
    print(results)

    model = GptOss.from_config(config, device=device, dtype=torch.bfloat16).eval()
    apply_lora(model, LoraConfig(r=16, alpha=32, targets=tuple(args.lora_targets.split(","))))
    model.gradient_checkpointing = True
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=5e-5)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
               for _ in range(args.prompts)]  # fmt: skip
    engine = Engine(model, cuda_graphs=args.cuda_graphs)
    requests = [Request(p, n=args.generations) for p in prompts]
    results["rollouts"] = []
    for step in range(args.rollout_steps):  # one engine across steps, as the trainer keeps it
        sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, stop_token_ids=[], seed=step)
        reset_peak()
        sync()
        start = time.perf_counter()
        batch = engine.rollout(requests, sampling)
        sync()
        rollout_s = time.perf_counter() - start
        rollout_peak = peak_memory_gib()
        engine.release_memory()  # the update below gets the cache's memory
        engine.update_weights()  # the engine shares the model: the optimizer's in-place step is the sync
        row = {"step": step, "rollout_seconds": rollout_s, "rollout_peak_gib": rollout_peak,
               "sampled_tokens": int(batch.loss_mask.sum()), **engine.stats}  # fmt: skip
        results["rollouts"].append(row)
        print(row, flush=True)
    groups = batch.completions()

    reset_peak()
    start = time.perf_counter()
    episodes = [
        Episode(p, c.token_ids, c.loss_mask, c.logprobs) for p, g in zip(prompts, groups, strict=True) for c in g
    ]
    rewards = torch.rand(len(episodes), generator=gen)
    adv = rl.compute_advantages("grpo", rewards, torch.arange(len(episodes)) // args.generations).to(device)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    lp, _ = episode_logprobs(model, episodes, temperature=1.0)
    mask = padded([e.loss_mask for e in episodes], lp.shape[1], torch.float32, device)
    sampler = padded([e.sampler_logprobs for e in episodes], lp.shape[1], torch.float32, device)
    loss, _ = rl.ppo_clip_loss(lp, lp.detach(), adv, mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    sync()
    train_s = time.perf_counter() - start
    mismatch = {k: float(v) for k, v in rl.mismatch_metrics(lp.detach(), sampler, mask).items()}
    sampled = sum(sum(e.loss_mask) for e in episodes)
    results["step"] = {
        "rollout_seconds": rollout_s, "train_seconds": train_s, "rollout_peak_gib": rollout_peak,
        "train_peak_gib": peak_memory_gib(), "sampled_tokens": sampled, "rollout_tokens_per_s": sampled / rollout_s,
        "train_tokens": sum(len(e.prompt) + len(e.completion) for e in episodes), "mismatch": mismatch,
    }  # fmt: skip
    print(results["step"])
    save_results("grpo_step", results, args.out)


if __name__ == "__main__":
    main()
