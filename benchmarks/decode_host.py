"""Host-side cost of one fixed-buffer decode step (``ossrl.rollout.graphs.StaticDecodeStep``): planning the step and
filling its buffers (token ids, positions, seeds, slots, lengths, both page tables) for a batch of long sequences.
With CUDA graphs this is the work left on the CPU per decode step, and it is not overlapped with the GPU.

    python -m benchmarks.decode_host                          # 256 sequences of 3,000 tokens, 16-token pages
    python -m benchmarks.decode_host --batch 64 --tokens 8192
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import environment, save_results
from ossrl.model.config import GptOssConfig
from ossrl.rollout.graphs import StaticDecodeStep
from ossrl.rollout.kv_cache import PagedKVCache, plan_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=3000, help="longest sequence (sets the page-table width)")
    parser.add_argument("--cached", type=int, default=1000, help="tokens already cached when timing starts")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    # gpt-oss layer pattern (sliding, full) at a small width: the host work does not depend on the model's size
    config = GptOssConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], hidden_size=64,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16)  # fmt: skip
    b, page = args.batch, args.page_size
    cache = PagedKVCache(config, full_pages=b * (args.tokens // page + 1), sliding_pages=b * (config.sliding_window //
                         page + 3), page_size=page, device=torch.device("cpu"), dtype=torch.float32)  # fmt: skip
    seqs = [cache.admit(args.tokens, 1) for _ in range(b)]
    plan_step(cache, seqs, [args.cached] * b, fresh=True)
    for seq in seqs:
        seq.cached_len = args.cached
        cache.trim(seq)
    width = cache.pages_for(args.tokens, page)
    step = StaticDecodeStep(cache, b, width)
    start = time.perf_counter()
    for _ in range(args.steps):
        step.load(seqs, [1] * b, [0] * b, [s.cached_len for s in seqs])
        step.finish(seqs, [1] * b)
    ms = 1e3 * (time.perf_counter() - start) / args.steps
    results = {"env": environment(), "settings": vars(args) | {"page_table_width": width},
               "load_and_finish_ms_per_step": ms}  # fmt: skip
    print(f"batch {b}, {width} pages per row: {ms:.2f} ms per decode step on the host")
    save_results("decode_host", results, args.out)


if __name__ == "__main__":
    main()
