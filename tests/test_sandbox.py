"""Hostile-code tests for ossrl.sandbox: every attack must fail inside the sandbox and leave the host untouched.

Assertions do not depend on which isolation mechanism held; `test_fallbacks` forces the fallbacks on purpose (no
namespaces, opted in). The escape attempts are in test_sandbox_attacks.py, the isolation itself (what is active,
refusing without it) in test_sandbox_isolation.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ossrl.sandbox import Sandbox, SandboxResult, run_python, run_python_async

REPO = Path(__file__).resolve().parents[1]
SLACK_S = 1.5  # startup, teardown and a loaded 2-core CI machine


def timed(code: str, **kw) -> tuple[SandboxResult, float]:
    t0 = time.monotonic()
    r = run_python(code, **kw)
    return r, time.monotonic() - t0


def pids_of_uid(uid: int) -> list[int]:
    """Live processes of `uid` (zombies are dead; reaping them is up to the host's init)."""
    out = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and os.stat(f"/proc/{p}").st_uid == uid:
                if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(p))
        except OSError:
            pass
    return out


def cmdline_pids(marker: str) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and marker in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"):
                out.append(int(p))
        except OSError:
            pass
    return out


def unprivileged_python() -> str | None:
    """An interpreter an unprivileged uid can reach without a mount namespace (pyenv under /root is not one)."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        path = Path(cand)
        if not path.exists():
            continue
        dirs = [*Path(os.path.realpath(cand)).parents, *path.parents]
        if all(d.stat().st_mode & stat.S_IXOTH for d in dirs) and os.stat(os.path.realpath(cand)).st_mode & 0o005:
            return cand
    return None


@pytest.fixture
def sentinel():
    """A host process the sandboxed code will try to kill."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    assert alive, "a host process was killed from inside the sandbox"


# ---------------------------------------------------------------- normal programs


def test_normal_program_stdin_files_stdout():
    code = (
        "import sys, os, helper\n"
        "data = sys.stdin.read()\n"
        "print(data.upper(), end='')\n"
        "print(open('in/data.txt').read(), open('blob.bin', 'rb').read(), helper.X)\n"
        "open('out.txt', 'w').write('written')\n"
        "print(open('out.txt').read(), os.getcwd() == os.environ['HOME'])\n"
        "print('to stderr', file=sys.stderr)\n"
    )
    files = {"in/data.txt": "hello", "blob.bin": b"\x00\xff", "helper.py": "X = 42"}
    r = run_python(code, stdin="abc\n", files=files, timeout_s=10)
    assert r.ok and r.error_kind is None and r.exit_code == 0, r
    assert r.stdout == "ABC\nhello b'\\x00\\xff' 42\nwritten True\n"
    assert r.stderr == "to stderr\n"
    assert r.network in ("netns", "audit_hook") and r.wall_time_s < 10
    print("isolation that held:", r.isolation, "network:", r.network)


def test_large_stdin_and_site_packages():
    r = run_python("import sys, json; print(len(sys.stdin.read())); print(json.dumps([1]))", stdin="x" * 3_000_000)
    assert r.ok and r.stdout == "3000000\n[1]\n", r


@pytest.mark.parametrize(
    ("code", "kind", "exit_code", "needle"),
    [
        ("x = (", "syntax", None, "SyntaxError"),
        ("def f(:\n  pass", "syntax", None, "SyntaxError"),
        ("print('before', flush=True)\n1 / 0", "runtime", 1, "ZeroDivisionError"),
        ("import sys; sys.exit(3)", "runtime", 3, ""),
        ("import sys; sys.exit(0)", None, 0, ""),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed", -signal.SIGKILL, ""),
        ("import os; os.abort()", "killed", -signal.SIGABRT, ""),
    ],
)
def test_error_kinds(code, kind, exit_code, needle):
    r = run_python(code, timeout_s=10)
    assert r.error_kind == kind and r.ok == (kind is None), r
    if exit_code is not None:
        assert r.exit_code == exit_code
    assert needle in r.stderr
    if kind == "runtime" and needle:
        assert 'File "main.py", line 2' in r.stderr and r.stdout == "before\n"  # the user's traceback, not ours


# ---------------------------------------------------------------- resource exhaustion


def test_infinite_loop_wall_timeout():
    r, elapsed = timed("while True:\n    pass", timeout_s=1.5)
    assert r.error_kind == "timeout" and not r.ok and r.exit_code is None, r
    assert elapsed < 1.5 + SLACK_S


def test_sleep_forever_wall_timeout():
    r, elapsed = timed("import time\nprint('start', flush=True)\ntime.sleep(1000)", timeout_s=1.0)
    assert r.error_kind == "timeout" and r.stdout == "start\n", r
    assert elapsed < 1.0 + SLACK_S


def test_cpu_time_limit():
    # SIGXCPU ignored: the hard limit (soft + 1 s) SIGKILLs it; still "timeout", well before the wall deadline.
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass"
    r, elapsed = timed(code, timeout_s=20, cpu_time_s=1)
    assert r.error_kind == "timeout", r
    assert elapsed < 2 + SLACK_S + 1


def test_fork_bomb():
    code = "import os\nprint(os.getuid(), flush=True)\nwhile True:\n    try:\n        os.fork()\n"
    code += "    except OSError:\n        pass\n"
    r, elapsed = timed(code, timeout_s=2, max_processes=32)
    assert r.error_kind == "timeout", r
    assert elapsed < 2 + SLACK_S + 1
    uid = int(r.stdout.split()[0])
    if uid != os.getuid():  # a run-private uid: not one of its processes may survive
        time.sleep(0.2)
        assert pids_of_uid(uid) == []
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(8 << 30)", "chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))", "' ' * (1 << 40)"],
)
def test_memory_bomb(code):
    r, elapsed = timed(code, timeout_s=10, memory_mb=512)
    assert r.error_kind == "memory" and "MemoryError" in r.stderr, r
    assert elapsed < 10


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood(stream):
    code = f"import sys\nfor _ in range(1000):\n    sys.{stream}.write('x' * 1_000_000)\n"  # 1 GB
    r, elapsed = timed(code, timeout_s=20, max_output_bytes=100_000)
    assert r.error_kind == "output_limit" and r.exit_code is None, r
    assert len(getattr(r, stream)) == 100_000
    assert elapsed < 5


def test_big_file_and_disk_limits():
    r = run_python("open('big', 'wb').write(b'x' * (20 << 20))", max_file_mb=8)
    assert r.error_kind == "runtime" and ("File too large" in r.stderr or "No space" in r.stderr), r


# ---------------------------------------------------------------- escapes


NET_CODE = """
import socket
for addr in [("127.0.0.1", {port}), ("1.1.1.1", 80), ("8.8.8.8", 53)]:
    try:
        s = socket.create_connection(addr, timeout=1)
        print("CONNECTED", addr)
    except Exception as e:
        print("blocked", addr, type(e).__name__)
try:
    print("RESOLVED", socket.gethostbyname("pypi.org"))
except Exception as e:
    print("blocked dns", type(e).__name__)
"""


def test_network_blocked():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        r, elapsed = timed(NET_CODE.format(port=server.getsockname()[1]), timeout_s=10)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected to the host's listener
    assert "CONNECTED" not in r.stdout and "RESOLVED" not in r.stdout, r
    assert r.stdout.count("blocked") == 4 or r.error_kind == "runtime", r  # audit hook: the first attempt raises
    assert elapsed < 10


def test_write_outside_workdir_fails():
    name = f"ossrl_sandbox_escape_{uuid.uuid4().hex}"
    targets = [REPO / name, Path("/tmp") / name, REPO / "ossrl" / name]
    code = "import os\nfor p in {targets!r}:\n    try:\n        open(p, 'w').write('pwned'); print('WROTE', p)\n"
    code += "    except OSError as e:\n        print('failed', type(e).__name__)\n"
    code += "os.makedirs('inside/ok'); open('inside/ok/f', 'w').write('fine'); print('inside ok')\n"
    r = run_python(code.format(targets=[str(t) for t in targets]))
    assert "WROTE" not in r.stdout and r.stdout.count("failed") == 3 and "inside ok" in r.stdout, r
    assert not any(t.exists() for t in targets)


def test_environment_not_inherited(monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("OSSRL_TEST_SECRET", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    code = (
        "import os, glob\nprint(sorted(os.environ))\nprint(os.environ.get('OSSRL_TEST_SECRET'))\n"
        "for p in ['/proc/1/environ', f'/proc/{os.getppid()}/environ', *glob.glob('/proc/*/environ')]:\n"
        "    try:\n        print(open(p, 'rb').read())\n    except OSError:\n        pass\n"
    )
    r = run_python(code, env={"EXTRA": "1"})
    assert r.ok, r
    assert secret not in r.stdout + r.stderr
    keys = eval(r.stdout.splitlines()[0])
    assert "OSSRL_TEST_SECRET" not in keys and "HF_TOKEN" not in keys and "PATH" in keys and "EXTRA" in keys
    assert set(keys) <= {"PATH", "HOME", "TMPDIR", "LANG", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"} | {
        "MKL_NUM_THREADS",
        "EXTRA",
        "LC_CTYPE",  # Python's C-locale coercion may add it
    }


def test_cannot_kill_host(sentinel):
    host = os.getpid()
    attempts = [
        "import os\ntry:\n    os.kill(os.getppid(), 9)\nexcept OSError as e:\n    print('failed', e)\n",
        f"import os\nfor pid in ({host}, {sentinel.pid}, 1):\n    try:\n        os.kill(pid, 9)\n"
        "    except OSError as e:\n        print('failed', e)\n",
        f"import os\ntry:\n    os.killpg({os.getpgid(0)}, 9)\nexcept OSError as e:\n    print('failed', e)\n",
        "import os\nos.killpg(os.getpgid(0), 9)\n",
        "import os\nos.system('kill -9 -1')\nprint('survived')\n",
        "import os\nos.kill(-1, 9)\nprint('survived')\n",
    ]
    for code in attempts:
        r, elapsed = timed(code, timeout_s=5)
        assert r.error_kind in (None, "killed", "runtime"), r
        assert elapsed < 5
    assert os.getpid() == host and sentinel.poll() is None


def test_background_process_is_gone():
    marker = f"{time.time() % 1000:.6f}"  # unique argument for `sleep`, findable in /proc/*/cmdline
    code = (
        "import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execvp('sleep', ['sleep', '{marker}'])\n    os._exit(0)\n"
        "import time; time.sleep(0.3)\nprint('main done', flush=True)\n"
    )
    r, elapsed = timed(code, timeout_s=10)
    assert r.ok and r.stdout == "main done\n", r
    assert elapsed < 5
    time.sleep(0.2)
    assert cmdline_pids(marker) == []


def test_background_process_gone_after_timeout():
    marker = f"{time.time() % 1000:.6f}"
    code = (
        "import os\nif os.fork() == 0:\n    os.setsid()\n"
        f"    os.execvp('sleep', ['sleep', '{marker}'])\nwhile True:\n    pass\n"
    )
    r, _ = timed(code, timeout_s=1)
    assert r.error_kind == "timeout", r
    time.sleep(0.2)
    assert cmdline_pids(marker) == []


def test_temp_dir_removed(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"  # ours alone: other processes on this host run sandboxes in /tmp at the same time
    tmp.mkdir(mode=0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    r = run_python("import os\nopen('x', 'w').write('x')\nos.mkdir('d')\nos.chmod('d', 0)\nprint(os.getcwd())")
    assert r.ok, r
    cwd = Path(r.stdout.strip())
    assert cwd.is_relative_to(tmp) and not cwd.exists() and not cwd.parent.exists()
    r = run_python("while True: pass", timeout_s=0.5)
    assert list(tmp.iterdir()) == []


# ---------------------------------------------------------------- fallbacks and concurrency


def test_fallbacks(sentinel):
    """No namespaces: uid separation, audit hooks and kill-by-uid must still hold (as root)."""
    python = unprivileged_python()
    if python is None or os.geteuid() != 0:
        pytest.skip("needs root and an interpreter reachable by an unprivileged uid")
    kw = {"namespaces": False, "python": python, "site_packages": False, "timeout_s": 5, "allow_unisolated": True}
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)", **kw)
    assert r.network == "audit_hook" and r.error_kind == "runtime" and "PermissionError" in r.stderr, r
    target = Path("/tmp") / f"ossrl_sandbox_escape_{uuid.uuid4().hex}"
    r = run_python(f"open({str(target)!r}, 'w').write('x')", **kw)
    assert r.error_kind == "runtime" and not target.exists(), r
    r = run_python(f"import os\nos.kill({sentinel.pid}, 9)", **kw)
    assert r.error_kind == "runtime" and "PermissionError" in r.stderr, r
    daemon = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    print(os.getuid(), flush=True)\n"
    daemon += "    time.sleep(60)\n    os._exit(0)\ntime.sleep(0.3)\n"
    r = run_python(daemon, **kw)
    assert r.ok, r
    time.sleep(0.2)
    assert pids_of_uid(int(r.stdout)) == []  # the daemon was killed by its run-private uid


def test_concurrent_async_runs():
    async def main() -> list[SandboxResult]:
        async with Sandbox(max_concurrency=4, timeout_s=10) as sb:
            jobs = [sb.run("import sys\nprint(int(sys.stdin.read()) * 2)", stdin=str(i)) for i in range(10)]
            jobs.append(sb.run("while True: pass", timeout_s=2))
            jobs.append(sb.run("x = (", timeout_s=2))
            jobs.append(run_python_async("print('default pool')"))
            return await asyncio.gather(*jobs)

    t0 = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert [r.stdout for r in results[:10]] == [f"{2 * i}\n" for i in range(10)]
    assert all(r.ok for r in results[:10])
    assert results[10].error_kind == "timeout" and results[11].error_kind == "syntax"
    assert results[12].stdout == "default pool\n"
    assert elapsed < 15


def test_invalid_file_names():
    for name in ("/etc/passwd", "../escape", ""):
        with pytest.raises(ValueError):
            run_python("pass", files={name: "x"})
