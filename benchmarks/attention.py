"""Attention with sinks at gpt-oss-20b heads (64 q, 8 kv, head dim 64, bf16): training fwd / bwd / fwd+bwd time and
peak memory, and decode tokens/s over a paged KV cache. GPU only.

    PYTHONPATH=. python benchmarks/attention.py                   # everything, ~5 minutes on an H100
    PYTHONPATH=. python benchmarks/attention.py --sweep           # first pick the fastest tile config at 16k
    PYTHONPATH=. python benchmarks/attention.py --seqlens 4096 16384 --skip-decode

Training, one sequence of T tokens, full causal and window 128:
  ours    sink_attention_triton (sinks, window, GQA; dsink included)
  sdpa    torch SDPA, flash backend: no sinks and no window (causal only), the speed reference
  flex    torch flex_attention (compiled) + LSE renormalization for the sink: out * sigmoid(lse - sink)
  eager   scores materialized, sink column appended, softmax (HF-style); until it runs out of memory
Decode, one new token per sequence, context C: ours over a paged cache (CUDA-graph replay) against SDPA on a
pre-gathered contiguous cache (gather not timed; no sinks). Ratios > 1 mean ours is faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import environment, save_results
from ossrl.kernels import attention_triton as attn
from ossrl.kernels import decode_triton
from ossrl.kernels.decode_triton import paged_decode_attention_triton

HQ, HKV, D, DTYPE = 64, 8, 64, torch.bfloat16
WINDOW = 128


def cuda_time_ms(fn: Callable[[], object], budget_ms: float = 400.0, max_iters: int = 50) -> float:
    """Median of CUDA-event timings; one warm-up call (compilation), then as many calls as fit in the budget."""
    fn()
    torch.cuda.synchronize()
    times = []
    while len(times) < 3 or (sum(times) < budget_ms and len(times) < max_iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def backward_time_ms(run: Callable[[], torch.Tensor], dout: torch.Tensor, clear: Callable[[], None]) -> float:
    """Median time of backward alone, each on a fresh (untimed) forward: compiled graphs may not retain theirs."""
    times: list[float] = []
    for i in range(50):
        clear()
        out = run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out.backward(dout)
        end.record()
        end.synchronize()
        if i:  # the first one compiles
            times.append(start.elapsed_time(end))
        if len(times) >= 3 and sum(times) > 400:
            break
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------------------ training


def make_ours(t: int, window: int | None):
    q = torch.randn(t, HQ, D, device="cuda", dtype=DTYPE, requires_grad=True)
    k = torch.randn(t, HKV, D, device="cuda", dtype=DTYPE, requires_grad=True)
    v = torch.randn(t, HKV, D, device="cuda", dtype=DTYPE, requires_grad=True)
    sinks = torch.randn(HQ, device="cuda", requires_grad=True)
    cu = torch.tensor([0, t], device="cuda", dtype=torch.int32)
    return (q, k, v, sinks), lambda: attn.sink_attention_triton(q, k, v, sinks, cu, t, window)


def make_sdpa(t: int, window: int | None):
    if window is not None:
        raise NotImplementedError("SDPA's flash kernel has no sliding window")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, HQ, t, D, device="cuda", dtype=DTYPE, requires_grad=True)
    k = torch.randn(1, HKV, t, D, device="cuda", dtype=DTYPE, requires_grad=True)
    v = torch.randn(1, HKV, t, D, device="cuda", dtype=DTYPE, requires_grad=True)

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        run()
    except RuntimeError:  # older flash backends: no GQA, so repeat K/V once outside the timed region
        kr = k.detach().repeat_interleave(HQ // HKV, 1).requires_grad_()
        vr = v.detach().repeat_interleave(HQ // HKV, 1).requires_grad_()
        k, v = kr, vr

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return (q, k, v), run


_FLEX = {}


def make_flex(t: int, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]

    def mask(b, h, q_idx, kv_idx):
        visible = q_idx >= kv_idx
        return visible & (q_idx - kv_idx < window) if window is not None else visible

    block_mask = create_block_mask(mask, None, None, t, t, device="cuda")
    q = torch.randn(1, HQ, t, D, device="cuda", dtype=DTYPE, requires_grad=True)
    k = torch.randn(1, HKV, t, D, device="cuda", dtype=DTYPE, requires_grad=True)
    v = torch.randn(1, HKV, t, D, device="cuda", dtype=DTYPE, requires_grad=True)
    sinks = torch.randn(HQ, device="cuda", requires_grad=True)

    def run():
        out, lse = flex(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)
        return out * torch.sigmoid(lse - sinks.view(1, HQ, 1)).unsqueeze(-1).to(out.dtype)

    return (q, k, v, sinks), run


def make_eager(t: int, window: int | None):
    q = torch.randn(1, HQ, t, D, device="cuda", dtype=DTYPE, requires_grad=True)
    k = torch.randn(1, HKV, t, D, device="cuda", dtype=DTYPE, requires_grad=True)
    v = torch.randn(1, HKV, t, D, device="cuda", dtype=DTYPE, requires_grad=True)
    sinks = torch.randn(HQ, device="cuda", requires_grad=True)
    i = torch.arange(t, device="cuda")
    visible = i.view(-1, 1) >= i.view(1, -1)
    if window is not None:
        visible &= i.view(-1, 1) - i.view(1, -1) < window

    def run():
        kr, vr = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        scores = (q @ kr.transpose(-1, -2)) * D**-0.5
        scores = scores.masked_fill(~visible, float("-inf"))
        sink = sinks.view(1, HQ, 1, 1).expand(1, HQ, t, 1).to(scores.dtype)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1).float(), dim=-1)[..., :-1].to(DTYPE)
        return probs @ vr

    return (q, k, v, sinks), run


IMPLS = {"ours": make_ours, "sdpa": make_sdpa, "flex": make_flex, "eager": make_eager}


def bench_training(impl: str, t: int, window: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {"impl": impl, "T": t, "window": window}
    torch.cuda.empty_cache()
    try:
        leaves, run = IMPLS[impl](t, window)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = run()
        dout = torch.randn_like(out)
        out.backward(dout)
        row["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        del out

        def clear():
            for x in leaves:
                x.grad = None

        with torch.no_grad():
            row["fwd_ms"] = cuda_time_ms(run)
        row["bwd_ms"] = backward_time_ms(run, dout, clear)

        def fwd_bwd():
            clear()
            run().backward(dout)

        row["fwd_bwd_ms"] = cuda_time_ms(fwd_bwd)
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as err:  # a baseline that cannot run this setting is reported, not fatal
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    torch.cuda.empty_cache()
    return row


def check_against_flex(t: int) -> dict[str, float]:
    """Sanity: ours and flex+LSE compute the same function (same inputs, window 128), forward and gradients."""
    (q, k, v, sinks), run_flex = make_flex(t, WINDOW)
    cu = torch.tensor([0, t], device="cuda", dtype=torch.int32)
    qo, ko, vo = (x.detach()[0].transpose(0, 1).contiguous().requires_grad_() for x in (q, k, v))
    so = sinks.detach().clone().requires_grad_()
    out_f = run_flex()
    out_o = attn.sink_attention_triton(qo, ko, vo, so, cu, t, WINDOW)
    dout = torch.randn_like(out_o)
    out_f.backward(dout.transpose(0, 1).unsqueeze(0))
    out_o.backward(dout)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    return {
        "out": rel(out_o, out_f[0].transpose(0, 1)),
        "dq": rel(qo.grad, q.grad[0].transpose(0, 1)),
        "dk": rel(ko.grad, k.grad[0].transpose(0, 1)),
        "dsink": rel(so.grad, sinks.grad),
    }


def sweep_configs(t: int = 16384) -> attn.AttnConfig:
    """Time a few tile configs for each kernel at T=t causal and return the fastest combination."""
    (q, k, v, sinks), _ = make_ours(t, None)
    q, k, v = q.detach(), k.detach(), v.detach()
    cu = torch.tensor([0, t], device="cuda", dtype=torch.int32)
    scale = D**-0.5
    base = attn.GPU_CONFIGS[D]
    out, lse = attn._forward(q, k, v, sinks, cu, t, None, scale, base)
    dout = torch.randn_like(out)
    fwd = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)]
    dkv = [(32, 64, 4, 3), (32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 3), (64, 128, 8, 4), (32, 128, 4, 3)]
    dq = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 8, 4)]

    def timed(cfg, fn):
        try:
            return cuda_time_ms(lambda: fn(cfg), budget_ms=150)
        except Exception as err:  # e.g. out of shared memory for this tile shape
            print(f"  {cfg}: {type(err).__name__}")
            return math.inf

    best = base
    for field, cands, fn in (
        ("fwd", fwd, lambda c: attn._forward(q, k, v, sinks, cu, t, None, scale, c)),
        ("dkv", dkv, lambda c: attn._backward(dout, q, k, v, sinks, cu, out, lse, t, None, scale, c)),
        ("dq", dq, lambda c: attn._backward(dout, q, k, v, sinks, cu, out, lse, t, None, scale, c)),
    ):
        results = []
        for m, n, w, s in cands:
            cfg = dataclasses.replace(
                best, **{f"{field}_m": m, f"{field}_n": n, f"{field}_warps": w, f"{field}_stages": s}
            )
            results.append((timed(cfg, fn), cfg))
            print(f"  sweep {field} {(m, n, w, s)}: {results[-1][0]:.3f} ms", flush=True)
        best = min(results, key=lambda r: r[0])[1]
    print(f"best config: {best}")
    # The chosen tiles must compute what the default ones do (catches a tile shape the tests never ran).
    out_best, lse_best = attn._forward(q, k, v, sinks, cu, t, None, scale, best)
    grads = attn._backward(dout, q, k, v, sinks, cu, out_best, lse_best, t, None, scale, best)
    grads_base = attn._backward(dout, q, k, v, sinks, cu, out, lse, t, None, scale, base)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dsink"), (out_best, *grads), (out, *grads_base), strict=True):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        print(f"  best vs default tiles, {name}: rel err {err:.1e}")
        if not err < 1e-2:
            print("  -> keeping the default tiles")
            return base
    return best


def sweep_decode(batch: int = 64, context: int = 32768) -> tuple[int, int, int]:
    """Time a few (key tile, warps, stages) settings of the decode kernel and return the fastest."""
    results = []
    for cfg in [(32, 4, 3), (64, 8, 2), (64, 8, 3), (32, 4, 4), (16, 4, 4)]:
        decode_triton.DECODE_CONFIG = cfg
        row = bench_decode(batch, context, None, impls=("ours",))
        results.append((row.get("ours_us", math.inf), cfg))
        print(f"  sweep decode {cfg}: {results[-1][0]} us", flush=True)
    best = min(results)[1]
    print(f"best decode config: {best}")
    return best


# ------------------------------------------------------------------------------------------------ decode


def bench_decode(
    batch: int, context: int, window: int | None, page_size: int = 16, impls: tuple[str, ...] = ("ours", "sdpa")
) -> dict[str, Any]:
    row: dict[str, Any] = {"batch": batch, "context": context, "window": window}
    pages = context // page_size
    k_cache = torch.randn(batch * pages, page_size, HKV, D, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    page_table = torch.randperm(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    cu_q = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
    sinks = torch.randn(HQ, device="cuda")
    ours = lambda: paged_decode_attention_triton(q, k_cache, v_cache, page_table, seq_lens, cu_q, 1, sinks, window)  # noqa: E731
    ours()  # validates the inputs once, eagerly
    # SDPA over a contiguous copy of the visible cache, gathered outside the timed region.
    visible = context if window is None else min(window, context)
    dense = []
    if "sdpa" in impls:
        ids = page_table.long()
        for cache in (k_cache, v_cache):
            dense.append(cache[ids].reshape(batch, context, HKV, D)[:, -visible:].transpose(1, 2).contiguous())
    q4 = q.view(batch, HQ, 1, D)
    sdpa = lambda: F.scaled_dot_product_attention(q4, *dense, enable_gqa=True)  # noqa: E731
    for name, fn in (("ours", ours), ("sdpa", sdpa)):
        if name not in impls:
            continue
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                fn()
            ms = cuda_time_ms(graph.replay, budget_ms=100, max_iters=200)
            row[f"{name}_us"] = round(ms * 1e3, 1)
            row[f"{name}_tok_s"] = round(batch / ms * 1e3)
        except Exception as err:
            row[f"{name}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    return row


# ------------------------------------------------------------------------------------------------ main


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_training_table(rows: list[dict[str, Any]]) -> None:
    by = {(r["impl"], r["T"], r["window"]): r for r in rows}
    print("\ntraining (ms; ratio = other / ours, >1: ours faster; mem = peak extra MiB for fwd+bwd)")
    head = f"{'mode':>8} {'T':>7} | {'ours fwd':>8} {'bwd':>8} {'f+b':>8} {'mem':>7} |"
    print(head + f" {'sdpa f+b':>8} {'x':>5} | {'flex f+b':>8} {'x':>5} | {'eager f+b':>9} {'x':>5} {'mem':>7}")
    for (impl, t, window), r in sorted(by.items(), key=lambda kv: (str(kv[0][2]), kv[0][1])):
        if impl != "ours":
            continue
        ours = r.get("fwd_bwd_ms")
        line = f"{'causal' if window is None else f'win{window}':>8} {t:>7} | {fmt(r.get('fwd_ms'), 3):>8} "
        line += f"{fmt(r.get('bwd_ms'), 3):>8} {fmt(ours, 3):>8} {fmt(r.get('peak_extra_mib'), 0):>7} |"
        for other, width in (("sdpa", 8), ("flex", 8), ("eager", 9)):
            o = by.get((other, t, window), {})
            val = o.get("fwd_bwd_ms")
            ratio = val / ours if val and ours else None
            shown = fmt(val, 3) if val else ("OOM" if o.get("error") == "OOM" else "-")
            line += f" {shown:>{width}} {fmt(ratio):>5}" + (" |" if other != "eager" else "")
        print(line + f" {fmt(by.get(('eager', t, window), {}).get('peak_extra_mib'), 0):>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--flex-seqlens", type=int, nargs="*", default=[4096, 16384], help="each is a compile")
    parser.add_argument("--eager-max", type=int, default=16384, help="skip eager above this T")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--max-decode-tokens", type=int, default=64 * 32768, help="skip larger batch x context")
    parser.add_argument("--sweep", action="store_true", help="time tile configs at 16k first and use the fastest")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop starting new measurements after this")
    parser.add_argument("--out-dir", default="bench_results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU")
    start = time.time()
    results: dict[str, Any] = {
        "env": environment(),
        "settings": dict(vars(args), hq=HQ, hkv=HKV, d=D, dtype=str(DTYPE)),
    }
    if args.sweep:
        attn.GPU_CONFIGS[D] = sweep_configs()
        decode_triton.DECODE_CONFIG = sweep_decode()
    results["config"] = dataclasses.asdict(attn.GPU_CONFIGS[D])
    results["decode_config"] = decode_triton.DECODE_CONFIG

    decode: list[dict[str, Any]] = []
    if not args.skip_decode:
        for context in args.contexts:
            for window in (None, WINDOW):
                for batch in args.batches:
                    if time.time() - start > args.budget_s or batch * context > args.max_decode_tokens:
                        continue
                    decode.append(bench_decode(batch, context, window))
        results["decode"] = decode
        print("\ndecode, 1 new token/sequence (us per layer call; tok/s; ratio = sdpa time / ours, >1: ours faster)")
        cols = f"{'ours us':>9} {'tok/s':>10} | {'sdpa us':>9} {'tok/s':>10} | x"
        print(f"{'context':>8} {'window':>6} {'batch':>5} | {cols}")
        for r in decode:
            ratio = r["sdpa_us"] / r["ours_us"] if "ours_us" in r and "sdpa_us" in r else None
            print(f"{r['context']:>8} {str(r['window']):>6} {r['batch']:>5} | {fmt(r.get('ours_us'), 1):>9} "
                  f"{r.get('ours_tok_s', '-'):>10} | {fmt(r.get('sdpa_us'), 1):>9} {r.get('sdpa_tok_s', '-'):>10} | "
                  f"{fmt(ratio)}")  # fmt: skip
        save_results("attention", results, args.out_dir)  # again at the end; this keeps decode if training dies
    training: list[dict[str, Any]] = []
    if not args.skip_training:
        if args.flex_seqlens:
            results["check_vs_flex"] = check_against_flex(args.flex_seqlens[-1])
            print("ours vs flex+LSE (relative L2):", results["check_vs_flex"])
        for t in args.seqlens:  # in the order given: put the sizes that matter most first
            for window in (None, WINDOW):
                for impl in IMPLS:
                    if time.time() - start > args.budget_s:
                        continue
                    if (impl == "flex" and t not in args.flex_seqlens) or (impl == "eager" and t > args.eager_max):
                        continue
                    if impl == "sdpa" and window is not None:
                        continue
                    training.append(bench_training(impl, t, window))
                    print(training[-1], flush=True)
        results["training"] = training
        print_training_table(training)

    results["seconds"] = round(time.time() - start, 1)
    save_results("attention", results, args.out_dir)


if __name__ == "__main__":
    main()
