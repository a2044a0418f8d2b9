"""Running untrusted, model-written Python code: a fresh process per run in its own cgroup, namespaces and
read-only root, under a seccomp filter; no network, nothing of the host's files. Refuses to run without that
isolation unless the caller opts in (allow_unisolated=True / OSSRL_SANDBOX_ALLOW_UNISOLATED=1).

from ossrl.sandbox import run_python, Sandbox
r = run_python("print(input()[::-1])", stdin="abc", timeout_s=5)   # r.ok, r.stdout == "cba\\n"
async with Sandbox(max_concurrency=8, timeout_s=5) as sb:
    results = await asyncio.gather(*(sb.run(code) for code in codes))
"""

from ossrl.sandbox.pool import Sandbox, run_python_async
from ossrl.sandbox.result import ErrorKind, Network, SandboxError, SandboxResult
from ossrl.sandbox.runner import run_python

__all__ = ["ErrorKind", "Network", "Sandbox", "SandboxError", "SandboxResult", "run_python", "run_python_async"]
