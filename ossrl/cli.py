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
    return parser


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
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
