"""Rollout engine: generation from the policy model itself, with a paged KV cache, continuous batching,
batch-invariant sampling, log-probs of every sampled token, and multi-turn Harmony tool calls."""

from ossrl.rollout.engine import Completion, Engine, Request
from ossrl.rollout.sampling import SamplingParams

__all__ = ["Completion", "Engine", "Request", "SamplingParams"]
