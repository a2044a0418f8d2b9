"""One MoE layer at decode batch sizes, gpt-oss-20b shapes (32 experts, top-4, hidden 2880), MXFP4 experts.

Rows:
- ``ours_default``: ``moe_experts`` as the engine runs it (``default_path``): on CUDA in bf16 the Triton grouped GEMM
  that dequantizes in registers, elsewhere the gathered path below at decode-sized batches;
- ``ours_gathered``: each (token, expert) pair gathers and dequantizes only its own expert's weights;
- ``ours_dequantize_all``: the same call forced onto the grouped path (every expert dequantized, then a grouped
  GEMM on CUDA or a loop over the hit experts elsewhere): what every decode step did before;
- ``hf_dense``: transformers' ``GptOssExperts`` on the dequantized dense weights (HF dequantizes MXFP4 at load
  without the ``kernels`` package): the peer, with 4x the weight memory.

    python -m benchmarks.moe_decode                    # batches 1 2 4 8 (4 to 32 pairs)
    python -m benchmarks.moe_decode --batches 1 --repeat 5
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from functools import partial
from unittest import mock

import torch

from benchmarks.common import environment, save_results, time_it
from ossrl.kernels import moe
from ossrl.model.config import GptOssConfig
from ossrl.model.mxfp4 import MXFP4Weight


def random_mxfp4(experts: int, fan_in: int, fan_out: int, device: str, gen: torch.Generator) -> MXFP4Weight:
    """Random W^T [E, in, out] quantized one expert at a time (quantizing all at once needs ~8 floats per value)."""
    parts = [MXFP4Weight.from_dense(torch.randn(1, fan_in, fan_out, device=device, generator=gen) * 0.02)
             for _ in range(experts)]  # fmt: skip
    return MXFP4Weight(torch.cat([p.blocks for p in parts]), torch.cat([p.scales for p in parts]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 matmuls are slow on CPU
    config = GptOssConfig()
    e, h, i, k = config.num_local_experts, config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    gen = torch.Generator(device=device).manual_seed(0)
    up, down = random_mxfp4(e, h, 2 * i, device, gen), random_mxfp4(e, i, h, device, gen)
    dense_up, dense_down = up.dequantize(dtype), down.dequantize(dtype)  # the peer computes the same network
    up_bias = torch.zeros(e, 2 * i, device=device, dtype=dtype)
    down_bias = torch.zeros(e, h, device=device, dtype=dtype)

    def ours(x, ids, weights):
        return moe.moe_experts(x, ids, weights, up, up_bias, down, down_bias)

    from transformers import GptOssConfig as HFConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    hf = GptOssExperts(HFConfig(**config.to_hf_dict())).to(device, dtype)
    with torch.no_grad():
        hf.gate_up_proj.copy_(dense_up)
        hf.down_proj.copy_(dense_down)
        hf.gate_up_proj_bias.zero_()
        hf.down_proj_bias.zero_()

    results: dict = {
        "env": environment(),
        "settings": {
            "experts": e,
            "top_k": k,
            "hidden": h,
            "intermediate": i,
            "dtype": str(dtype),
            "weights": "MXFP4 experts, random",
        },
    }
    all_path = "grouped" if moe._grouped_mm_works(torch.device(device), dtype) else "loop"
    for b in args.batches:
        x = torch.randn(b, h, device=device, dtype=dtype, generator=gen)
        ids = torch.stack([torch.randperm(e, device=device, generator=gen)[:k] for _ in range(b)])
        weights = torch.softmax(torch.randn(b, k, device=device, generator=gen), -1).to(dtype)
        kernel = moe._mxfp4_kernel(x, up, down)
        row: dict = {"pairs": b * k, "default_path": moe.expert_path(b * k, e, x.device, dtype, True, kernel)}
        outputs = {}
        with torch.inference_mode():
            for name, path in (("default", None), ("gathered", "gathered"), ("dequantize_all", all_path)):
                with mock.patch.object(moe, "expert_path", lambda *a, path=path, **kw: path) if path else nullcontext():
                    row[f"ours_{name}_ms"] = 1e3 * time_it(partial(ours, x, ids, weights), repeat=args.repeat)
                    outputs[name] = ours(x, ids, weights).float()
            row["hf_dense_ms"] = 1e3 * time_it(partial(hf, x, ids, weights), repeat=args.repeat)
            theirs = hf(x, ids, weights).float()
        for name in ("default", "gathered"):
            row[f"max_abs_diff_{name}_vs_dequantize_all"] = (
                (outputs[name] - outputs["dequantize_all"]).abs().max().item()
            )
            row[f"speedup_{name}_vs_dequantize_all"] = row["ours_dequantize_all_ms"] / row[f"ours_{name}_ms"]
        row["max_abs_diff_default_vs_hf"] = (outputs["default"] - theirs).abs().max().item()
        row["speedup_default_vs_hf_dense"] = row["hf_dense_ms"] / row["ours_default_ms"]
        results[str(b)] = row
        print(f"batch {b}: {row}", flush=True)
    save_results("moe_decode", results, args.out)


if __name__ == "__main__":
    main()
