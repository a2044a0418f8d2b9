"""Sink-aware Ulysses sequence parallelism (DeepSpeed-Ulysses), applied to a GptOss from outside the model.

The sp ranks of one group hold the same micro-batch; each runs the model on a contiguous shard of its packed tokens
(``shard_batch``: T padded to a multiple of sp, the padding one extra sequence of its own that nothing reads). All
per-token work (embeddings, projections, RoPE, MoE, norms, lm_head) runs on the local shard. Around attention, one
all-to-all turns sequence shards into head shards: rank r then holds EVERY token for q heads [r*Hq/sp, (r+1)*Hq/sp)
and their kv heads [r*Hkv/sp, (r+1)*Hkv/sp), attends over the global ``cu_seqlens`` with its slice of the sinks, and
a second all-to-all turns the result back into its sequence shard before ``o_proj``. Attention sees whole sequences,
so sliding-window layers are exact across shard borders, and each sink's gradient is computed on the rank that owns
its head.

Gradients: each rank back-propagates from its own tokens, so every parameter's gradient on a rank is a partial sum;
``sp_all_reduce_grads`` sums them over the group (sinks included: zero outside the rank's heads before the sum).
``gather_sequence`` brings per-token values (log-probs) back to the whole micro-batch on every rank; its backward
keeps only this rank's slice, because every sp rank computes the same loss from the gathered values (a
reduce-scatter there would count the gradient sp times).

Heads: sp must divide both the q and the kv head counts (gpt-oss: 64 and 8, so sp in 1, 2, 4, 8). Replicating kv
heads for a larger sp would also need their gradients summed across the ranks sharing them; we refuse instead.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ossrl.dist.fsdp import local
from ossrl.dist.mesh import check_heads
from ossrl.kernels import sink_attention
from ossrl.model.gpt_oss import Attention, GptOss, PackedBatch, apply_rotary, pack_batch


@dataclass
class SequenceShard:
    """One sp rank's contiguous slice [start, stop) of a packed batch padded to ``size`` equal shards, with the
    global layout attention needs. Padding (positions ``total`` .. end) is one extra sequence at the end."""

    input_ids: torch.Tensor  # [T_local] this rank's tokens
    position_ids: torch.Tensor  # [T_local] their positions in their sequences
    cu_seqlens: torch.Tensor  # global, int32, padding included as a last sequence
    max_seqlen: int  # global
    start: int
    stop: int
    total: int  # real tokens (before padding)
    rank: int
    size: int

    @property
    def padded(self) -> int:
        return (self.stop - self.start) * self.size

    def local(self, values: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
        """Per-token values [T, ...] of the whole batch -> this rank's [T_local, ...] (padding rows = ``fill``)."""
        if values.shape[0] != self.total:
            raise ValueError(f"per-token values have {values.shape[0]} rows; the batch has {self.total} tokens")
        pad = self.padded - self.total
        if pad:
            values = torch.cat([values, values.new_full((pad, *values.shape[1:]), fill)])
        return values[self.start : self.stop]

    def bounds(self, rank: int) -> tuple[int, int]:
        """[start, stop) of ``rank``'s shard in the padded batch."""
        n = self.stop - self.start
        return rank * n, (rank + 1) * n


def shard_batch(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    rank: int,
    size: int,
    position_ids: torch.Tensor | None = None,
) -> SequenceShard:
    """A packed batch (flat ``input_ids`` [T], ``cu_seqlens``, optional ``position_ids``) -> rank ``rank``'s shard of
    ``size``. T is padded up to a multiple of ``size`` with token 0 at positions 0, 1, ...: a sequence of its own, so
    no real token attends to it; callers leave it out of every loss."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"shard_batch: rank {rank} is not in a group of {size}")
    if input_ids.dim() != 1:
        raise ValueError(f"shard_batch takes a packed [T] batch; got input_ids {tuple(input_ids.shape)}")
    batch = pack_batch(input_ids, cu_seqlens=cu_seqlens, position_ids=position_ids)  # validates cu_seqlens
    total = batch.input_ids.shape[0]
    n = -(-total // size) if total else 0
    pad = n * size - total
    ids, positions, cu = batch.input_ids, batch.position_ids, batch.cu_seqlens
    if pad:
        ids = torch.cat([ids, ids.new_zeros(pad)])
        positions = torch.cat([positions, torch.arange(pad, device=positions.device, dtype=positions.dtype)])
        cu = torch.cat([cu, cu.new_tensor([total + pad])])
    start, stop = rank * n, (rank + 1) * n
    return SequenceShard(ids[start:stop], positions[start:stop], cu, max(batch.max_seqlen, pad), start, stop, total,
                         rank, size)  # fmt: skip


@dataclass
class UlyssesBatch(PackedBatch):
    """A PackedBatch of one rank's shard: local ``input_ids`` / ``position_ids`` / ``routes``, global ``cu_seqlens``
    and ``max_seqlen``. Only this batch type sends attention through the all-to-alls."""

    shard: SequenceShard | None = None


class _AllToAll(torch.autograd.Function):
    """x [sp, ...]: chunk s goes to rank s; the result's chunk s came from rank s. Its own adjoint."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class UlyssesAttention(Attention):
    """Attention whose forward on a ``UlyssesBatch`` runs over head shards of the whole sequence (module docstring);
    any other batch (the rollout engine's KV cache, a plain forward) takes ``Attention.forward`` unchanged."""

    sp_group: Any
    sp_rank: int
    sp_size: int

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: PackedBatch) -> torch.Tensor:
        if not isinstance(batch, UlyssesBatch) or batch.kv_cache is not None:
            return super().forward(x, rope, batch)
        t, sp, d = x.shape[0], self.sp_size, self.head_dim
        hq, hkv = self.num_heads // sp, self.num_kv_heads // sp
        q = self.q_proj(x).view(t, self.num_heads, d)
        k = self.k_proj(x).view(t, self.num_kv_heads, d)
        v = self.v_proj(x).view(t, self.num_kv_heads, d)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # sequence shards -> head shards, q, k and v in one all-to-all: [sp (destination), t, heads of that rank, d]
        qkv = torch.cat([q.view(t, sp, hq, d), k.view(t, sp, hkv, d), v.view(t, sp, hkv, d)], dim=2)
        qkv = _AllToAll.apply(qkv.transpose(0, 1), self.sp_group).reshape(sp * t, hq + 2 * hkv, d)  # source order
        q, k, v = (part.contiguous() for part in qkv.split([hq, hkv, hkv], dim=1))
        sinks = self.sinks[self.sp_rank * hq : (self.sp_rank + 1) * hq]
        out = sink_attention(q, k, v, sinks, batch.cu_seqlens, batch.max_seqlen, window=self.window)
        out = _AllToAll.apply(out.view(sp, t, hq, d), self.sp_group)  # back: [sp (head group), t, hq, d]
        return self.o_proj(out.transpose(0, 1).reshape(t, -1))


def _hidden_states(
    self: GptOss,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    routes: torch.Tensor | None = None,
    route_log: list[torch.Tensor | None] | None = None,
    shard: SequenceShard | None = None,
) -> torch.Tensor:
    """``GptOss.hidden_states``, plus ``shard=``: the final hidden states [T_local, H] of this rank's shard (pass
    ``shard.input_ids``; ``routes`` local [T_local, layers, k]). Installed on the instance so FSDP's registered
    ``hidden_states`` forward method (its root all-gather) wraps it."""
    if shard is None:
        return GptOss.hidden_states(self, input_ids, attention_mask, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                    routes=routes, route_log=route_log)  # fmt: skip
    if input_ids.shape != shard.input_ids.shape:
        raise ValueError(f"hidden_states(shard=...): input_ids {tuple(input_ids.shape)} are not the shard's "
                         f"{tuple(shard.input_ids.shape)}")  # fmt: skip
    if routes is not None and routes.shape[0] != input_ids.shape[0]:
        raise ValueError(f"routes must be the shard's [T_local={input_ids.shape[0]}, layers, k]; got "
                         f"{tuple(routes.shape)}")  # fmt: skip
    batch = UlyssesBatch(input_ids, shard.cu_seqlens, shard.max_seqlen, shard.position_ids, routes=routes,
                         route_log=route_log, shard=shard)  # fmt: skip
    return self.forward_packed(batch)


def apply_ulysses(model: GptOss, group: Any) -> GptOss:
    """Make every attention layer of ``model`` sequence-parallel over ``group`` (in place; returns the model).

    Call it before FSDP (``apply_fsdp``) and after making the rollout engine's plain copy: the engine's model keeps
    plain attention. Parameters stay whole on every rank. After it, ``ossrl.train.logprobs.packed_logprobs`` shards
    each micro-batch over the group; after every backward, call ``sp_all_reduce_grads`` before clipping."""
    if not isinstance(model, GptOss):
        raise TypeError(f"apply_ulysses takes a GptOss; got {type(model).__name__}")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    check_heads(size, model.config)
    for module in model.modules():
        if isinstance(module, Attention):
            module.__class__ = UlyssesAttention
            module.sp_group, module.sp_rank, module.sp_size = group, rank, size
    model.sp_group = group
    model.hidden_states = types.MethodType(_hidden_states, model)
    return model


def sp_group_of(model: nn.Module) -> Any:
    """The sp group ``apply_ulysses`` gave ``model`` (None: not sequence-parallel)."""
    return getattr(model, "sp_group", None)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, sizes: list[int], rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.start, ctx.count = sum(sizes[:rank]), sizes[rank]
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        return grad[ctx.start : ctx.start + ctx.count].contiguous(), None, None, None


def gather_sequence(values: torch.Tensor, group: Any, sizes: list[int] | None = None) -> torch.Tensor:
    """Every rank's per-token ``values`` [n_r, ...] concatenated in rank order, on every rank (``sizes``: each rank's
    n_r, known to all; default: all equal). Autograd: the backward returns this rank's slice of the gradient, the
    rule for a loss every sp rank computes identically from the result (then ``sp_all_reduce_grads``)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [values.shape[0]] * size if sizes is None else list(sizes)
    if len(sizes) != size or sizes[rank] != values.shape[0]:
        raise ValueError(f"gather_sequence: sizes {sizes} do not fit {size} ranks with {values.shape[0]} rows here")
    return _GatherSequence.apply(values, group, sizes, rank)


@torch.no_grad()
def sp_all_reduce_grads(model: nn.Module | list[torch.Tensor], group: Any, bucket_numel: int = 2**26) -> None:
    """Sum the gradients of ``model``'s parameters (or a list of parameters) over the sp ``group``: each rank's are
    the part its tokens contributed. FSDP-sharded (DTensor) gradients are reduced shard by shard (the sp ranks of one
    dp rank hold the same shards). A parameter with a gradient on some rank only gets zeros elsewhere first, so every
    rank joins the same collectives. Every rank of the group calls it, after the backward, before clipping."""
    if dist.get_world_size(group) == 1:
        return
    params = [p for p in (model.parameters() if isinstance(model, nn.Module) else model) if p.requires_grad]
    if not params:
        return
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
    grads: list[torch.Tensor] = []
    for p, has in zip(params, present.tolist(), strict=True):
        if has and p.grad is None:
            p.grad = torch.zeros_like(p)
        if has:
            grads.append(local(p.grad))
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for same in by_dtype.values():
        bucket: list[torch.Tensor] = []
        numel = 0
        for g in [*same, None]:
            if g is not None and (not bucket or numel + g.numel() <= bucket_numel):
                bucket.append(g)
                numel += g.numel()
                continue
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat, group=group)
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket]), strict=True):
                b.copy_(part.view_as(b))
            bucket, numel = ([g], g.numel()) if g is not None else ([], 0)
