"""MXFP4 experts through training: the input-gradient GEMM (dX = dY @ W_e) and a LoRA step of one MoE layer.

gpt-oss-20b shapes by default (32 experts, top-4, hidden 2880, intermediate 2880), random MXFP4 weights, bf16.

Per GEMM (gate_up: 2880 -> 5760, down: 2880 -> 2880) and token count, the forward and the dX of:
- ``kernel``: the Triton kernels of ``kernels/mxfp4_triton`` (dequantize in registers; what training runs on CUDA);
- ``dequant_grouped``: dequantize the whole layer to bf16, then one ``torch._grouped_mm`` (the alternative: faster
  for large row counts, but a layer's dense copy, transient here, and kept by autograd if the forward did this);
- ``reference``: one expert dequantized at a time (the CPU fallback; only up to ``--reference-max-tokens``).
Each with its median time, the peak CUDA memory it adds, and its relative error against ``dequant_grouped``.

Then ``moe_experts`` with LoRA (r=4) on both expert GEMMs, forward + backward: ``packed`` (as now: the packed op,
nothing dequantized kept) vs ``dequantize_all`` (the old path, forced: the layer dequantized and kept for the
backward), time and peak memory.

    python -m benchmarks.mxfp4_backward                       # on a GPU: 20b shapes, tokens 512 2048 8192
    TRITON_INTERPRET=1 python -m benchmarks.mxfp4_backward --small   # CPU smoke run (tiny shapes, interpreter)
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from functools import partial
from unittest import mock

import torch

from benchmarks.common import environment, peak_memory_gib, reset_peak, save_results, sync, time_it
from ossrl.kernels import moe, mxfp4_ref
from ossrl.kernels.common import triton_interpreting
from ossrl.kernels.mxfp4_format import dequantize_mxfp4
from ossrl.model.config import GptOssConfig
from ossrl.model.mxfp4 import MXFP4Weight


def random_packed(e: int, n: int, k: int, device: str, gen: torch.Generator) -> MXFP4Weight:
    """Random MXFP4 W [E, N, K] (codes uniform, scales around 2**-7: |W| ~ 0.02)."""
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), device=device, dtype=torch.uint8, generator=gen)
    scales = torch.randint(119, 123, (e, n, k // 32), device=device, dtype=torch.uint8, generator=gen)
    return MXFP4Weight(blocks, scales)


def dequant_grouped(x: torch.Tensor, w: MXFP4Weight, counts: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The whole layer dequantized, then one grouped GEMM: x @ W_e^T (forward) or x @ W_e (dX)."""
    dense = dequantize_mxfp4(w.blocks, w.scales, x.dtype)  # [E, N, K]
    return moe.grouped_matmul(x, dense.transpose(1, 2) if transpose else dense, counts)


def measure(fn, repeat: int) -> tuple[float, float | None, torch.Tensor]:
    """(median ms, peak GiB above what was allocated before, the result)."""
    sync()
    reset_peak()
    base = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    out = fn()
    peak = peak_memory_gib()
    ms = 1e3 * time_it(fn, repeat=repeat)
    return ms, (None if base is None else round(peak - base, 3)), out


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def gemm_rows(args, device: str, dtype: torch.dtype, shapes: dict, gen: torch.Generator) -> dict:
    e, h, i, k = shapes["experts"], shapes["hidden"], shapes["intermediate"], shapes["top_k"]
    kernel = mxfp4_ref.mxfp4_kernel_works(torch.device(device), dtype) or triton_interpreting()
    results = {}
    for name, (n, fan_in) in {"gate_up": (2 * i, h), "down": (h, i)}.items():
        w = random_packed(e, n, fan_in, device, gen)
        for tokens in args.tokens:
            ids = torch.randint(0, e, (tokens * k,), device=device, generator=gen)
            counts = torch.bincount(ids, minlength=e)
            x = torch.randn(tokens * k, fan_in, device=device, dtype=dtype, generator=gen)
            dy = torch.randn(tokens * k, n, device=device, dtype=dtype, generator=gen)
            row: dict = {"rows": tokens * k}
            ways = {"dequant_grouped": (partial(dequant_grouped, x, w, counts, True),
                                        partial(dequant_grouped, dy, w, counts, False))}  # fmt: skip
            if kernel:
                ways["kernel"] = (partial(mxfp4_ref._triton_op, x, w.blocks, w.scales, counts),
                                  partial(mxfp4_ref._triton_dx_op, dy, w.blocks, w.scales, counts))  # fmt: skip
            if tokens <= args.reference_max_tokens:
                packed = (w.blocks, w.scales, counts)
                ways["reference"] = (partial(mxfp4_ref.mxfp4_grouped_matmul_ref, x, *packed),
                                     partial(mxfp4_ref.mxfp4_grouped_matmul_dx_ref, dy, *packed))  # fmt: skip
            outs = {}
            for way, (forward, dx) in ways.items():
                for direction, fn in (("forward", forward), ("dx", dx)):
                    ms, gib, out = measure(fn, args.repeat)
                    row[f"{way}_{direction}_ms"], row[f"{way}_{direction}_peak_gib"] = round(ms, 3), gib
                    outs[way, direction] = out
            for way in ways:
                for direction in ("forward", "dx"):
                    want = outs["dequant_grouped", direction]
                    row[f"{way}_{direction}_rel_error"] = rel_error(outs[way, direction], want)
            if kernel:
                speedup = row["dequant_grouped_dx_ms"] / row["kernel_dx_ms"]
                row["kernel_dx_speedup_vs_dequant_grouped"] = round(speedup, 3)
            results[f"{name}_{tokens}"] = row
            print(f"{name} tokens={tokens}: {row}", flush=True)
    return results


def _old_grouped(xs, w, counts, counts_list, path):
    """The path before MXFP4 training: the whole layer dequantized (autograd keeps it for the backward)."""
    return moe.grouped_matmul(xs, moe._weight(w, None, xs.dtype), counts, counts_list)


def lora_step_rows(args, device: str, dtype: torch.dtype, shapes: dict, gen: torch.Generator) -> dict:
    e, h, i, k = shapes["experts"], shapes["hidden"], shapes["intermediate"], shapes["top_k"]
    up, down = random_packed(e, 2 * i, h, device, gen), random_packed(e, h, i, device, gen)
    b1 = torch.zeros(e, 2 * i, device=device, dtype=dtype)
    b2 = torch.zeros(e, h, device=device, dtype=dtype)
    lora_up = (torch.randn(e, h, 4, device=device, generator=gen).mul_(0.01).requires_grad_(),
               torch.randn(e, 4, 2 * i, device=device, generator=gen).mul_(0.01).requires_grad_(), 2.0)  # fmt: skip
    lora_down = (torch.randn(e, i, 4, device=device, generator=gen).mul_(0.01).requires_grad_(),
                 torch.randn(e, 4, h, device=device, generator=gen).mul_(0.01).requires_grad_(), 2.0)  # fmt: skip
    results = {}
    for tokens in args.tokens:
        x = torch.randn(tokens, h, device=device, dtype=dtype, generator=gen).requires_grad_()
        ids = torch.stack([torch.randperm(e, device=device, generator=gen)[:k] for _ in range(tokens)])
        gates = torch.softmax(torch.randn(tokens, k, device=device, generator=gen), -1).to(dtype)

        def step(x=x, ids=ids, gates=gates):
            out = moe.moe_experts(x, ids, gates, up, b1, down, b2, gate_up_lora=lora_up, down_lora=lora_down)
            return torch.autograd.grad(out.float().square().mean(), [x, *lora_up[:2], *lora_down[:2]])

        row: dict = {"tokens": tokens}
        grads = {}
        for name, patch in (("packed", None), ("dequantize_all", _old_grouped)):
            with mock.patch.object(moe, "_grouped", patch) if patch else nullcontext():
                ms, gib, grads[name] = measure(step, args.repeat)
            row[f"{name}_ms"], row[f"{name}_peak_gib"] = round(ms, 3), gib
        pairs = zip(grads["packed"], grads["dequantize_all"], strict=True)
        row["max_grad_rel_error"] = max(rel_error(a, b) for a, b in pairs)
        results[f"lora_step_{tokens}"] = row
        print(f"LoRA step tokens={tokens}: {row}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens per layer (x top-k rows)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--reference-max-tokens", type=int, default=512)
    parser.add_argument("--small", action="store_true", help="tiny shapes: a CPU smoke run")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 matmuls are slow on CPU
    config = GptOssConfig()
    shapes = {"experts": config.num_local_experts, "top_k": config.num_experts_per_tok,
              "hidden": config.hidden_size, "intermediate": config.intermediate_size}  # fmt: skip
    if args.small:
        shapes = {"experts": 4, "top_k": 2, "hidden": 64, "intermediate": 96}
    if args.tokens is None:
        args.tokens = [16, 64] if args.small else [512, 2048, 8192]
    gen = torch.Generator(device=device).manual_seed(0)
    results: dict = {"env": environment(), "settings": {**shapes, "dtype": str(dtype), "weights": "MXFP4, random"}}
    results |= gemm_rows(args, device, dtype, shapes, gen)
    results |= lora_step_rows(args, device, dtype, shapes, gen)
    save_results("mxfp4_backward" + ("_small" if args.small else ""), results, args.out)


if __name__ == "__main__":
    main()
