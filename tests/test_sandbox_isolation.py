"""ossrl.sandbox's isolation as a whole: what a run reports as active, refusing to run without a protection unless
the caller opts in, the per-run cgroup, the seccomp filter's numbers and behaviour, the private root's contents.
The attacks themselves are in test_sandbox_attacks.py."""

from __future__ import annotations

import ctypes
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from ossrl.sandbox import SandboxError, run_python
from ossrl.sandbox import _confine as confine
from ossrl.sandbox.cgroup import PREFIX, _hierarchies
from ossrl.sandbox.result import REQUIRED

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the full sandbox needs root (or user namespaces + a cgroup)")
FULL = {*REQUIRED, "uid", "groups", "utsns", "proc", "rlimits"}
# Without a mount namespace the run-private uid must reach the interpreter by itself (pyenv under /root cannot).
SYSTEM_PY = {"python": "/usr/bin/python3", "site_packages": False}
needs_system_py = pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs /usr/bin/python3")


def our_cgroups() -> list[str]:
    """Run cgroups this process made that still exist."""
    out = []
    for parent in set(_hierarchies().values()):
        try:
            out += [n for n in os.listdir(parent) if n.startswith(f"{PREFIX}{os.getpid()}-")]
        except OSError:
            pass
    return out


@needs_root
def test_protections_reported_and_cgroups_removed():
    r = run_python("print('hi')")
    assert r.ok and r.stdout == "hi\n", r
    assert FULL <= set(r.protections) and r.missing == (), r
    assert r.isolation == r.protections  # the earlier name still reads
    assert our_cgroups() == []


@needs_root
def test_private_root_contents():
    code = (
        "import os, sys\n"
        "print(sorted(os.listdir('/dev')))\n"
        "print(sorted(os.listdir('/etc')))\n"
        "print(open('/etc/passwd').read().count('\\n'), os.uname().nodename)\n"
        "print(os.path.expanduser('~') == os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'])\n"
        "import json, sqlite3, ssl, multiprocessing as mp\n"  # the runtime's own modules and C extensions load
        "with mp.Pool(2) as pool:\n    print(pool.map(abs, [-1, -2]))\n"
        "import subprocess\n"
        "print(subprocess.run(['sh', '-c', 'echo $((6*7))'], capture_output=True, text=True).stdout)\n"
        "a, b = __import__('socket').socketpair()\na.send(b'x')\nprint(b.recv(1))\n"
        "open('/dev/shm/x', 'w').write('shm ok')\nprint(open('/dev/shm/x').read())\n"
    )
    r = run_python(code, timeout_s=20)
    assert r.ok, r
    lines = r.stdout.splitlines()
    assert eval(lines[0]) == ["fd", "null", "shm", "stderr", "stdin", "stdout", "urandom", "zero"]
    assert set(eval(lines[1])) <= {"passwd", "group", "hostname", "hosts", "nsswitch.conf", "ld.so.cache", "localtime"}
    assert lines[2] == "2 sandbox" and lines[3] == "True"
    assert lines[4:] == ["[1, 2]", "42", "", "b'x'", "shm ok"]


@needs_root
@needs_system_py
def test_refuses_without_namespaces_unless_opted_in(monkeypatch):
    with pytest.raises(SandboxError, match=r"refusing to run untrusted code without pidns, netns, mntns, ipcns"):
        run_python("print('ran')", namespaces=False, **SYSTEM_PY)
    for how in ("argument", "environment"):
        kw = {"allow_unisolated": True} if how == "argument" else {}
        if how == "environment":
            monkeypatch.setenv("OSSRL_SANDBOX_ALLOW_UNISOLATED", "1")
        r = run_python("print('ran')", namespaces=False, **SYSTEM_PY, **kw)
        assert r.ok and r.stdout == "ran\n", r
        assert {"pidns", "netns", "mntns", "ipcns", "pivot_root"} <= set(r.missing), r
        assert {"cgroup", "uid", "seccomp", "landlock"} <= set(r.protections), r
    monkeypatch.setenv("OSSRL_SANDBOX_ALLOW_UNISOLATED", "0")
    with pytest.raises(SandboxError):
        run_python("print('ran')", namespaces=False, **SYSTEM_PY)
    r = run_python("print('ran')", namespaces=False, allow_unisolated=True, **SYSTEM_PY)  # the argument wins
    assert r.ok


@needs_root
@needs_system_py
@pytest.mark.parametrize("protection", ["cgroup", "seccomp", "keyring", "pivot_root"])
def test_each_required_protection_refuses_when_missing(protection):
    kw = SYSTEM_PY if protection == "pivot_root" else {}  # no private root: the uid must reach python by itself
    with pytest.raises(SandboxError, match=f"without {protection} "):
        run_python("print('ran')", _disable=(protection,), **kw)
    r = run_python("print('ran')", _disable=(protection,), allow_unisolated=True, **kw)
    assert r.ok and r.stdout == "ran\n" and r.missing == (protection,), r
    assert protection not in r.protections


@needs_root
@needs_system_py
def test_landlock_alone_holds_files_without_the_private_root():
    """pivot_root off (opted in): Landlock still keeps reads to the runtime and writes to the work dir."""
    code = (
        f"for p in ['{Path(__file__).resolve()}', '/etc/hostname', '/root/.bashrc']:\n"
        "    try:\n        open(p).read(1)\n        print('READ', p)\n"
        "    except OSError as e:\n        print('no', e.errno)\n"
        "open('here', 'w').write('x')\nprint('work ok')\n"
    )
    r = run_python(code, _disable=("pivot_root",), allow_unisolated=True, **SYSTEM_PY)
    assert r.ok and "READ" not in r.stdout and "work ok" in r.stdout, r
    assert "landlock" in r.protections and "pivot_root" in r.missing


@needs_root
def test_memory_limit_covers_the_tree_and_reads_as_memory():
    code = (
        "import os, time\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
        "        x = b'\\x01' * (100 << 20)\n        time.sleep(1)\n        os._exit(0)\n    kids.append(pid)\n"
        "killed = [os.WIFSIGNALED(os.waitpid(k, 0)[1]) for k in kids]\n"
        "raise SystemExit(1 if any(killed) else 0)\n"
    )
    r = run_python(code, memory_mb=200, timeout_s=20)
    assert r.error_kind == "memory" and not r.ok, r
    assert our_cgroups() == []


@needs_root
def test_pids_limit_covers_threads_and_processes():
    code = (
        "import os, threading, time\nev = threading.Event()\nn = 0\n"
        "try:\n    for _ in range(100):\n"
        "        threading.Thread(target=ev.wait, daemon=True).start()\n        n += 1\n"
        "except RuntimeError:\n    pass\nprint(n)\nev.set()\n"
    )
    r = run_python(code, max_processes=10)
    assert r.ok and int(r.stdout) < 10, r


@needs_root
@needs_system_py
def test_cgroup_kills_what_outlived_a_run_without_pid_namespace():
    """No pid namespace (opted in): init, the uid hunt and the cgroup each catch the double-forked daemon."""
    code = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        print(os.getpid(), flush=True)\n        time.sleep(60)\n    os._exit(0)\ntime.sleep(0.3)\n"
    )
    r = run_python(code, namespaces=False, allow_unisolated=True, **SYSTEM_PY)
    assert r.ok, r
    pid = int(r.stdout)
    time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    assert our_cgroups() == []


# ---------------------------------------------------------------- the seccomp filter


def _header_numbers(path: str, machine_prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(rf"#define __NR{machine_prefix}_(\w+)\s+(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


@pytest.mark.parametrize(
    ("column", "header", "prefix"),
    [
        (0, "/usr/include/x86_64-linux-gnu/asm/unistd_64.h", ""),
        (1, "/usr/include/asm-generic/unistd.h", r"(?:3264)?"),
    ],
)
def test_syscall_numbers_match_the_kernel_headers(column, header, prefix):
    if not Path(header).exists():
        pytest.skip(f"{header} not installed")
    numbers = _header_numbers(header, prefix)
    for name, nums in confine.SYSCALLS.items():
        want = numbers.get(name)
        assert nums[column] == want, (name, nums[column], want)


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_program_assembles(machine):
    for allow_unix in (False, True):
        prog = confine.seccomp_program(machine, allow_unix)
        assert len(prog) % 8 == 0 and 0 < len(prog) // 8 < 4096


def _in_child(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(confine.arch() is None, reason="no seccomp table for this architecture")
def test_seccomp_filter_behaviour():
    """What stays usable and what is gone, in a child with the filter on."""

    def child() -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)
        if not confine.apply_seccomp(allow_unix=False):
            return 2
        checks = []
        a, b = socket.socketpair()  # AF_UNIX pairs (asyncio, multiprocessing) still work
        checks.append(a.send(b"x") == 1 and b.recv(1) == b"x")
        socket.socket(socket.AF_INET).close()
        for family in (socket.AF_UNIX, 40, 16, 17, 38):  # unix (when not pivoted), vsock, netlink, packet, alg
            try:
                socket.socket(family, socket.SOCK_STREAM if family != 16 else socket.SOCK_RAW)
                checks.append(False)
            except OSError as e:
                checks.append(e.errno == 1)
        for name, args in (("unshare", (0x10000000,)), ("io_uring_setup", (1, 0)), ("ptrace", (0, 0, 0, 0))):
            checks.append(libc.syscall(confine.nr(name), *args) == -1 and ctypes.get_errno() == 1)
        checks.append(libc.syscall(confine.nr("clone3"), 0, 0) == -1 and ctypes.get_errno() == 38)  # ENOSYS
        pid = os.fork()  # plain fork, threads and exec keep working
        if pid == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import threading; threading.Thread().start()"])
        checks.append(os.waitpid(pid, 0)[1] == 0)
        return 0 if all(checks) else 10 + checks.index(False)

    assert _in_child(child) == 0


@needs_root
@needs_system_py
def test_symlinks_left_in_a_host_work_dir_do_not_steer_cleanup(tmp_path):
    """No private root (opted in): the work dir is on the host; links and locked dirs in it are removed, never
    followed out of it."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    victim.chmod(0o777)
    code = (
        f"import ctypes, os\nlibc = ctypes.CDLL(None)\nlibc.symlink({str(victim).encode()!r}, b'link')\n"
        "libc.symlink(b'/', b'root')\n"
        "os.mkdir('locked')\nopen('locked/f', 'w').write('x')\nos.chmod('locked', 0)\n"
    )
    r = run_python(code, _disable=("pivot_root",), allow_unisolated=True, **SYSTEM_PY)
    assert r.ok, r
    assert (victim / "keep").read_text() == "x" and victim.stat().st_mode & 0o777 == 0o777


@needs_root
def test_run_dies_with_its_host_process():
    """The host process (a trainer) is killed mid-run: the launcher, init and the program go with it."""
    marker = f"{100_000 + os.getpid() % 100_000}.{time.monotonic_ns() % 10**9:09d}"  # seconds, for `sleep`
    code = f"import os\nos.execvp('sleep', ['sleep', '{marker}'])\n"
    pid = os.fork()
    if pid == 0:
        try:
            run_python(code, timeout_s=60)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 10
    while not _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _marked(marker), "the program never started"
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 3
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _marked(marker)


def _marked(marker: str) -> bool:
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and marker.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            pass
    return False


def test_cgroup_v2_group_is_made_with_its_limits(tmp_path, monkeypatch):
    """The v2 path on a stand-in tree (this host may only have v1): limits written, controllers enabled."""
    from ossrl.sandbox import cgroup as cg

    parent = tmp_path / "user.slice"
    parent.mkdir()
    (parent / "cgroup.subtree_control").write_text("cpu\n")
    monkeypatch.setattr(cg, "_hierarchies", lambda: {"v2": str(parent)})
    group, why = cg.RunCgroup.create(256 << 20, 32)
    assert group is not None and why == "" and group.version == 2, why
    (d,) = group.dirs
    assert Path(d).parent == parent and Path(d).name.startswith(f"{PREFIX}{os.getpid()}-")
    assert (Path(d) / "memory.max").read_text() == str(256 << 20) and (Path(d) / "pids.max").read_text() == "32"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert group.procs_files == [f"{d}/cgroup.procs"]
    (Path(d) / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    assert group.oom_kills() == 2


def test_cgroup_absent_is_explained(monkeypatch):
    from ossrl.sandbox import cgroup as cg

    monkeypatch.setattr(cg, "_hierarchies", lambda: {})
    assert cg.RunCgroup.create(1 << 20, 4) == (None, "no cgroup hierarchy with memory and pids")
