"""One GRPO step at gpt-oss-20b shapes (random bf16 weights, LoRA r=16): rollout and train time, peak memory.

    python -m benchmarks.grpo_step                          # 4 prompts x 4 generations, 512 new tokens
    python -m benchmarks.grpo_step --layers 4 --new-tokens 64

Each step is the trainer's: engine rollout (stop tokens off, so every sample runs to the limit) into a
``RolloutBatch``, ``engine.release_memory()`` (the update gets the cache's memory back), a rewards stand-in (random,
since random weights solve no task), GRPO advantages, packed micro-batches through the trainer's own
``train.update.micro_batch_loss`` (chunked log-probs of the sampled tokens only, gradient checkpointing), AdamW on
the adapters, ``engine.update_weights()`` (the shared model: nothing to copy). ONE engine serves every step, as in
the trainer; ``steps`` in the results has each step's rollout and train seconds and the engine's counters (the
cache is laid out once and allocated once per rollout after a release; graphs, with ``--cuda-graphs``, are captured
in the first step and replayed after).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import environment, peak_memory_gib, reset_peak, save_results, sync
from ossrl import rl
from ossrl.config import AlgorithmSettings
from ossrl.model import GptOss, GptOssConfig
from ossrl.model.lora import LoraConfig, apply_lora, lora_parameters
from ossrl.rollout import Engine, Request, SamplingParams
from ossrl.train.batching import pack_micro_batches
from ossrl.train.update import MetricReducer, MicroBatch, micro_batch_loss, normalizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj")
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps (rollout + update) on one engine")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
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
    algo = AlgorithmSettings()  # the trainer's defaults: GRPO advantages, PPO-clip, token-mean, TIS cap 2
    results["steps"] = []
    for step in range(args.steps):  # one engine across steps, as the trainer keeps it
        sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, stop_token_ids=[], seed=step)
        reset_peak()
        sync()
        start = time.perf_counter()
        batch = engine.rollout(requests, sampling)
        sync()
        rollout_s, rollout_peak = time.perf_counter() - start, peak_memory_gib()
        engine.release_memory()  # the update below gets the cache's memory
        reset_peak()
        start = time.perf_counter()
        rewards = torch.rand(batch.num_seqs, generator=gen)  # random weights solve nothing: a stand-in
        advantages = rl.compute_advantages(algo.advantage, rewards, batch.group.cpu(), scale=algo.scale)
        micro = [MicroBatch(batch.select(i), advantages[i])
                 for i in pack_micro_batches(batch.seq_lens.tolist(), args.micro_batch_tokens)]  # fmt: skip
        norm = normalizer(batch, algo.agg)
        reducer = MetricReducer(algo.loss)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for mb in micro:
            parts = micro_batch_loss(model, mb, algo, temperature=1.0, max_len=args.new_tokens, norm=norm, first=True)
            for name, (value, counts) in parts.items():
                reducer.add(name, value, counts)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        model.eval()
        engine.update_weights()  # the engine shares the model: the optimizer's in-place step is the sync
        sync()
        train_s = time.perf_counter() - start
        sampled = int(batch.loss_mask.sum())
        row = {
            "step": step, "rollout_seconds": rollout_s, "train_seconds": train_s, "rollout_peak_gib": rollout_peak,
            "train_peak_gib": peak_memory_gib(), "sampled_tokens": sampled, "rollout_tokens_per_s": sampled / rollout_s,
            "train_tokens": int(batch.seq_lens.sum()), "micro_batches": len(micro),
            "mismatch": {k: v for k, v in reducer.result().items() if k.startswith("mismatch/")}, **engine.stats,
        }  # fmt: skip
        results["steps"].append(row)
        print(row, flush=True)
    save_results("grpo_step", results, args.out)


if __name__ == "__main__":
    main()
