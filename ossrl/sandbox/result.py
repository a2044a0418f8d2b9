"""What a sandboxed run returns, and how its raw outcome maps to an error kind."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Literal

ErrorKind = Literal["timeout", "memory", "killed", "syntax", "runtime", "output_limit"]
Network = Literal["netns", "audit_hook"]

# Protections a run must have; without any of them it is refused unless the caller opts in (allow_unisolated).
# "uid" is met by a run-private uid (root) or by a user namespace (not root): see _launcher.missing_protections.
REQUIRED = ("cgroup", "pidns", "netns", "mntns", "ipcns", "pivot_root", "seccomp", "keyring", "nnp")
# Every name `protections` may hold, for the record:
#   cgroup      memory + pids limit for the whole process tree      pidns/netns/mntns/ipcns/utsns  namespaces
#   userns      a user namespace holds them (not root)               pivot_root  the private read-only root
#   proc        a /proc of the run's own pid namespace               uid / groups  a run-private uid, no groups
#   rlimits     per-process cpu/as/fsize/nproc/nofile/core           keyring     a fresh session keyring
#   nnp         no_new_privs                                         seccomp     the syscall filter
#   landlock, landlock_net, landlock_scope   file access, TCP, signals/abstract sockets out of the run

# Exit codes the bootstrap uses (kept in sync with _bootstrap.py, which cannot be imported: it runs on load).
EXIT_SYNTAX, EXIT_MEMORY = 210, 211


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start or isolate the program); never raised for what the program did."""


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited 0 within every limit
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal; None: we killed it (timeout/output) before it ended
    error_kind: ErrorKind | None
    wall_time_s: float
    network: Network  # "netns": a network namespace with nothing but a down loopback; "audit_hook": best effort
    protections: tuple[str, ...] = field(default=())  # what was active for this run (names above)
    missing: tuple[str, ...] = field(default=())  # REQUIRED ones that were not (only ever with allow_unisolated)
    cpu_time_s: float | None = None  # of the main process, when it ended on its own

    @property
    def isolation(self) -> tuple[str, ...]:  # the earlier name of `protections`
        return self.protections


def classify(
    *,
    timed_out: bool,
    overflow: bool,
    exit_code: int | None,
    signum: int | None,
    cpu_s: float | None,
    cpu_limit: int,
    oom_kills: int = 0,
) -> ErrorKind | None:
    if timed_out:
        return "timeout"
    if overflow:
        return "output_limit"
    if oom_kills and (signum is not None or exit_code != 0):
        return "memory"  # the cgroup's OOM killer ended a process of the run (the run's memory as a whole)
    if signum is not None:
        if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_s is not None and cpu_s >= cpu_limit - 0.05):
            return "timeout"  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one
        return "killed"
    if exit_code is None:
        return "killed"  # the sandbox's own processes died before reporting
    if exit_code == 0:
        return None
    return {EXIT_SYNTAX: "syntax", EXIT_MEMORY: "memory"}.get(exit_code, "runtime")
