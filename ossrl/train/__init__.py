"""Training loop pieces: evaluation on a task's held-out split (the trainer lands in its own issue)."""
