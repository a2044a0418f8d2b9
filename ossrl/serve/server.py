"""Start the server: an engine on a loaded model, its loop thread, the app under uvicorn."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ossrl.rollout import Engine
from ossrl.serve.app import create_app
from ossrl.serve.loop import EngineLoop

log = logging.getLogger(__name__)


def serve(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_queue: int = 256,
    default_max_tokens: int = 4096,
    reasoning_effort: str = "medium",
    max_num_seqs: int = 256,
    kv_cache_tokens: int | None = None,
    max_model_len: int | None = None,
    log_level: str = "info",
) -> int:
    """Serve ``model`` until interrupted (uvicorn handles SIGINT / SIGTERM); returns an exit code."""
    import uvicorn

    engine = Engine(model, tokenizer, max_num_seqs=max_num_seqs, kv_cache_tokens=kv_cache_tokens,
                    max_model_len=max_model_len)  # fmt: skip
    loop = EngineLoop(engine, max_queue=max_queue).start()
    app = create_app(loop, tokenizer, model_name=model_name, default_max_tokens=default_max_tokens,
                     reasoning_effort=reasoning_effort)  # fmt: skip
    log.info("serving %s on http://%s:%d/v1", model_name, host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    finally:
        loop.stop()
    return 0


def serve_from_args(args: argparse.Namespace, model: Any, tokenizer: Any) -> int:
    """``ossrl serve``: the parsed command line (``cli.build_parser``'s serve block) and the loaded model."""
    return serve(model, tokenizer, model_name=args.served_model_name or args.model, host=args.host, port=args.port,
                 max_queue=args.max_queue, default_max_tokens=args.max_tokens, reasoning_effort=args.reasoning_effort,
                 max_num_seqs=args.max_num_seqs, kv_cache_tokens=args.kv_cache_tokens,
                 max_model_len=args.max_model_len)  # fmt: skip
