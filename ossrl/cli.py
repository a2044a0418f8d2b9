"""The `ossrl` command line: thin, it parses arguments and calls into the package."""

from __future__ import annotations

import argparse
import sys

from ossrl import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ossrl", description="Reinforcement learning for GPT-OSS models.")
    parser.add_argument("--version", action="version", version=f"ossrl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    tiny = sub.add_parser("tiny", help="write a tiny GPT-OSS checkpoint + Harmony tokenizer (tests, CPU demo)")
    tiny.add_argument("out_dir", help="directory to write the HF-format checkpoint into")
    tiny.add_argument("--mxfp4", action="store_true", help="store the expert weights in MXFP4, as gpt-oss ships")
    tiny.add_argument("--seed", type=int, default=0)

    tr = sub.add_parser("train", help="GRPO training (no config: the built-in tiny CPU recipe)",
                        description="ossrl train [CONFIG.yaml] [section.field=value ...]")  # fmt: skip
    tr.add_argument("items", nargs="*", metavar="CONFIG_OR_OVERRIDE",
                    help="a YAML recipe (optional), then overrides: optim.lr=1e-5 resume=true")  # fmt: skip

    ev = sub.add_parser("eval", help="accuracy of a model on a task's held-out split")
    ev.add_argument("--model", required=True, help="HF-format checkpoint directory or Hub id (with its tokenizer)")
    ev.add_argument("--task", required=True, help="task name (ossrl.tasks.list_tasks())")
    ev.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="task option, e.g. path=../shared/data/gsm8k/train.jsonl (repeatable)")  # fmt: skip
    ev.add_argument("--adapter", default=None, help="a LoRA adapter directory in PEFT's format (e.g. a checkpoint's)")
    ev.add_argument("--split", default="eval")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    ev.add_argument("--max-new-tokens", type=int, default=512)
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--max-turns", type=int, default=4, help="assistant turns when the task has tools")
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ev.add_argument("--out", default=None, help="also write the result as JSON here")
    return parser


def parse_options(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE pairs; values parse as JSON when they can (numbers, true/false, lists), else stay strings."""
    import json

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"ossrl: bad option {pair!r}; expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def run_train(items: list[str]) -> int:
    from ossrl.config import ConfigError, load_config
    from ossrl.recipes import TINY_CPU

    path = items[0] if items and "=" not in items[0] else None
    overrides = [i if i.split("=", 1)[0] != "resume" else "checkpoint." + i for i in items[1 if path else 0 :]]
    try:
        config = load_config(path, overrides, base=None if path else TINY_CPU)  # no recipe: the embedded default
    except ConfigError as err:
        print(f"ossrl train: {err}", file=sys.stderr)
        return 2
    from ossrl.train.run import run_training

    result = run_training(config)
    before, after = result["eval_before"], result["eval_after"]
    print(f"accuracy: {before['accuracy']:.3f} before -> {after['accuracy']:.3f} after "
          f"(tool use {before['tool_use_rate']:.2f} -> {after['tool_use_rate']:.2f}); "
          f"{result['wall_time_s']:.0f} s")  # fmt: skip
    print(f"report: {result['report']}\nsummary: {result['summary']}\nadapter: {result['adapter']}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    from ossrl.harmony import load_harmony_tokenizer
    from ossrl.model import GptOss
    from ossrl.model.checkpoint import resolve_checkpoint_dir
    from ossrl.rollout import SamplingParams
    from ossrl.tasks import get_task
    from ossrl.train.evaluate import evaluate

    task = get_task(args.task, **parse_options(args.option))  # bad names fail here, before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    directory = resolve_checkpoint_dir(args.model)
    tokenizer = load_harmony_tokenizer(directory)
    model = GptOss.from_pretrained(directory, dtype=getattr(torch, args.dtype), device=device).eval()
    if args.adapter:
        from ossrl.model.lora import load_peft_adapter

        load_peft_adapter(model, args.adapter)
    sampling = SamplingParams(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, max_turns=args.max_turns
    )
    result = evaluate(model, tokenizer, task, split=args.split, limit=args.limit, sampling=sampling)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "tiny":
        from ossrl.model.tiny import write_tiny_checkpoint

        path = write_tiny_checkpoint(args.out_dir, mxfp4=args.mxfp4, seed=args.seed)
        print(f"wrote tiny GPT-OSS checkpoint and tokenizer to {path}")
        return 0
    if args.command == "train":
        return run_train(args.items)
    if args.command == "eval":
        try:
            return run_eval(args)
        except (ValueError, FileNotFoundError) as err:
            print(f"ossrl eval: {err}", file=sys.stderr)
            return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
