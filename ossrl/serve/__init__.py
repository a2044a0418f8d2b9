"""An OpenAI-compatible HTTP server on the rollout engine: ``ossrl serve --model DIR``.

One thread owns the model and runs the engine's scheduler step by step (:class:`EngineLoop` over
``Engine.stream()``): requests that arrive while others decode join the running batch at the next step, each with
its own sampling params. FastAPI + uvicorn serve ``/v1/models``, ``/v1/chat/completions`` (Harmony in, OpenAI
messages out: ``reasoning_content``, ``tool_calls``; streaming) and ``/v1/completions`` (raw text).
"""

from ossrl.serve.app import create_app
from ossrl.serve.loop import EngineLoop, Event, Overloaded, Unavailable
from ossrl.serve.server import serve, serve_from_args

__all__ = ["EngineLoop", "Event", "Overloaded", "Unavailable", "create_app", "serve", "serve_from_args"]
