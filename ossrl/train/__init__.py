"""The training loop and its pieces: ``Trainer`` (one GRPO-family step), ``run_training`` (``ossrl train``), and
``logprobs_of``, the trainer's log-probs of completions (the same packed forward the loss uses)."""

from ossrl.train.logprobs import logprobs_of

__all__ = ["logprobs_of"]
