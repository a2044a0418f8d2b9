"""run_python: one fresh, isolated, resource-limited process per call (see _launcher.py for the child side).

Each run gets:
- a cgroup (v2 where our cgroup delegates memory+pids, else v1) holding its whole process tree: one memory limit
  (RAM + swap, tmpfs files included) and one task limit for all of it; whatever is left in it when the run ends is
  killed, and the group is removed;
- new pid/net/mount/ipc/uts namespaces (as root; in a user namespace otherwise) and, through pivot_root, a private
  read-only root holding the Python runtime only (its venv and prefix, /usr and /lib*), a made-up /etc, /dev with
  null/zero/urandom and a private /dev/shm, a /proc of its own pid ns, and the work dir (a size-capped tmpfs, also
  $HOME and $TMPDIR): nothing of the host's /tmp, /home, /root, /work, data or the project;
- a run-private uid with no supplementary groups (as root), no_new_privs, a fresh session keyring, rlimits,
  Landlock (reads: the root; writes: the work dir; no signals or abstract sockets out of the run) and a seccomp
  filter (_confine.py): no io_uring, user namespaces, setns, ptrace, keyctl, mount API, bpf, perf, userfaultfd,
  kexec/modules; sockets: IP (dead: empty netns) and AF_UNIX (no host socket reachable) only; other ABIs killed;
- a wall-clock deadline enforced here, and an output cap.
Where a REQUIRED protection cannot be had (not root and no user namespaces, no cgroup, ...) the run is refused
unless the caller opts in (allow_unisolated=True or OSSRL_SANDBOX_ALLOW_UNISOLATED=1); the result names what was
active (`protections`) and what was not (`missing`). Thread-safe: concurrent calls share nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ossrl.sandbox.cgroup import RunCgroup
from ossrl.sandbox.result import REQUIRED, SandboxError, SandboxResult, classify

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
# Unassigned by systemd's conventions (below 2^31, above the nspawn container ranges); one random uid per run.
DEFAULT_UID_RANGE = (0x7000_0000, 0x7FFE_0000)
ALLOW_ENV = "OSSRL_SANDBOX_ALLOW_UNISOLATED"  # the trainer's (and any caller's) opt-in without code
_DRAIN_S = 0.5  # after the program ended: how long to wait for the last output
_warned: set[str] = set()


@dataclass
class _Io:
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    status: bytearray = field(default_factory=bytearray)
    timed_out: bool = False
    overflow: bool = False
    finished: bool = False  # the launcher closed the status pipe: init ended and cleaned up after itself
    end: float = 0.0


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("sandbox fallback: %s", msg)


@cache
def _bootstrap_source() -> str:
    return (_HERE / "_bootstrap.py").read_text()


@cache
def _mapped(kind: str, value: int) -> bool:
    """Whether `value` is a valid uid/gid here (in a user namespace only a part of the range is)."""
    try:
        rows = [line.split() for line in Path(f"/proc/self/{kind}_map").read_text().splitlines()]
    except OSError:
        return True
    return any(int(start) <= value < int(start) + int(count) for start, _, count in rows)


def _pick_ids(uid_range: tuple[int, int]) -> tuple[int, int]:
    for _ in range(8):
        uid = random.SystemRandom().randrange(*uid_range)
        if _mapped("uid", uid) and _mapped("gid", uid):
            return uid, uid
    if _mapped("uid", 65534) and _mapped("gid", 65534):
        _warn_once("nobody", f"uid range {uid_range} is not mapped here; all runs share uid 65534 (nobody)")
        return 65534, 65534
    raise SandboxError(f"no usable unprivileged uid in {uid_range} or 65534")


# What the private root holds besides the interpreter: the system's programs and shared libraries.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Never bind these whole into the sandbox (a prefix this wide means python= points at an odd interpreter).
_TOO_WIDE = {"/", "/home", "/root", "/tmp", "/var", "/etc", "/run", "/proc", "/sys", "/dev", "/srv", "/mnt", "/media"}


def _project_dir() -> str | None:
    """The checkout this package runs from (None when it is installed into site-packages: part of the runtime)."""
    pkg = _HERE.parent
    if any(part in ("site-packages", "dist-packages") for part in pkg.parts):
        return None
    return str(pkg.parent)


@cache
def _runtime_paths(python: str) -> tuple[str, ...]:
    """The paths the sandbox's root holds for `python`: its venv, its installation prefix, the system dirs."""
    paths = [p for p in SYSTEM_DIRS if os.path.lexists(p)]
    env_root = os.path.dirname(os.path.dirname(python))
    cfg = os.path.join(env_root, "pyvenv.cfg")
    if os.path.isfile(cfg):  # a venv: itself (literal path: python finds pyvenv.cfg there) and its base
        paths.append(env_root)
        for line in Path(cfg).read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                paths.append(os.path.dirname(os.path.realpath(value.strip())))
    paths.append(os.path.dirname(os.path.dirname(os.path.realpath(python))))  # the installation prefix
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        paths += [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    paths.append(python)  # its chain of symlinks
    home, project = os.path.realpath(os.path.expanduser("~")), _project_dir()

    def holds(q: str, x: str | None) -> bool:
        return x is not None and x not in ("/", "") and (x == q or x.startswith(q.rstrip("/") + "/"))

    for p in paths:
        for q in (p, os.path.realpath(p)):
            if q in _TOO_WIDE or holds(q, home) or holds(q, project):
                raise SandboxError(
                    f"the interpreter {python} needs {q} in the sandbox, which would expose the host's files "
                    "(a home or the project): pass python= an interpreter installed elsewhere"
                )
    out: list[str] = []
    for p in sorted({os.path.normpath(p) for p in paths}):
        if not any(p.startswith(q + "/") for q in out):
            out.append(p)
    return tuple(out)


def _count_processes(uid: int) -> int:
    """Tasks (threads count too) owned by `uid`: RLIMIT_NPROC for a non-root caller sits on top of these."""
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return n


def _write_files(work: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"sandbox file names must be relative paths inside the work dir, got {name!r}")
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _pump(proc: subprocess.Popen, status_fd: int, stdin: bytes, deadline: float, cap: int) -> _Io:
    """Feed stdin, collect output up to `cap` bytes a stream, until the launcher is done or a limit trips."""
    io = _Io()
    assert proc.stdout is not None and proc.stderr is not None
    bufs = {proc.stdout.fileno(): io.stdout, proc.stderr.fileno(): io.stderr, status_fd: io.status}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    pending = memoryview(stdin)
    stdin_fd = proc.stdin.fileno() if proc.stdin is not None else -1
    if stdin_fd >= 0:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    reading, drain_until = set(bufs), math.inf
    try:
        while reading:
            now = time.monotonic()
            if now >= deadline:
                io.timed_out = True
                break
            if now >= drain_until:
                break
            for key, _ in sel.select(min(deadline, drain_until) - now):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(fd, pending[: 1 << 16]) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # the program closed stdin or exited
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()  # type: ignore[union-attr]
                        stdin_fd = -1
                    continue
                data = os.read(fd, 1 << 16)
                if not data:
                    sel.unregister(fd)
                    reading.discard(fd)
                    if fd == status_fd:  # launcher and init are gone: the run is over
                        io.finished = True
                        io.end = time.monotonic()
                        drain_until = io.end + _DRAIN_S
                        if stdin_fd >= 0:
                            sel.unregister(stdin_fd)
                            proc.stdin.close()  # type: ignore[union-attr]
                            stdin_fd = -1
                    continue
                buf = bufs[fd]
                room = cap - len(buf) if fd != status_fd else len(data)
                buf += data[:room]
                if len(data) > room:
                    io.overflow = True
                    return io
    finally:
        sel.close()
        if stdin_fd >= 0:
            proc.stdin.close()  # type: ignore[union-attr]
        io.end = io.end or time.monotonic()
    return io


def _stop(proc: subprocess.Popen, uid: int | None, pidns: bool) -> None:
    """End the launcher and everything under it. The launcher is not reaped yet, so its pid (= our process group
    id) cannot have been reused."""
    if proc.returncode is None and not pidns:
        # No pid namespace whose end kills everything: init kills the run's processes when asked (SIGTERM).
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=1)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # launcher + init; init's death tears down the pid namespace
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    if uid is not None:  # no pid namespace: hunt down stragglers (double-forked daemons) by their run-private uid
        cfg = json.dumps({"kill_uid": uid})
        subprocess.run([sys.executable, "-I", "-S", str(_HERE / "_launcher.py"), cfg], env={}, timeout=10, check=False)


def _allowed(allow_unisolated: bool | None) -> bool:
    if allow_unisolated is not None:
        return allow_unisolated
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def run_python(
    code: str,
    *,
    stdin: str | bytes | None = None,
    timeout_s: float = 10,
    memory_mb: int = 1024,
    files: dict[str, str | bytes] | None = None,
    cpu_time_s: float | None = None,
    max_output_bytes: int = 1_000_000,
    max_processes: int = 64,
    max_file_mb: int = 64,
    disk_mb: int = 256,
    max_open_files: int = 256,
    python: str | None = None,
    site_packages: bool = True,
    env: dict[str, str] | None = None,
    namespaces: bool = True,
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE,
    allow_unisolated: bool | None = None,
    _disable: tuple[str, ...] = (),
) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandboxed process and report how it ended.

    Limits: `timeout_s` wall clock (enforced here) and `cpu_time_s` CPU seconds (RLIMIT_CPU, default = timeout),
    `memory_mb` for the whole process tree (a cgroup; RLIMIT_AS per process as well), `max_output_bytes` per
    stream (exceeding it kills the run), `max_processes` tasks for the tree (cgroup pids + RLIMIT_NPROC),
    `max_file_mb` per file (RLIMIT_FSIZE), `disk_mb` for the whole work dir (a tmpfs, counted as memory too).
    `files` are written into the work dir (the cwd, also $HOME and $TMPDIR) first; `env` adds variables to the
    minimal environment.

    Isolation (see the module docstring): when any of REQUIRED cannot be set up here (not root and no user
    namespaces, no cgroup, ...) the run is refused with a SandboxError naming what is missing, unless
    `allow_unisolated=True` or the environment has OSSRL_SANDBOX_ALLOW_UNISOLATED=1; then it runs with what
    there is (warning once) and the result's `missing` names the gaps. `namespaces=False` skips the kernel
    namespaces (testing the fallbacks; needs allow_unisolated); `_disable` (tests only) switches protections off
    by name to check the refusal. Raises SandboxError only when the sandbox itself cannot be set up or refuses;
    never for what the program did.
    """
    if not sys.platform.startswith("linux"):
        raise SandboxError("ossrl.sandbox needs Linux (namespaces, cgroups, rlimits, /proc)")
    python = os.path.abspath(python or sys.executable)
    runtime = _runtime_paths(python)
    cpu_limit = max(1, math.ceil(cpu_time_s if cpu_time_s is not None else timeout_s))
    is_root = os.geteuid() == 0
    uid, gid = _pick_ids(uid_range) if is_root else (os.getuid(), os.getgid())
    allow = _allowed(allow_unisolated)
    disable = tuple(_disable)
    cgroup, cgroup_why = (None, "disabled") if "cgroup" in disable else RunCgroup.create(memory_mb << 20, max_processes)
    root = Path(tempfile.mkdtemp(prefix="ossrl-sbx-"))
    status_r = status_w = -1
    io: _Io | None = None
    status: list[dict] = []
    oom_kills = leftover = 0
    try:
        root.chmod(0o711)  # the child may traverse it, other users may not list it
        main_py, work = root / "main.py", root / "work"
        main_py.write_bytes(code.encode("utf-8", "surrogateescape"))
        work.mkdir(mode=0o700)
        (root / "newroot").mkdir(mode=0o700)
        _write_files(work, files or {})
        if is_root:
            _chown_tree(work, uid, gid)
            os.chown(main_py, uid, gid)
            main_py.chmod(0o400)
        child_env = {
            "PATH": f"{os.path.dirname(python)}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
            # One thread per numeric library: a 128-core host would otherwise blow RLIMIT_AS and RLIMIT_NPROC.
            **{k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
            **(env or {}),
        }
        flags = ["-I"] + ([] if site_packages else ["-S"])
        status_r, status_w = os.pipe()
        devices = ["/dev/null", "/dev/zero", "/dev/urandom"]
        cfg = {
            "status_fd": status_w,
            "host_pid": os.getpid(),
            "namespaces": namespaces,
            "disable": list(disable),
            "required": list(REQUIRED),
            "allow_unisolated": allow,
            "uid": uid,
            "gid": gid,
            "drop_privileges": is_root,
            "hostname": "sandbox",
            "root": str(root),
            "newroot": str(root / "newroot"),
            "workdir": str(work),
            "main_py": str(main_py),
            "runtime": list(runtime),
            "landlock_read": [*runtime, str(main_py), "/etc/ld.so.cache", "/etc/localtime", *devices],
            "cgroup_procs": cgroup.procs_files if cgroup else [],
            "disk_mb": disk_mb,
            "env": child_env,
            "argv": [python, *flags, "-c", _bootstrap_source(), str(main_py), str(work)],
            "limits": {
                "cpu_s": cpu_limit,
                "as_bytes": memory_mb << 20,
                "fsize_bytes": max_file_mb << 20,
                "nproc": max_processes + (0 if is_root else _count_processes(uid)),
                "nofile": max_open_files,
            },
        }
        stdin_bytes = stdin.encode() if isinstance(stdin, str) else stdin
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_HERE / "_launcher.py"), json.dumps(cfg)],
            stdin=subprocess.PIPE if stdin_bytes else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=root,
            env={},
            start_new_session=True,  # its own process group: one killpg reaches launcher and init
            pass_fds=(status_w,),
        )
        os.close(status_w)
        status_w = -1
        try:
            io = _pump(proc, status_r, stdin_bytes or b"", start + timeout_s, max_output_bytes)
        finally:
            status = _parse_status(io.status if io else b"")
            isolation = _last(status, "isolation") or ()
            pidns = "pidns" in isolation
            stray_uid = uid if is_root and not pidns and not (io and io.finished) else None
            _stop(proc, stray_uid, pidns)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        if cgroup is not None:
            oom_kills = cgroup.oom_kills()
            leftover, stuck = cgroup.close()
            if stuck:
                log.warning("sandbox: could not remove the run's cgroup: %s", "; ".join(stuck))
        shutil.rmtree(root, ignore_errors=True)
    if leftover:
        log.warning("sandbox: %d process(es) of a finished run were still alive; killed", leftover)
    return _result(
        io, status, cpu_limit, start, oom_kills=oom_kills, allow=allow, cgroup_why=cgroup_why, namespaces=namespaces
    )


def _parse_status(raw: bytes) -> list[dict]:
    out = []
    for line in raw.decode(errors="replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict):
            out.append(msg)
    return out


def _last(status: list[dict], key: str) -> object:
    return next((m[key] for m in reversed(status) if key in m), None)


def _explain(missing: list[str], status: list[dict], cgroup_why: str, namespaces: bool) -> str:
    notes = [m["warning"] for m in status if "warning" in m]
    if "cgroup" in missing:
        notes.append(f"cgroup: {cgroup_why}")
    if {"pidns", "mntns", "netns"} & set(missing):
        why = (
            "namespaces=False"
            if not namespaces
            else "not root and no user namespaces"
            if os.geteuid()
            else "unshare failed"
        )
        notes.append(f"namespaces: {why}")
    if "seccomp" in missing:
        notes.append(f"seccomp: no filter for {platform.machine()} or the kernel refused it")
    return "; ".join(notes)


def _result(
    io: _Io,
    status: list[dict],
    cpu_limit: int,
    start: float,
    *,
    oom_kills: int,
    allow: bool,
    cgroup_why: str,
    namespaces: bool,
) -> SandboxResult:
    end = next((m for m in status if "exit" in m or "signal" in m), None)
    errors = [m["error"] for m in status if "error" in m]
    refused = _last(status, "refused")
    isolation = tuple(_last(status, "isolation") or ())
    missing = tuple(_last(status, "missing") or ())
    if refused:
        why = _explain(refused, status, cgroup_why, namespaces)
        raise SandboxError(
            f"refusing to run untrusted code without {', '.join(refused)} ({why}). "
            f"Pass allow_unisolated=True, or set {ALLOW_ENV}=1, to run it with what there is."
        )
    if errors and not io.timed_out:
        hint = ""
        if "PermissionError" in errors[-1] and "uid" in isolation and "pivot_root" not in isolation:
            hint = " (the interpreter must be reachable by an unprivileged uid without a mount namespace: pass python=)"
        raise SandboxError("; ".join(errors) + hint)
    if missing and allow:
        _warn_once(
            "missing:" + ",".join(missing),
            f"running untrusted code without {', '.join(missing)} (allow_unisolated): "
            + _explain(list(missing), status, cgroup_why, namespaces),
        )
    exit_code = signum = None
    if end is not None:
        exit_code = end.get("exit")
        signum = end.get("signal")
    kind = classify(
        timed_out=io.timed_out,
        overflow=io.overflow,
        exit_code=exit_code,
        signum=signum,
        cpu_s=end.get("cpu_s") if end else None,
        cpu_limit=cpu_limit,
        oom_kills=oom_kills,
    )
    return SandboxResult(
        ok=kind is None,
        stdout=io.stdout.decode(errors="replace"),
        stderr=io.stderr.decode(errors="replace"),
        exit_code=None if io.timed_out or io.overflow else (-signum if signum is not None else exit_code),
        error_kind=kind,
        wall_time_s=io.end - start,
        network="netns" if "netns" in isolation else "audit_hook",
        protections=isolation,
        missing=missing,
        cpu_time_s=end.get("cpu_s") if end else None,
    )
