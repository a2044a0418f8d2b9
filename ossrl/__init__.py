"""ossrl: reinforcement learning for OpenAI's GPT-OSS models."""

__version__ = "0.1.0"
