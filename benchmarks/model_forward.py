"""Model init time, peak memory and prefill tokens/s at gpt-oss-20b shapes (random bf16 weights), ours next to
transformers' GptOssForCausalLM (eager attention, its default for gpt-oss) in the same run.

    python benchmarks/model_forward.py                      # gpt-oss-20b shapes, prefill 1k and 8k tokens
    python benchmarks/model_forward.py --layers 4 --seqlens 1024 4096

The two models do not fit on one 80 GB GPU together in bf16, so ours runs first and is freed before HF's is built.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from benchmarks.common import environment, peak_memory_gib, reset_peak, save_results, sync, time_it
from ossrl.model.config import GptOssConfig
from ossrl.model.gpt_oss import GptOss


def bench_prefill(forward, vocab: int, seqlens: list[int], device: str) -> dict[str, dict]:
    results = {}
    for t in seqlens:
        ids = torch.randint(0, vocab, (1, t), device=device)
        reset_peak()
        try:
            with torch.inference_mode():
                seconds = time_it(lambda ids=ids: forward(ids), warmup=1, repeat=3)
            results[str(t)] = {"seconds": seconds, "tokens_per_s": t / seconds, "peak_gib": peak_memory_gib()}
        except torch.OutOfMemoryError:
            results[str(t)] = {"error": "OOM", "peak_gib": peak_memory_gib()}
        gc.collect()
        reset_peak()
        print(f"  T={t}: {results[str(t)]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: 24, as 20b)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = GptOssConfig() if args.layers is None else GptOssConfig(num_hidden_layers=args.layers)
    results: dict = {"env": environment(), "settings": {"layers": config.num_hidden_layers, "seqlens": args.seqlens,
                                                        "dtype": "bfloat16", "params": config.num_params}}  # fmt: skip
    print(results["env"], results["settings"])

    reset_peak()
    sync()
    start = time.perf_counter()
    model = GptOss.from_config(config, device=device, dtype=torch.bfloat16).eval()
    sync()
    ours = {"init_seconds": time.perf_counter() - start, "weights_peak_gib": peak_memory_gib()}
    print(f"ours: init {ours['init_seconds']:.2f}s, peak {ours['weights_peak_gib']} GiB")
    ours["prefill"] = bench_prefill(model, config.vocab_size, args.seqlens, device)
    results["ours"] = ours
    del model
    gc.collect()

    if not args.skip_hf:
        from transformers import GptOssConfig as HFConfig
        from transformers import GptOssForCausalLM

        reset_peak()
        sync()
        start = time.perf_counter()
        with torch.device(device):
            hf = GptOssForCausalLM._from_config(
                HFConfig(**config.to_hf_dict()), torch_dtype=torch.bfloat16, attn_implementation="eager"
            ).eval()
        sync()
        theirs = {"init_seconds": time.perf_counter() - start, "weights_peak_gib": peak_memory_gib()}
        print(f"transformers: init {theirs['init_seconds']:.2f}s, peak {theirs['weights_peak_gib']} GiB")
        theirs["prefill"] = bench_prefill(lambda ids: hf(input_ids=ids, use_cache=False).logits, config.vocab_size,
                                          args.seqlens, device)  # fmt: skip
        results["transformers"] = theirs
        del hf
        gc.collect()

        print("\nprefill tokens/s        ours    transformers   ratio")
        for t in map(str, args.seqlens):
            a, b = ours["prefill"][t].get("tokens_per_s"), theirs["prefill"][t].get("tokens_per_s")
            ratio = f"{a / b:.2f}x" if a and b else "-"
            print(f"  T={t:>6}   {a or 'OOM':>12}   {b or 'OOM':>12}   {ratio}")
        print(f"init seconds: ours {ours['init_seconds']:.2f}, transformers {theirs['init_seconds']:.2f}")
    save_results("model_forward", results, args.out)


if __name__ == "__main__":
    main()
