"""The same run as train.yaml, from Python (``python train.py`` in this folder): reward functions are plain
callables and the dataset may be a path, a list of dicts or a ``datasets.Dataset``."""

import json

from rewards import correct, is_number

import ossrl


def main() -> None:
    with open("data.jsonl") as f:
        rows = [json.loads(line) for line in f]
    trainer = ossrl.GRPOTrainer(
        model="tiny",  # or a checkpoint directory / Hub id, e.g. "openai/gpt-oss-20b" (then dtype bfloat16, a GPU)
        reward_funcs=[correct, is_number],
        reward_weights=[1.0, 0.2],
        train_dataset=rows[4:],
        eval_dataset=rows[:4],
        system="Reply with the number only.",  # options of the dataset task
        system_message=False,
        steps=10,  # config fields (ossrl.config.TrainConfig): top-level, per section, or dotted
        rollout={"prompts_per_step": 4, "n": 4, "max_new_tokens": 32, "max_turns": 1, "kv_cache_tokens": 4096},
        optim={"lr": 2e-3},
        task={"eval_limit": 4},
        logging={"run_dir": "runs/custom_task_python", "report_to": []},
        checkpoint={"every": 0},
        **{"model.gradient_checkpointing": False},
    )
    result = trainer.train()
    print(
        f"accuracy {result['eval_before']['accuracy']:.2f} -> {result['eval_after']['accuracy']:.2f}; "
        f"report: {result['report']}"
    )


if __name__ == "__main__":
    main()
