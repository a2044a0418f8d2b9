"""Built-in recipes. ``ossrl train`` with no config runs TINY_CPU: the tiny GPT-OSS on the arithmetic-with-calculator
task (2-3 digit numbers), a supervised warm start, then GRPO with the tool loop. It runs on whatever is there, a
2-core CPU included, in about 5 minutes.

The warm start first sees only tool-using demonstrations (300 steps: the call format, and copying numbers into the
call and out of its result — what a tiny model learns slowest), then 100 steps where only 30% of the demonstrations
use the tool and the rest answer directly. The warm-started policy answers directly under greedy decoding (held-out
accuracy ~0: it cannot multiply in its head) and calls the tool in ~30% of samples; GRPO then has to discover that
the tool pays."""

TINY_CPU: dict = {
    "steps": 30,
    "seed": 0,
    "model": {"path": "tiny", "dtype": "float32", "device": "auto", "gradient_checkpointing": False},
    "lora": {"enabled": True, "r": 16, "alpha": 32.0,
             "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]},
    "rollout": {"prompts_per_step": 16, "n": 4, "temperature": 1.0, "max_new_tokens": 48, "max_turns": 2,
                "max_tool_tokens": 32, "tool_timeout_s": 5.0},
    "algorithm": {"advantage": "grpo", "loss": "ppo", "agg": "token-mean", "kl_coef": 0.0, "tis_cap": 2.0},
    "optim": {"lr": 2e-3, "warmup_steps": 2, "max_grad_norm": 1.0, "micro_batch_tokens": 4096},
    "task": {"name": "arithmetic", "options": {"system_message": False, "max_digits": 3}, "eval_limit": 100},
    "warmup": {"steps": 400, "tool_first_steps": 300, "examples": 2000, "tool_fraction": 0.3, "lr": 3e-3,
               "batch_size": 32},
    "logging": {"run_dir": "runs/tiny", "report_to": ["tensorboard"]},
    "checkpoint": {"every": 10},
}  # fmt: skip
