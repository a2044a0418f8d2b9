"""Rollout engine: generation from the policy model itself, with a paged KV cache, continuous batching,
batch-invariant sampling, log-probs of every sampled token, and multi-turn Harmony tool calls. A rollout comes
back as a ``RolloutBatch`` of packed tensors (``Engine.rollout``) or as Python lists (``Engine.generate``)."""

from ossrl.rollout.batch import Completion, RolloutBatch
from ossrl.rollout.engine import Engine, Request
from ossrl.rollout.sampling import SamplingParams

__all__ = ["Completion", "Engine", "Request", "RolloutBatch", "SamplingParams"]
