"""run_python: one fresh, isolated, resource-limited process per call (see _launcher.py for the child side).

Each run gets a private temp dir, a run-private uid when we are root (so RLIMIT_NPROC binds, root's files are
off limits and stragglers can be killed by uid), new pid/net/mount/ipc namespaces where the OS allows them, and a
wall-clock deadline enforced here. Thread-safe: concurrent calls share nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
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

from ossrl.sandbox.result import SandboxError, SandboxResult, classify

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
# Unassigned by systemd's conventions (below 2^31, above the nspawn container ranges); one random uid per run.
DEFAULT_UID_RANGE = (0x7000_0000, 0x7FFE_0000)
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


def _expose_list(python: str, root: str) -> list[str]:
    """Directories the unprivileged child must reach even when they sit under a private dir (pyenv in /root)."""
    paths = {root, os.path.dirname(python), os.path.dirname(os.path.realpath(python))}
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        import site

        paths |= {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()}
    else:
        paths.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    return sorted(paths)


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


def _kill_everything(proc: subprocess.Popen, uid: int | None) -> None:
    # The launcher is not reaped yet, so its pid (= our process group id) cannot have been reused.
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # launcher + init; init's death tears down the pid namespace
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    if uid is not None:  # no pid namespace: hunt down stragglers (double-forked daemons) by their run-private uid
        cfg = json.dumps({"kill_uid": uid})
        subprocess.run([sys.executable, "-I", "-S", str(_HERE / "_launcher.py"), cfg], env={}, timeout=10, check=False)


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
) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandboxed process and report how it ended.

    Limits: `timeout_s` wall clock (enforced here) and `cpu_time_s` CPU seconds (RLIMIT_CPU, default = timeout),
    `memory_mb` address space (RLIMIT_AS), `max_output_bytes` per stream (exceeding it kills the run),
    `max_processes` tasks, `max_file_mb` per file (RLIMIT_FSIZE), `disk_mb` for the whole work dir (a tmpfs).
    `files` are written into the work dir (the cwd) first; `env` adds variables to the minimal environment.
    `namespaces=False` skips the kernel namespaces (testing the fallbacks). Raises SandboxError only when the
    sandbox itself cannot be set up.
    """
    if not sys.platform.startswith("linux"):
        raise SandboxError("ossrl.sandbox needs Linux (namespaces, rlimits, /proc)")
    python = os.path.abspath(python or sys.executable)
    cpu_limit = max(1, math.ceil(cpu_time_s if cpu_time_s is not None else timeout_s))
    is_root = os.geteuid() == 0
    uid, gid = _pick_ids(uid_range) if is_root else (os.getuid(), os.getgid())
    if not is_root:
        _warn_once("root", "not root: the program runs under our own uid (a user namespace may still isolate it)")
    root = Path(tempfile.mkdtemp(prefix="ossrl-sbx-"))
    status_r = status_w = -1
    try:
        root.chmod(0o711)  # the child may traverse it, other users may not list it
        main_py, work = root / "main.py", root / "work"
        main_py.write_bytes(code.encode("utf-8", "surrogateescape"))
        work.mkdir(mode=0o700)
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
        cfg = {
            "status_fd": status_w,
            "namespaces": namespaces,
            "uid": uid,
            "gid": gid,
            "drop_privileges": is_root,
            "workdir": str(work),
            "expose": _expose_list(python, str(root)),
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
        io: _Io | None = None
        try:
            io = _pump(proc, status_r, stdin_bytes or b"", start + timeout_s, max_output_bytes)
        finally:
            status = _parse_status(io.status if io else b"")
            isolation = next((tuple(m["isolation"]) for m in status if "isolation" in m), ())
            stray_uid = uid if is_root and "pidns" not in isolation and not (io and io.finished) else None
            _kill_everything(proc, stray_uid)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(root, ignore_errors=True)
    return _result(io, status, isolation, cpu_limit, start)


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


def _result(io: _Io, status: list[dict], isolation: tuple[str, ...], cpu_limit: int, start: float) -> SandboxResult:
    end = next((m for m in status if "exit" in m or "signal" in m), None)
    errors = [m["error"] for m in status if "error" in m]
    if errors and not io.timed_out:
        hint = ""
        if "PermissionError" in errors[-1] and "uid" in isolation:
            hint = " (the interpreter must be reachable by an unprivileged uid without a mount namespace: pass python=)"
        raise SandboxError("; ".join(errors) + hint)
    for m in status:
        if "warning" in m:
            _warn_once(m["warning"].split(":")[0], m["warning"])
    for name, why in (
        ("netns", "no network namespace: sockets are blocked by an audit hook (best effort)"),
        ("pidns", "no pid namespace: leftover processes are killed by uid / process group"),
        ("rofs", "no read-only root: writes outside the work dir are stopped by uid and an audit hook only"),
    ):
        if isolation and name not in isolation:
            _warn_once(name, why)
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
    )
    return SandboxResult(
        ok=kind is None,
        stdout=io.stdout.decode(errors="replace"),
        stderr=io.stderr.decode(errors="replace"),
        exit_code=None if io.timed_out or io.overflow else (-signum if signum is not None else exit_code),
        error_kind=kind,
        wall_time_s=io.end - start,
        network="netns" if "netns" in isolation else "audit_hook",
        isolation=isolation,
        cpu_time_s=end.get("cpu_s") if end else None,
    )
