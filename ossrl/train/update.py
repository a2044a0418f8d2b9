"""One policy update on a rollout: micro-batches of whole sequences -> packed forward -> the configured loss ->
backward with gradient accumulation; and the metrics of that update, reduced across micro-batches so that they
do not depend on how the batch was cut.

Everything stays on the packed layout of ``ossrl.rollout.batch.RolloutBatch``: log-probs are computed only for the
sampled tokens ([M], with ``seq_index``), and the ``ossrl.rl`` functions take that layout directly.

Router replay (``algorithm.router_replay``): the engine records, for every position it fed, the experts each MoE layer
chose (``token_fields["routes"]``); the training forwards (loss, old and reference log-probs) then use those experts
with gates recomputed from the current router logits. Whether or not it replays, the first update reports
``router/route_mismatch_frac``: the fraction of (fed position, layer) pairs whose router, in the training forward,
chose another set of experts than the engine's.

Importance sampling against the sampler: the weights compare the sampler's log-probs with those of the policy
that sampled (the trainer's log-probs *before* this batch's first update). With ``updates_per_batch=1`` that is
the current forward, detached; with more updates it is a no-grad pass taken before the first one (``old``), so
later updates keep comparing the sampler with the policy that sampled, not with the updated policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ossrl import rl
from ossrl.config import AlgorithmSettings
from ossrl.model.lora import disabled_lora
from ossrl.rollout.batch import RolloutBatch
from ossrl.train.logprobs import packed_logprobs

# How each metric is combined across micro-batches. "sum": the micro-batch values are shares of one total (the
# losses are already divided by the whole batch's normalizer). ("mean", WEIGHT): a mean over the micro-batch's
# tokens or sequences, combined weighted by their count ("tokens"/"seqs": those left in the loss after sequence
# masking; "sampled_tokens"/"sampled_seqs": every sampled token / sequence with one). "max": the largest.
SUM, MAX = ("sum",), ("max",)
TOKENS, SEQS = ("mean", "tokens"), ("mean", "seqs")
SAMPLED_TOKENS, SAMPLED_SEQS = ("mean", "sampled_tokens"), ("mean", "sampled_seqs")
METRIC_REDUCTIONS: dict[str, tuple[str, ...]] = {
    "loss": SUM,
    "policy_loss": SUM,
    "kl": SUM,
    "entropy": TOKENS,
    "clip_frac_low": TOKENS,  # GSPO's clip and ratio metrics are over sequences: see reduction_of
    "clip_frac_high": TOKENS,
    "dual_clip_frac": TOKENS,
    "ratio_mean": TOKENS,
    "ratio_max": MAX,
    "approx_kl": TOKENS,
    "mismatch/mean_abs_diff": SAMPLED_TOKENS,
    "mismatch/max_abs_diff": MAX,
    "mismatch/log_ppl_trainer": SAMPLED_SEQS,
    "mismatch/log_ppl_sampler": SAMPLED_SEQS,
    "mismatch/log_ppl_gap": SAMPLED_SEQS,
    "mismatch/kl_k3": SAMPLED_TOKENS,
    "mismatch/tis_capped_frac": SAMPLED_TOKENS,
    "mismatch/seq_masked_frac": SAMPLED_SEQS,
    "router/route_mismatch_frac": ("mean", "routed"),  # over (fed position, layer) pairs with recorded routes
}
GSPO_SEQUENCE_METRICS = ("clip_frac_low", "clip_frac_high", "ratio_mean")


def reduction_of(name: str, loss: str) -> tuple[str, ...]:
    if loss == "gspo" and name in GSPO_SEQUENCE_METRICS:
        return SEQS
    if name not in METRIC_REDUCTIONS:
        raise KeyError(f"metric {name!r} has no declared reduction (ossrl.train.update.METRIC_REDUCTIONS)")
    return METRIC_REDUCTIONS[name]


class MetricReducer:
    """Accumulates per-micro-batch metrics by their declared reduction."""

    def __init__(self, loss: str) -> None:
        self.loss = loss
        self.totals: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, name: str, value: float, counts: dict[str, float]) -> None:
        kind = reduction_of(name, self.loss)
        if kind == SUM:
            self.totals[name] = self.totals.get(name, 0.0) + value
        elif kind == MAX:
            self.totals[name] = max(self.totals.get(name, float("-inf")), value)
        else:
            weight = counts[kind[1]]
            self.totals[name] = self.totals.get(name, 0.0) + value * weight
            self.weights[name] = self.weights.get(name, 0.0) + weight

    def merge_across(self, group=None) -> None:
        """Combine every data-parallel rank's totals in place, by the same declared reductions (sums and weighted
        sums add, maxima take the max), so ``result()`` is what one process reducing all micro-batches gives. A
        metric some rank never saw (no routes there, say) is combined over the ranks that have it."""
        import torch.distributed as dist

        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, (self.totals, self.weights), group=group)
        totals: dict[str, float] = {}
        weights: dict[str, float] = {}
        for rank_totals, rank_weights in parts:
            for name, value in rank_totals.items():
                if reduction_of(name, self.loss) == MAX:
                    totals[name] = max(totals.get(name, float("-inf")), value)
                else:
                    totals[name] = totals.get(name, 0.0) + value
            for name, value in rank_weights.items():
                weights[name] = weights.get(name, 0.0) + value
        self.totals, self.weights = totals, weights

    def result(self) -> dict[str, float]:
        out = {}
        for name, total in self.totals.items():
            if name in self.weights:
                out[name] = total / self.weights[name] if self.weights[name] > 0 else 0.0
            else:
                out[name] = total
        return out


def normalizer(batch: RolloutBatch, agg: str) -> float:
    """The whole batch's count that every micro-batch's loss is divided by (so the parts sum to the whole):
    sampled tokens (token-mean), sequences with a sampled token (seq-mean-token-mean) or sequences."""
    sampled = batch.sampled_lens
    if agg == "token-mean":
        return float(sampled.sum())
    if agg == "seq-mean-token-mean":
        return float((sampled > 0).sum())
    return float(batch.num_seqs)


@dataclass
class MicroBatch:
    """A micro-batch of whole sequences and what the loss needs besides the model: advantages [B], and, filled
    on first use, the log-probs of the policy that sampled (``old``) and of the reference (``ref``), both [M]."""

    batch: RolloutBatch
    advantages: torch.Tensor
    old: torch.Tensor | None = None
    ref: torch.Tensor | None = None

    def sampled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sampler log-probs [M], seq_index [M]) of the sampled tokens, in the order the forward returns them."""
        b = self.batch
        return b.sampler_logprobs[b.loss_mask], b.seq_index[b.loss_mask]


def forward_logprobs(
    model, mb: MicroBatch, temperature: float, *, replay: bool = False, route_log: list | None = None,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Log-probs and entropies [M] of the micro-batch's sampled tokens. ``replay``: with the experts the engine
    recorded (when the batch has them); ``route_log`` receives the router's own choices, per layer.
    ``entropy_grad``: the entropies carry a gradient (an entropy bonus); else they are a metric (less memory)."""
    b = mb.batch
    routes = b.token_fields.get("routes") if replay else None
    return packed_logprobs(model, b.tokens, b.cu_seqlens, b.loss_mask, temperature=temperature, routes=routes,
                           route_log=route_log, entropy_grad=entropy_grad)  # fmt: skip


def route_mismatch(route_log: list[torch.Tensor], recorded: torch.Tensor) -> tuple[float, float]:
    """(fraction of the (position, layer) pairs with recorded routes whose expert SET the forward's router chose
    differently, number of such pairs)."""
    chosen = torch.stack(route_log, 1).sort(-1).values
    recorded = recorded.long()
    fed = (recorded >= 0).all(-1)
    differ = (chosen != recorded.sort(-1).values).any(-1) & fed
    count = float(fed.sum())
    return float(differ.sum()) / max(count, 1.0), count


@torch.no_grad()
def fill_old_logprobs(model, micro: list[MicroBatch], temperature: float, replay: bool = False) -> None:
    """The log-probs of the policy that sampled, before any update (needed when updates_per_batch > 1)."""
    for mb in micro:
        mb.old, _ = forward_logprobs(model, mb, temperature, replay=replay)


def micro_batch_loss(
    model, mb: MicroBatch, algo: AlgorithmSettings, *, temperature: float, max_len: int, norm: float, first: bool
) -> dict[str, tuple[float, dict[str, float]]]:
    """Forward + backward of one micro-batch. Returns metric -> (value, counts for its reduction). ``first``: the
    batch's first update (the sampler/trainer mismatch and the route mismatch are reported there)."""
    recorded = mb.batch.token_fields.get("routes")
    route_log = [None] * recorded.shape[1] if first and recorded is not None and recorded.numel() else None
    lp, entropy = forward_logprobs(
        model, mb, temperature, replay=algo.router_replay, route_log=route_log, entropy_grad=algo.entropy_coef > 0
    )
    if lp.numel() == 0:  # nothing sampled here (the trainer drops such sequences): no loss, no gradient
        return {}
    sampler, seq_index = mb.sampled()
    layout = {"seq_index": seq_index, "num_seqs": mb.batch.num_seqs}
    behaviour = lp.detach() if mb.old is None else mb.old  # the policy that sampled, as the trainer computes it
    mask = torch.ones_like(lp, dtype=torch.bool)
    sampled_counts = {"sampled_tokens": float(lp.numel()), "sampled_seqs": float(seq_index.unique().numel())}
    out: dict[str, tuple[float, dict[str, float]]] = {}
    is_weights, keep = None, None
    if algo.tis_cap is not None:
        is_weights = rl.truncated_is_weights(behaviour, sampler, mask, cap=algo.tis_cap, seq_index=seq_index)
    if algo.seq_mask_hi is not None:
        keep, _ = rl.sequence_is_mask(behaviour, sampler, mask, hi=algo.seq_mask_hi, **layout)
        mask = mask & keep[seq_index]
    if first:
        mismatch = rl.mismatch_metrics(behaviour, sampler, torch.ones_like(mask), seq_keep=keep, cap=algo.tis_cap,
                                       **layout)  # fmt: skip
        for key, value in mismatch.items():
            out[f"mismatch/{key}"] = (float(value), sampled_counts)
        if route_log is not None:
            frac, routed = route_mismatch(route_log, recorded)
            out["router/route_mismatch_frac"] = (frac, {"routed": routed})
    counts = {"tokens": float(mask.sum()), "seqs": float(seq_index[mask].unique().numel()), **sampled_counts}
    old = lp.detach() if mb.old is None else mb.old
    kwargs: dict = {"agg": algo.agg, "max_len": max_len, "normalizer": norm, "is_weights": is_weights, **layout}
    if algo.eps_low is not None:
        kwargs["eps_low"] = algo.eps_low
    if algo.eps_high is not None:
        kwargs["eps_high"] = algo.eps_high
    if algo.dual_clip is not None:
        kwargs["dual_clip"] = algo.dual_clip
    advantages = mb.advantages.to(lp.device)
    loss, metrics = rl.get_policy_loss(algo.loss)(lp, old, advantages, mask, **kwargs)
    out["policy_loss"] = (float(loss.detach()), counts)
    agg = {"agg": algo.agg, "max_len": max_len, "normalizer": norm, **layout}
    if algo.kl_coef > 0:
        if mb.ref is None:
            with torch.no_grad(), disabled_lora(model):
                mb.ref, _ = forward_logprobs(model, mb, temperature, replay=algo.router_replay)
        kl = rl.kl_loss(lp, mb.ref, mask, kind=algo.kl_kind, **agg)
        loss = loss + algo.kl_coef * kl
        out["kl"] = (float(kl.detach()), counts)
    if algo.entropy_coef > 0:
        loss = loss + rl.entropy_bonus(entropy, mask, algo.entropy_coef, **agg)
    loss.backward()
    out["loss"] = (float(loss.detach()), counts)
    out["entropy"] = (float(rl.masked_mean(entropy.detach(), mask)), counts)
    for key, value in metrics.items():
        out[key] = (float(value), counts)
    return out
