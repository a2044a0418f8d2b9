"""The `ossrl` command line: thin, it parses arguments and calls into the package."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

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
                        description="ossrl train [CONFIG.yaml] [section.field=value ...]; on N processes: "
                                    "torchrun --nproc-per-node N -m ossrl train [CONFIG.yaml] ...")  # fmt: skip
    tr.add_argument("items", nargs="*", metavar="CONFIG_OR_OVERRIDE",
                    help="a YAML recipe (optional), then overrides: optim.lr=1e-5 resume=true")  # fmt: skip

    me = sub.add_parser("memory", help="peak GPU memory of a config's rollout and train step (no GPU, no weights)",
                        description="ossrl memory [CONFIG.yaml] [section.field=value ...]: runs the config's rollout "
                                    "and train step on shape-only tensors and prints each phase's peak")  # fmt: skip
    me.add_argument("items", nargs="*", metavar="CONFIG_OR_OVERRIDE", help="as for ossrl train")
    me.add_argument("--gpu-gib", type=float, default=None, help="the GPU's memory (GiB): whether it fits, and the "
                    "largest rollout.n and sequence that would")  # fmt: skip
    me.add_argument("--prompt-tokens", type=int, default=256, help="tokens of a prompt (default 256)")
    me.add_argument("--no-search", action="store_true", help="skip the largest-n / longest-sequence search")
    me.add_argument("--json", action="store_true", help="print the plan as JSON")

    ev = sub.add_parser("eval", help="accuracy of a model on a task's held-out split")
    add_model_arguments(ev, run=True)
    ev.add_argument("--task", default=None, help="task name (ossrl.tasks.list_tasks()); --run: the run's")
    ev.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="task option, e.g. path=../shared/data/gsm8k/train.jsonl (repeatable)")  # fmt: skip
    ev.add_argument("--split", default=None, help="default: eval (or the task's test split)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only (--run: the run's)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default 512 (--run: the run's)")
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--max-turns", type=int, default=None, help="assistant turns when the task has tools (default 4)")
    ev.add_argument("--out", default=None, help="also write the result as JSON here")

    ch = sub.add_parser("chat", help="talk to a model in Harmony (lines from stdin; /reset, /exit)",
                        description="Chat with a model in the Harmony format, the rollout engine generating. Each "
                        "line read is a user turn; the whole conversation is the next prompt. /reset clears it, "
                        "/exit or end of input quits. Analysis and tool traffic are shown prefixed.")  # fmt: skip
    add_model_arguments(ch, run=True)
    ch.add_argument("--task", default=None, help="give the model a task's tools and instructions (e.g. arithmetic)")
    ch.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="task option, e.g. tools=[] (repeatable; needs --task)")  # fmt: skip
    ch.add_argument("--temperature", type=float, default=1.0)
    ch.add_argument("--max-new-tokens", type=int, default=1024, help="sampled tokens per reply, tool turns included")
    ch.add_argument("--max-turns", type=int, default=None, help="assistant turns per reply with tools (default 4)")
    ch.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default=None,
                    help="default: the task's (low), else medium")  # fmt: skip
    ch.add_argument("--instructions", default=None, help="developer instructions (default: the task's)")
    ch.add_argument("--system", action=argparse.BooleanOptionalAction, default=None,
                    help="Harmony's generated system message (default: on, or as the task says)")  # fmt: skip
    ch.add_argument("--seed", type=int, default=0)

    be = sub.add_parser("bench", help="run a benchmark from the checkout's benchmarks/ (GPU for real numbers)",
                        description="Run a benchmark script from benchmarks/ in the ossrl checkout, as "
                        "`python -m benchmarks.NAME ARGS...`; the arguments after NAME go to the script (NAME --help "
                        "lists them). They measure gpt-oss-20b shapes and need a CUDA GPU for meaningful numbers; "
                        "results are saved as JSON under bench_results/.")  # fmt: skip
    be.add_argument("--list", action="store_true", help="list the benchmarks (also: no NAME)")
    be.add_argument("name", nargs="?", help="benchmark name, e.g. rollout")
    be.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark script")

    ex = sub.add_parser("export", help="merge a LoRA adapter into its base, write an HF checkpoint (dense or MXFP4)",
                        description="Write --model with --adapter merged (W + alpha/r * B @ A, in fp32) as an HF "
                        "gpt-oss checkpoint (transformers' names, tokenizer and chat template copied), streamed one "
                        "tensor and one shard at a time. --mxfp4 re-quantizes the experts as gpt-oss ships "
                        "them.")  # fmt: skip
    ex.add_argument("--model", required=True, help="base checkpoint: HF-format directory or Hub id")
    ex.add_argument("--adapter", default=None, help="LoRA adapter directory in PEFT's format (optional)")
    ex.add_argument("--out", required=True, help="directory to write the merged checkpoint into (new or empty)")
    ex.add_argument("--mxfp4", action="store_true", help="store the expert weights in MXFP4, as gpt-oss ships")
    ex.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: the base's)")
    ex.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MiB (default 5GB)")
    ex.add_argument("--overwrite", action="store_true", help="replace the checkpoint files in a non-empty --out")
    ex.add_argument("--device", default=None, help="where merging and MXFP4 quantization run (default: cuda if "
                    "available, else cpu)")  # fmt: skip

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions) on the rollout engine",
                        description="Serve --model (+ --adapter) over HTTP with OpenAI's API: /v1/models, "
                        "/v1/chat/completions (Harmony rendering, tool calls returned to the client, "
                        "reasoning_content, streaming) and /v1/completions. Concurrent requests share decode steps "
                        "(continuous batching).")  # fmt: skip
    add_model_arguments(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model as given)")
    sv.add_argument("--max-queue", type=int, default=256,
                    help="requests waiting for the engine before new ones get HTTP 429")  # fmt: skip
    sv.add_argument("--max-tokens", type=int, default=4096,
                    help="completion tokens of a request that sets no max_tokens (capped by the context)")  # fmt: skip
    sv.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium",
                    help="when a request sets none")  # fmt: skip
    sv.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one decode step")
    sv.add_argument("--kv-cache-tokens", type=int, default=None,
                    help="KV cache size in tokens (default: 90%% of free GPU memory; 65536 on CPU)")  # fmt: skip
    sv.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    return parser


def add_model_arguments(p: argparse.ArgumentParser, run: bool = False) -> None:
    """--model/--adapter/--device/--dtype; with ``run``, also --run RUN_DIR, which supplies them (and the task)."""
    p.add_argument("--model", required=not run, default=None,
                   help="HF-format checkpoint directory or Hub id (with its tokenizer)")  # fmt: skip
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory in PEFT's format (e.g. a checkpoint's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: bfloat16")
    if run:
        p.add_argument("--run", default=None, metavar="RUN_DIR",
                       help="a training run: its base model, last adapter, dtype, task, options and sampling "
                       "(flags given here win)")  # fmt: skip


def apply_run(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the user did not give from ``--run RUN_DIR``: model, adapter, dtype, device, task and its options,
    and the run's evaluation settings (``ossrl eval --run DIR`` reproduces the run's own ``eval_after``)."""
    run = getattr(args, "run", None)
    if run is None:
        if args.model is None:
            raise ValueError("--model (or --run RUN_DIR) is required")
        args.dtype = args.dtype or "bfloat16"
        return args
    from ossrl.train.run import run_settings

    found = run_settings(run)
    args.model = args.model or found["model"]
    args.adapter = args.adapter or found["adapter"]
    args.dtype = args.dtype or found["dtype"]
    args.device = args.device or found["device"]
    if getattr(args, "task", None) is None:
        args.task = found["task"]
        args.option = [*(f"{k}={json.dumps(v)}" for k, v in found["options"].items()), *args.option]
    for name in ("limit", "max_new_tokens", "max_turns", "split"):
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, found[name])
    args.run_sampling = found["sampling"]  # tool timeout and result budget, as the run's evaluations used
    return args


def parse_options(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE pairs; values parse as JSON when they can (numbers, true/false, lists), else stay strings."""
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
    from ossrl.dist.launch import DistributedError
    from ossrl.train.run import run_training
    from ossrl.train.trainer import NonFiniteParameters, RewardFailure

    show_progress_logs()
    from ossrl.memory.fit import memory_refusal

    refusal = memory_refusal(config)  # before any weight is read: a config that cannot fit the GPU stops here
    if refusal:
        print(f"ossrl train: {refusal}", file=sys.stderr)
        return 2
    try:
        result = run_training(config)
    except (ValueError, OSError, ImportError, RewardFailure, NonFiniteParameters, DistributedError) as err:
        if os.environ.get("OSSRL_DEBUG"):
            raise
        rank = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""  # under torchrun: whose error
        print(f"ossrl train: {rank}{err}  (OSSRL_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    if result["summary"] is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    before, after = result["eval_before"], result["eval_after"]
    print(f"accuracy: {before['accuracy']:.3f} before -> {after['accuracy']:.3f} after "
          f"(tool use {before['tool_use_rate']:.2f} -> {after['tool_use_rate']:.2f}); "
          f"{result['wall_time_s']:.0f} s")  # fmt: skip
    print(f"report: {result['report']}\nsummary: {result['summary']}\nadapter: {result['adapter']}")
    return 0


def run_memory(args: argparse.Namespace) -> int:
    from ossrl.config import ConfigError, load_config
    from ossrl.memory import describe, plan
    from ossrl.recipes import TINY_CPU

    items = args.items
    path = items[0] if items and "=" not in items[0] else None
    try:
        if args.gpu_gib is not None and args.gpu_gib <= 0:
            raise ConfigError(f"--gpu-gib: must be > 0; got {args.gpu_gib}")
        if args.prompt_tokens < 1:
            raise ConfigError(f"--prompt-tokens: must be >= 1; got {args.prompt_tokens}")
        config = load_config(path, items[1 if path else 0 :], base=None if path else TINY_CPU)
        result = plan(config, args.gpu_gib, prompt_tokens=args.prompt_tokens, search=not args.no_search)
    except (ConfigError, ValueError, OSError) as err:
        print(f"ossrl memory: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else "\n".join(describe(result)))
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and notebooks swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def show_progress_logs() -> None:
    """ossrl's INFO lines (model loading, the warm start's progress) on stderr from the first second of a run."""
    logger = logging.getLogger("ossrl")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[ossrl %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model of ``--model`` (+ ``--adapter``) in eval mode on ``--device``, and its Harmony tokenizer."""
    import torch

    from ossrl.harmony import load_harmony_tokenizer
    from ossrl.model import GptOss
    from ossrl.model.checkpoint import resolve_checkpoint_dir

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    directory = resolve_checkpoint_dir(args.model)
    tokenizer = load_harmony_tokenizer(directory)
    model = GptOss.from_pretrained(directory, dtype=getattr(torch, args.dtype), device=device).eval()
    if args.adapter:
        from ossrl.model.lora import load_peft_adapter

        load_peft_adapter(model, args.adapter)
    return model, tokenizer


def run_eval(args: argparse.Namespace) -> int:
    from ossrl.rollout import SamplingParams
    from ossrl.tasks import get_task
    from ossrl.train.evaluate import evaluate

    apply_run(args)
    if args.task is None:
        raise ValueError("--task (or --run RUN_DIR) is required")
    task = get_task(args.task, **parse_options(args.option))  # bad names fail here, before the model loads
    model, tokenizer = load_model(args)
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens or 512,
                              max_turns=args.max_turns or 4, **getattr(args, "run_sampling", {}))  # fmt: skip
    split = args.split or ("eval" if "eval" in task.splits else "test")
    result = evaluate(model, tokenizer, task, split=split, limit=args.limit, sampling=sampling)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from ossrl.chat import ChatSession, describe, run_chat, stdin_lines, task_prompt, use_color
    from ossrl.rollout import SamplingParams
    from ossrl.tasks import get_task
    from ossrl.tasks.base import Prompt

    apply_run(args)
    options = parse_options(args.option)
    if args.task:  # bad task names and options fail here, before the model loads
        flags = {"reasoning_effort": args.reasoning_effort, "instructions": args.instructions,
                 "system_message": args.system}  # fmt: skip
        task = get_task(args.task, **{k: v for k, v in flags.items() if v is not None}, **options)
        prompt, tools = task_prompt(task), task.tool_functions
    elif options:
        raise ValueError("--option sets task options; it needs --task")
    else:
        prompt = Prompt([], instructions=args.instructions, reasoning_effort=args.reasoning_effort or "medium",
                        system=args.system is not False)  # fmt: skip
        tools = {}
    model, tokenizer = load_model(args)
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                              max_turns=(args.max_turns or 4) if tools else 1, seed=args.seed)  # fmt: skip
    session = ChatSession(model, tokenizer, prompt=prompt, tools=tools, sampling=sampling)
    print(describe(session), file=sys.stderr)
    run_chat(session, stdin_lines(), lambda line: print(line, flush=True), color=use_color())
    return 0


def benchmark_root() -> Path | None:
    """The checkout holding ``benchmarks/`` (next to the ``ossrl`` package in an editable install, else the current
    directory); None when ossrl was installed without its repository."""
    import ossrl

    for root in (Path(ossrl.__file__).resolve().parents[1], Path.cwd()):
        if (root / "benchmarks" / "common.py").is_file() and (root / "pyproject.toml").is_file():
            return root
    return None


def list_benchmarks(root: Path) -> dict[str, str]:
    """Benchmark name -> the first sentence of its docstring (read, not imported: they import GPU code)."""
    import ast

    found: dict[str, str] = {}
    for path in sorted((root / "benchmarks").glob("*.py")):
        if path.stem.startswith("_") or path.stem == "common":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        summary = " ".join(doc.split("\n\n")[0].split()).split(": ")[0]
        found[path.stem] = summary if len(summary) <= 100 else summary[:97].rsplit(" ", 1)[0] + " ..."
    return found


def run_bench(args: argparse.Namespace) -> int:
    import os
    import subprocess

    root = benchmark_root()
    if root is None:
        print("ossrl bench: no benchmarks/ directory found; the benchmarks live in the ossrl repository, not in the "
              "installed package: run this from a checkout (pip install -e .)", file=sys.stderr)  # fmt: skip
        return 2
    available = list_benchmarks(root)
    if args.list or not args.name:
        print(f"benchmarks in {root / 'benchmarks'} (a CUDA GPU gives meaningful numbers):")
        for name, summary in available.items():
            print(f"  {name:<14} {summary}")
        print("run one: ossrl bench NAME [ARGS...]; ossrl bench NAME --help lists its arguments")
        return 0
    if args.name not in available:
        import difflib

        hint = difflib.get_close_matches(args.name, available, n=1)
        print(f"ossrl bench: no benchmark {args.name!r}; available: {', '.join(available)}"
              + (f" (did you mean {hint[0]!r}?)" if hint else ""), file=sys.stderr)  # fmt: skip
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    try:
        return subprocess.run([sys.executable, "-m", f"benchmarks.{args.name}", *args.args], env=env).returncode
    except KeyboardInterrupt:
        return 130


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
    if args.command == "memory":
        return run_memory(args)
    if args.command in ("eval", "chat"):
        try:
            return run_eval(args) if args.command == "eval" else run_chat(args)
        except (ValueError, FileNotFoundError) as err:  # bad names, paths, adapters: one line, exit code 2
            print(f"ossrl {args.command}: {err}", file=sys.stderr)
            return 2
    if args.command == "bench":
        return run_bench(args)
    if args.command == "export":
        from ossrl.model.export import run_export

        show_progress_logs()
        return run_export(args)
    if args.command == "serve":
        from ossrl.serve import serve_from_args

        show_progress_logs()
        try:
            model, tokenizer = load_model(apply_run(args))
        except (ValueError, FileNotFoundError) as err:  # bad paths, adapters: one line, exit code 2
            print(f"ossrl serve: {err}", file=sys.stderr)
            return 2
        return serve_from_args(args, model, tokenizer)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
