"""``ossrl memory``'s plans against the GPU: per recipe, the planned peaks of the rollout and train step, then the same
step run for real on CUDA (random weights at the real shapes, MXFP4 experts from random bytes: ``ossrl.memory.
planner.measure``) with ``torch.cuda.max_memory_allocated`` per phase, and the train step's tokens/s with and
without each memory option the recipe turns on (``--options``).

What runs on the GPU is the planner's step, on real tensors with the real kernels: the engine's KV cache allocated
and its largest prefill (through ``CacheStep.attend``), one decode step and the sampler; the largest micro-batch's
forward, chunked log-probs, policy loss, backward, clipping and AdamW step. Not the tokenizer, the task or the
engine's scheduler (they need the checkpoint's tokenizer and data, and hold no GPU memory of note).

    python -m benchmarks.memory                       # on a GPU: the three recipes, planned vs measured
    python -m benchmarks.memory --options             # + tokens/s with each offload on and off
    python -m benchmarks.memory --plan-only           # anywhere: the plans only (no GPU needed)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import environment, save_results
from ossrl.config import load_config
from ossrl.memory.planner import GPU_OVERHEAD_GIB, _optimizer, build_model, measure, plan, step_shape, train_phase
from ossrl.memory.tracker import DeviceTracker

ROOT = Path(__file__).parents[1]
RECIPES = ["configs/gsm8k_20b_16gb.yaml", "configs/gsm8k_120b.yaml", "configs/long_context_20b.yaml"]
OPTIONS = ("offload_activations", "offload_embeddings", "moe_chunk_tokens")


def train_tokens_per_s(config, prompt_tokens: int, repeat: int = 2) -> dict[str, float]:
    """Tokens/s and peak of the train step (largest micro-batch, forward + backward + AdamW) on CUDA."""
    device = torch.device("cuda")
    model = build_model(config, device, seed=0)
    params, optimizer = _optimizer(config, model)
    shape = step_shape(config, model.config, prompt_tokens)
    train_phase(model, config, shape, params, optimizer, DeviceTracker(device))  # warm-up (kernels compile)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeat):
        train_phase(model, config, shape, params, optimizer, DeviceTracker(device))
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeat
    out = {"tokens_per_s": round(shape.micro_batch_tokens / seconds, 1), "seconds": round(seconds, 3),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}  # fmt: skip
    del model, params, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", default=RECIPES)
    parser.add_argument("--plan-only", action="store_true", help="plans only (no GPU)")
    parser.add_argument("--options", action="store_true", help="train tokens/s with each memory option off and on")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every recipe (repeatable)")  # fmt: skip
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    if not args.plan_only and not torch.cuda.is_available():
        print("benchmarks.memory: measuring needs a CUDA GPU (none here); --plan-only prints the plans alone",
              file=sys.stderr)  # fmt: skip
        return 2
    gpu_gib = None
    if torch.cuda.is_available():
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    results = {"environment": environment(), "gpu_overhead_gib": GPU_OVERHEAD_GIB, "prompt_tokens": args.prompt_tokens,
               "recipes": {}}  # fmt: skip
    for recipe in args.recipes:
        config = load_config(ROOT / recipe if not Path(recipe).is_file() else recipe, args.override)
        started = time.perf_counter()
        planned = plan(config, gpu_gib, prompt_tokens=args.prompt_tokens, search=False)
        row: dict = {"settings": config.to_dict(), "plan": planned.to_dict(),
                     "plan_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        print(f"{recipe}: planned rollout {planned.rollout_peak_gib:.2f} GiB, train {planned.train_peak_gib:.2f} GiB")
        if not args.plan_only:
            measured = measure(config, "cuda", prompt_tokens=args.prompt_tokens)
            row["measured"] = {k: round(v, 3) for k, v in measured.items()}
            for phase in ("rollout", "train"):
                want, got = getattr(planned, f"{phase}_peak_gib"), measured[f"cuda_{phase}"]
                row[f"{phase}_error"] = round((want - got) / got, 4)
                error = row[f"{phase}_error"]
                print(f"  {phase}: planned {want:.2f} GiB, max_memory_allocated {got:.2f} GiB ({error:+.1%})")
            gc.collect()
            torch.cuda.empty_cache()
            if args.options:
                row["train_speed"] = {"recipe": train_tokens_per_s(config, args.prompt_tokens)}
                for option in OPTIONS:
                    value = getattr(config.model, option)
                    if not value:
                        continue
                    off_value = None if option == "moe_chunk_tokens" else False
                    off = dataclasses.replace(config, model=dataclasses.replace(config.model, **{option: off_value}))
                    row["train_speed"][f"without_{option}"] = train_tokens_per_s(off, args.prompt_tokens)
                print(f"  train speed: {row['train_speed']}")
        results["recipes"][recipe] = row
    save_results("memory" if not args.plan_only else "memory_plan", results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
