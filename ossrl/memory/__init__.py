"""``ossrl memory``: a config's peak GPU memory per phase (rollout, train), from the real code on shape-only tensors.
See ``planner`` (what runs, what is laid out) and README "ossrl memory"."""

from ossrl.memory.planner import GPU_OVERHEAD_GIB, MemoryPlan, Planner, advice, describe, plan

__all__ = ["GPU_OVERHEAD_GIB", "MemoryPlan", "Planner", "advice", "describe", "plan"]
