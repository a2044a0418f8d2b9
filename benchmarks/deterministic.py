"""What deterministic mode (``ossrl.deterministic()``, batch-invariant kernels) costs against the fast mode, on the
tiny model (4 layers, hidden 128, 8 experts top-2, random weights): rollout decode tokens/s at a few batch sizes, and
train tokens/s (the loss's packed forward + backward over sampled tokens, LoRA on attention). Also checks what the
mode is for: the largest |sampler - trainer| log-prob difference on the rollout (0 in deterministic mode).

    python -m benchmarks.deterministic                            # fp32 and bf16, batches 1 and 16, on this device
    python -m benchmarks.deterministic --dtypes float32 --batches 1 16 64 --new-tokens 64

Numbers from a 2-core CPU mean little for a GPU (where the fast mode runs Triton / cuBLAS kernels and deterministic
mode the same batch-invariant torch code as here).
"""

from __future__ import annotations

import argparse
import time

import torch

import ossrl
from benchmarks.common import environment, save_results, sync, time_it
from ossrl.model import GptOss
from ossrl.model.lora import LoraConfig, apply_lora
from ossrl.model.tiny import tiny_config
from ossrl.rollout import Engine, Request, SamplingParams
from ossrl.train.logprobs import packed_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny_model(dtype: torch.dtype, device: str) -> GptOss:
    model = GptOss.from_config(tiny_config(1263), device=device, dtype=dtype, seed=0)
    with torch.no_grad():  # the tests' sharper tiny model (routing and sampling far from uniform)
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(6)
    apply_lora(model, LoraConfig(r=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
               generator=torch.Generator(device=device).manual_seed(0))  # fmt: skip
    with torch.no_grad():  # B != 0: the adapters count in every forward
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model.eval()


def prompts(n: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(10, 1200, (length,), generator=gen).tolist() for _ in range(n)]


def decode(model: GptOss, batch: int, args) -> tuple[float, float]:
    """(decode tokens/s of a rollout: sampled tokens / wall time, prefill included, the median of ``--repeat``;
    max |sampler - trainer| over its sampled tokens)."""
    requests = [Request(p) for p in prompts(batch, args.prompt_len)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, stop_token_ids=[], seed=0)
    engine = Engine(model, None, kv_cache_tokens=batch * (args.prompt_len + args.new_tokens) + 64, max_num_seqs=batch)
    engine.rollout(requests[:1], SamplingParams(max_new_tokens=2, stop_token_ids=[]))  # warm-up, cache allocated
    times = []
    for _ in range(args.repeat):  # the median rollout: a shared machine's noise is large
        sync()
        start = time.perf_counter()
        out = engine.rollout(requests, sampling)
        sync()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    with torch.no_grad():
        lp, _ = packed_logprobs(model, out.tokens, out.cu_seqlens, out.loss_mask)
    gap = (lp - out.sampler_logprobs[out.loss_mask]).abs().max().item()
    return batch * args.new_tokens / seconds, gap


def train(model: GptOss, args) -> float:
    """Train tokens/s: one packed forward + backward of the sampled tokens' log-probs (what a micro-batch costs)."""
    seqs = prompts(args.train_seqs, args.prompt_len + args.new_tokens)
    tokens = torch.tensor([t for s in seqs for t in s], device=model.device)
    cu = torch.arange(0, tokens.numel() + 1, args.prompt_len + args.new_tokens, dtype=torch.int32, device=model.device)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for start in cu[:-1].tolist():
        mask[start + args.prompt_len : start + args.prompt_len + args.new_tokens] = True
    model.train()

    def step() -> None:
        lp, entropy = packed_logprobs(model, tokens, cu, mask)
        (lp.sum() + 0.01 * entropy.sum()).backward()
        model.zero_grad(set_to_none=True)

    seconds = time_it(step, warmup=1, repeat=args.repeat)
    model.eval()
    return tokens.numel() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--train-seqs", type=int, default=32, help="sequences of prompt + new tokens per train step")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    rows = []
    for dtype_name in args.dtypes:
        model = tiny_model(DTYPES[dtype_name], args.device)
        for mode in ("fast", "deterministic"):
            with ossrl.deterministic(mode == "deterministic"):
                row = {"dtype": dtype_name, "mode": mode, "train_tokens_per_s": train(model, args)}
                for b in args.batches:
                    row[f"decode_tokens_per_s_batch{b}"], row[f"max_logprob_gap_batch{b}"] = decode(model, b, args)
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    for fast, det in zip(rows[::2], rows[1::2], strict=True):
        for key in [k for k in fast if k.endswith("_per_s") or "_per_s_" in k]:
            det[f"{key}_vs_fast"] = det[key] / fast[key]
    print("deterministic / fast:")
    for det in rows[1::2]:
        print(det["dtype"], " ".join(f"{k.removesuffix('_vs_fast')}={v:.2f}x" for k, v in det.items()
                                     if k.endswith("_vs_fast")))  # fmt: skip
    save_results("deterministic", {"env": environment(), "settings": vars(args), "results": rows}, args.out)


if __name__ == "__main__":
    main()
