"""Sandbox escapes, written as attacks: each program prints `ESCAPED <what>` when it got through, `HELD <what>`
when the sandbox stopped it. Every attack must hold; the host-side checks (files, processes, sockets, cgroups)
confirm what the program cannot see itself.

Attacks that need the host to set something up first (a listening socket, a FIFO, a key, a sentinel process) are
test functions below the table. x86-64 syscall numbers; the raw-syscall attacks are skipped elsewhere.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ossrl.sandbox import SandboxResult, run_python

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
X86_64 = platform.machine() == "x86_64"
TOKEN = f"ossrl-secret-{uuid.uuid4().hex}"  # a secret the host holds in several places; no attack may print it
TAG = f"ossrl-attack-{uuid.uuid4().hex[:12]}"  # names of host files the attacks aim at
SECRET_FILE = Path("/tmp") / f"{TAG}.txt"
# Directories on the way to the interpreter exist inside (empty but for the runtime); any other host name is a leak.
RUNTIME_PARTS = {part for p in (sys.prefix, sys.base_prefix, sys.executable) for part in Path(p).parts}
RUNTIME_PARTS |= {part for p in (sys.prefix, sys.base_prefix) for part in Path(os.path.realpath(p)).parts}


@pytest.fixture(scope="module", autouse=True)
def host_secrets():
    """The token in a world-readable /tmp file and in this process's environment."""
    SECRET_FILE.write_text(TOKEN)
    SECRET_FILE.chmod(0o644)
    os.environ["OSSRL_ATTACK_SECRET"] = TOKEN
    yield
    os.environ.pop("OSSRL_ATTACK_SECRET", None)
    SECRET_FILE.unlink(missing_ok=True)


PRELUDE = r"""
import ctypes, errno, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)

def sc(nr, *args):
    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    r = libc.syscall(ctypes.c_long(nr), *args)
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r

def attempt(what, fn):
    try:
        got = fn()
    except BaseException as e:
        print("HELD", what, type(e).__name__, str(e)[:100], flush=True)
        return False
    print("ESCAPED" if got else "HELD", what, repr(got)[:200] if got else "(no effect)", flush=True)
    return bool(got)
"""


def _sha(path: Path | str) -> str | None:
    if Path(path) == SECRET_FILE:  # written by the fixture, after the table below is built
        return hashlib.sha256(TOKEN.encode()).hexdigest()
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def read_files(*paths: Path | str) -> str:
    """ESCAPED when the program reads a host file's exact content."""
    targets = {str(p): s for p in paths if (s := _sha(p)) is not None}
    return PRELUDE + (
        "import hashlib\n"
        f"for p, want in {targets!r}.items():\n"
        "    attempt('read ' + p, lambda p=p, want=want: hashlib.sha256(open(p, 'rb').read()).hexdigest() == want)\n"
    )


def list_dirs(*paths: str) -> str:
    """ESCAPED when the program sees any host entry of these directories (runtime path components excepted)."""
    host = {}
    for p in paths:
        try:
            host[p] = sorted(set(os.listdir(p)) - RUNTIME_PARTS - {n for n in os.listdir(p) if "ossrl-sbx" in n})
        except OSError:
            pass
    return PRELUDE + (
        f"for p, names in {host!r}.items():\n"
        "    attempt('list ' + p, lambda p=p, names=names: sorted(set(os.listdir(p)) & set(names)))\n"
    )


@dataclass
class Attack:
    name: str
    code: str
    kw: dict = field(default_factory=dict)
    kinds: tuple = (None, "runtime")  # how the run may end
    x86: bool = False  # raw x86-64 syscall numbers / machine code
    slow: bool = False
    host_check: Callable[[], object] | None = None  # after the run, on the host: truthy = the attack got through


def _first_file(root: Path) -> Path | None:
    """A data file (the gold answers the retool tool once read), else any file."""
    found = sorted(Path(d) / f for d, _, files in os.walk(root) for f in files)
    return next((p for p in found if p.suffix in (".jsonl", ".json", ".parquet")), found[0] if found else None)


SHARED_TARGETS = tuple(p for p in (_first_file(SHARED / "data"), SHARED / "DESIGN.md") if p and p.is_file()) or (
    REPO / "examples" / "custom_task" / "data.jsonl",
)
MEMORY_CHILDREN = (
    PRELUDE
    + r"""
# 6 children x 120 MB with memory_mb=300: rlimits are per process, only a cgroup caps the tree.
r, w = os.pipe()
kids = []
for i in range(6):
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            block = b"\x01" * (120 << 20)
            os.write(w, b"x")
            time.sleep(10)
        finally:
            os._exit(0)
    kids.append(pid)
os.close(w)
os.set_blocking(r, False)
held, end = 0, time.time() + 4
while time.time() < end and held < 6:
    try:
        chunk = os.read(r, 16)
    except BlockingIOError:
        time.sleep(0.05)
        continue
    if not chunk:
        break
    held += len(chunk)
time.sleep(0.5)
alive = sum(1 for k in kids if os.waitpid(k, os.WNOHANG) == (0, 0))
held_mb = alive * 120
attempt("6 x 120 MB across children under memory_mb=300", lambda: held_mb > 300 and f"{alive} children: {held_mb} MB")
for k in kids:
    try:
        os.kill(k, 9)
    except OSError:
        pass
"""
)

MEMORY_MEMFD = (
    PRELUDE
    + r"""
# memfd pages are not in the address space: RLIMIT_AS does not see them.
total = 0
fds = []
try:
    for i in range(6):
        fd = os.memfd_create(f"m{i}")
        fds.append(fd)
        for _ in range(60):
            os.write(fd, b"\x01" * (1 << 20))
            total += 1
except OSError as e:
    print("stopped", e)
attempt("memfd: 360 MB under memory_mb=200", lambda: total > 200 and f"{total} MB")
"""
)

MEMORY_TMPFS = (
    PRELUDE
    + r"""
# The work dir is a tmpfs (RAM): its files are memory too.
total = 0
try:
    for i in range(6):
        with open(f"f{i}", "wb") as f:
            for _ in range(60):
                f.write(b"\x01" * (1 << 20))
                f.flush()
                total += 1
except OSError as e:
    print("stopped", e)
attempt("work-dir files: 360 MB under memory_mb=200", lambda: total > 200 and f"{total} MB")
"""
)

FORK_HOLD = (
    PRELUDE
    + r"""
kids = []
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    kids.append(pid)
attempt("200 processes under max_processes=16", lambda: len(kids) > 16 and f"{len(kids)} children")
for k in kids:
    os.kill(k, 9)
"""
)

THREAD_HOLD = (
    PRELUDE
    + r"""
import threading
ev, n = threading.Event(), 0
try:
    for _ in range(200):
        threading.Thread(target=ev.wait, daemon=True).start()
        n += 1
except RuntimeError as e:
    print("stopped", e)
attempt("200 threads under max_processes=16", lambda: n > 16 and f"{n} threads")
ev.set()
"""
)

PROC_SECRETS = (
    PRELUDE
    + f"""
import glob
def scan():
    hits = []
    for p in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline') + ['/proc/1/environ']:
        try:
            if {TOKEN[::-1]!r}[::-1].encode() in open(p, 'rb').read():
                hits.append(p)
        except OSError:
            pass
    return hits
attempt('host secret in /proc/*/environ', scan)
attempt('host secret in my environment', lambda: {TOKEN[::-1]!r}[::-1] in repr(dict(os.environ)))
attempt('host pid {os.getpid()} visible', lambda: open('/proc/{os.getpid()}/environ', 'rb').read())
"""
)

PROC_ROOT = read_files(*[f"/proc/{n}/root{REPO}/README.md" for n in (1, 2, 3, "self")]) + (
    f"attempt('host fs via /proc/1/cwd', lambda: os.listdir('/proc/1/cwd/{REPO}'))\n"
    "attempt('init\\'s fds', lambda: os.listdir('/proc/1/fd'))\n"
)

SYMLINK = (
    PRELUDE
    + f"""
import hashlib
want = {_sha(REPO / "README.md")!r}
os.symlink({str(REPO / "README.md")!r}, 'link')
os.symlink('/', 'root')
attempt('symlink to a host file', lambda: hashlib.sha256(open('link', 'rb').read()).hexdigest() == want)
runtime = {sorted(RUNTIME_PARTS)!r}
attempt('symlink to / then the project', lambda: sorted(set(os.listdir('root' + {str(REPO)!r})) - set(runtime)))
attempt('hard link to a host file', lambda: os.link({str(REPO / "README.md")!r}, 'hard') or open('hard').read())
"""
)

WRITE_TARGETS = [f"/tmp/{TAG}.w", str(REPO / f"{TAG}.w"), f"/etc/{TAG}.w", f"/{TAG}.w", f"{sys.prefix}/{TAG}.w"]
WRITE_TARGETS += [f"{sysconfig.get_paths()['purelib']}/{TAG}.py", f"{sys.base_prefix}/{TAG}.w"]
WRITE_OUTSIDE = (
    PRELUDE
    + f"""
for t in {WRITE_TARGETS!r}:
    attempt('write ' + t, lambda t=t: open(t, 'w').write('x') == 1)
attempt('remount / read-write', lambda: libc.mount(None, b'/', None, ctypes.c_ulong(32), None) == 0)
open('/dev/shm/{TAG}.w', 'w').write('private')  # the run's own /dev/shm: allowed, and not the host's
"""
)

DEV_NODES = (
    PRELUDE
    + r"""
ok = {"null", "zero", "urandom", "shm", "fd", "stdin", "stdout", "stderr", "pts", "mqueue"}
attempt('host devices listed in /dev', lambda: sorted(set(os.listdir('/dev')) - ok))
for d in ['kmsg', 'vsock', 'kvm', 'fuse', 'net/tun', 'userfaultfd', 'vda', 'mem', 'port', 'console', 'ttyS0',
          'loop0', 'zram0', 'ptmx', 'tty', 'full', 'random']:
    attempt('open /dev/' + d, lambda d=d: os.close(os.open('/dev/' + d, os.O_RDONLY | os.O_NONBLOCK)) is None)
"""
)

IO_URING = (
    PRELUDE
    + r"""
params = ctypes.create_string_buffer(120)
attempt('io_uring_setup', lambda: sc(425, 8, params) >= 0)
attempt('io_uring_register on fd 0', lambda: sc(427, 0, 0, 0, 0) >= 0 or True)
"""
)

USERNS = (
    PRELUDE
    + r"""
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
def userns_then_mount():
    pid = os.fork()
    if pid == 0:
        try:
            sc(272, CLONE_NEWUSER | CLONE_NEWNS)
            os._exit(0 if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0 else 2)
        except OSError:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0
def unshare_userns():
    pid = os.fork()
    if pid == 0:
        try:
            sc(272, CLONE_NEWUSER)
            os._exit(0)
        except OSError:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0
def clone_newuser():
    pid = sc(56, CLONE_NEWUSER | 17, 0, 0, 0, 0)  # raw clone: like fork, in a new user namespace
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0)[1] == 0
attempt('unshare(CLONE_NEWUSER)', unshare_userns)
attempt('unshare(CLONE_NEWUSER|CLONE_NEWNS) + mount tmpfs', userns_then_mount)
attempt('clone(CLONE_NEWUSER)', clone_newuser)
attempt('unshare(CLONE_NEWNET)', lambda: sc(272, 0x40000000) == 0)
attempt('setns into /proc/1/ns/mnt', lambda: sc(308, os.open('/proc/1/ns/mnt', os.O_RDONLY), 0) == 0)
"""
)

PTRACE = (
    PRELUDE
    + r"""
import signal
def attach_child():
    pid = os.fork()
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    try:
        return sc(101, 16, pid, 0, 0) == 0  # PTRACE_ATTACH
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
def traceme():
    pid = os.fork()
    if pid == 0:
        try:
            sc(101, 0, 0, 0, 0)  # PTRACE_TRACEME
            os._exit(0)
        except OSError:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0
def vm_read():
    secret = ctypes.create_string_buffer(b"child secret")
    pid = os.fork()
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    out = ctypes.create_string_buffer(12)
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    local, remote = iovec(ctypes.addressof(out), 12), iovec(ctypes.addressof(secret), 12)
    try:
        return sc(310, pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) == 12 and out.raw
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
attempt('ptrace attach own child', attach_child)
attempt('ptrace traceme', traceme)
attempt('process_vm_readv own child', vm_read)
attempt('ptrace attach pid 1', lambda: sc(101, 16, 1, 0, 0) == 0)
"""
)

KEYCTL = (
    PRELUDE
    + r"""
KEY_SPEC_USER_KEYRING, KEY_SPEC_SESSION_KEYRING = -4, -3
attempt('add_key to the user keyring', lambda: sc(248, b"user", b"k", b"v", 1, KEY_SPEC_USER_KEYRING) > 0)
attempt('keyctl join a session keyring', lambda: sc(250, 1, b"mine") > 0)
attempt('request_key', lambda: sc(249, b"user", b"nothing", None, 0) > 0)
"""
)

KERNEL_MISC = (
    PRELUDE
    + r"""
class PerfAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample", ctypes.c_uint64), ("sample_type", ctypes.c_uint64), ("read_format", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("pad", ctypes.c_uint8 * 64)]
attr = PerfAttr(type=1, size=ctypes.sizeof(PerfAttr), config=0, flags=(1 << 5) | (1 << 6))  # sw cpu clock, user only
attempt('perf_event_open', lambda: sc(298, ctypes.byref(attr), 0, -1, -1, 0) >= 0)
attempt('userfaultfd (user mode only)', lambda: sc(323, 1) >= 0)
attr_bpf = ctypes.create_string_buffer(128)
attempt('bpf(BPF_MAP_CREATE)', lambda: sc(321, 0, attr_bpf, 128) >= 0)
attempt('kexec_load', lambda: sc(246, 0, 0, 0, 0) == 0)
attempt('init_module', lambda: sc(175, 0, 0, b"") == 0)
attempt('mount tmpfs', lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0)
attempt('fsopen tmpfs', lambda: sc(430, b"tmpfs", 0) >= 0)
attempt('chroot', lambda: os.chroot('.') is None)
attempt('setuid(0)', lambda: os.setuid(0) is None)
attempt('setgroups([0])', lambda: os.setgroups([0]) is None)
attempt('supplementary groups', lambda: os.getgroups())
attempt('open_by_handle_at (shocker)', lambda: sc(304, os.open('/', os.O_RDONLY),
        ctypes.create_string_buffer(b"\x08\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00"), 0) >= 0)
attempt('syslog read', lambda: sc(103, 3, ctypes.create_string_buffer(4096), 4096) > 0)
"""
)

I386 = (
    PRELUDE
    + r"""
import mmap
# 32-bit ABI through int 0x80 (different syscall numbers; a filter that does not check the arch misses it):
# push rbx; mov eax, 310 (i386 unshare); mov ebx, CLONE_NEWUSER; int 0x80; pop rbx; ret
code = bytes.fromhex("53b836010000bb00000010cd805bc3")
buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(code)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
fn = ctypes.CFUNCTYPE(ctypes.c_int)(addr)
def run():
    pid = os.fork()
    if pid == 0:
        os._exit(0 if fn() == 0 else 1)
    st = os.waitpid(pid, 0)[1]
    print("child status", st)
    return st == 0
attempt('i386 int 0x80 unshare(CLONE_NEWUSER)', run)
attempt('x32 syscall unshare(CLONE_NEWUSER)', lambda: sc(0x40000000 | 272, 0x10000000) == 0)
"""
)

SOCKETS = (
    PRELUDE
    + r"""
def vsock():
    s = socket.socket(40, socket.SOCK_STREAM)  # AF_VSOCK
    try:
        s.settimeout(1)
        s.connect((2, 52))  # the host (CID 2)
    except OSError as e:
        print("vsock connect:", e)
    return True  # a vsock socket at all: that address family ignores network namespaces
attempt('socket(AF_VSOCK)', vsock)
attempt('socket(AF_NETLINK, NETLINK_ROUTE)', lambda: socket.socket(16, socket.SOCK_RAW, 0) is not None)
attempt('socket(AF_PACKET)', lambda: socket.socket(17, socket.SOCK_RAW, 0) is not None)
attempt('socket(AF_ALG)', lambda: socket.socket(38, socket.SOCK_SEQPACKET, 0) is not None)
attempt('socket(AF_BLUETOOTH)', lambda: socket.socket(31, socket.SOCK_STREAM, 0) is not None)
def outbound():
    for addr in [("1.1.1.1", 80), ("8.8.8.8", 53), ("127.0.0.1", 22)]:
        try:
            socket.create_connection(addr, timeout=1).close()
            return addr
        except OSError:
            pass
attempt('TCP out', outbound)
attempt('DNS', lambda: socket.gethostbyname('pypi.org'))
attempt('host interfaces', lambda: [n for _, n in socket.if_nameindex() if n != 'lo'])
"""
)

CGROUP_ESCAPE = (
    PRELUDE
    + r"""
import glob
for p in glob.glob('/sys/fs/cgroup/**/cgroup.procs', recursive=True)[:50] + ['/sys/fs/cgroup/cgroup.procs']:
    attempt('join ' + p, lambda p=p: open(p, 'w').write('0') and True)
attempt('/sys visible', lambda: os.listdir('/sys'))
"""
)

PROC_KNOBS = (
    PRELUDE
    + r"""
attempt('write core_pattern', lambda: open('/proc/sys/kernel/core_pattern', 'w').write('|/bin/sh') > 0)
attempt('sysrq-trigger', lambda: open('/proc/sysrq-trigger', 'w').write('h') > 0)
attempt('kernel pointers', lambda: [l for l in open('/proc/kallsyms').readlines()[:50] if not l.startswith('00000000')])
attempt('kcore', lambda: open('/proc/kcore', 'rb').read(16))
attempt('raise RLIMIT_NPROC', lambda: __import__('resource').setrlimit(6, (100000, 100000)) is None)
"""
)

PRIV_BINARIES = (
    PRELUDE
    + r"""
import subprocess
def run(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=5)
    except OSError as e:
        print(cmd[0], e)
        return False
    print(cmd, p.returncode, p.stderr[:100])
    return p.returncode == 0
attempt('mount(8) a tmpfs', lambda: run(['mount', '-t', 'tmpfs', 'none', '/tmp']))
attempt('su root', lambda: run(['su', '-c', 'id', 'root']))
attempt('host shell sees /work', lambda: run(['ls', '/work/main/README.md']))
"""
)

FD_AND_STATUS = (
    PRELUDE
    + r"""
attempt('inherited fds', lambda: sorted(int(f) for f in os.listdir('/proc/self/fd')) [3:][:-1])  # last: listdir's own
for fd in range(3, 64):
    try:
        os.write(fd, b'{"exit": 0}\n')
        print("ESCAPED wrote to inherited fd", fd)
    except OSError:
        pass
print('{"exit": 0, "cpu_s": 0}')
raise SystemExit(5)
"""
)

HOSTNAME = PRELUDE + f"attempt('host name', lambda: socket.gethostname() == {socket.gethostname()!r})\n"

ATTACKS = [
    # host files and directories
    # the shared data beside the checkout where there is one (CI's fresh clone has none: the repo's example data)
    Attack("read_shared_data", read_files(*SHARED_TARGETS)),
    Attack(
        "read_project",
        read_files(REPO / "README.md", REPO / "ossrl" / "sandbox" / "runner.py", REPO / "pyproject.toml"),
    ),
    Attack("list_work_and_project", list_dirs("/work", str(REPO), str(REPO.parent))),
    Attack("read_root_home", read_files("/root/.bashrc", "/root/.gitconfig", "/root/.profile") + list_dirs("/root")),
    Attack("list_homes", list_dirs("/home", *(str(p) for p in Path("/home").glob("*")))),
    Attack("read_tmp_secret", read_files(SECRET_FILE) + list_dirs("/tmp")),
    Attack(
        "read_etc",
        read_files("/etc/passwd", "/etc/group", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/etc/os-release"),
    ),
    Attack("proc_environ_and_cmdline", PROC_SECRETS),
    Attack("proc_root_and_cwd", PROC_ROOT),
    Attack("import_the_project", PRELUDE + "attempt('import ossrl', lambda: __import__('ossrl').__file__)\n"),
    Attack("symlink_and_hardlink", SYMLINK),
    Attack("dev_nodes", DEV_NODES),
    Attack("sysfs_and_cgroup_escape", CGROUP_ESCAPE),
    Attack("proc_knobs", PROC_KNOBS),
    # writes
    Attack(
        "write_outside_workdir",
        WRITE_OUTSIDE,
        host_check=lambda: [t for t in [*WRITE_TARGETS, f"/dev/shm/{TAG}.w"] if os.path.lexists(t)],
    ),
    Attack("setuid_binaries", PRIV_BINARIES),
    # resources
    Attack(
        "memory_across_children",
        MEMORY_CHILDREN,
        {"memory_mb": 300, "timeout_s": 20},
        (None, "runtime", "memory", "killed"),
        slow=True,
    ),
    Attack(
        "memory_in_memfds", MEMORY_MEMFD, {"memory_mb": 200, "timeout_s": 20}, (None, "runtime", "memory", "killed")
    ),
    Attack(
        "memory_in_workdir_files",
        MEMORY_TMPFS,
        {"memory_mb": 200, "disk_mb": 512, "timeout_s": 20},
        (None, "runtime", "memory", "killed"),
    ),
    Attack("processes_held", FORK_HOLD, {"max_processes": 16, "timeout_s": 20}),
    Attack("threads_held", THREAD_HOLD, {"max_processes": 16, "timeout_s": 20}),
    # kernel surfaces
    Attack("io_uring", IO_URING, x86=True),
    Attack("user_namespaces", USERNS, x86=True),
    Attack("ptrace", PTRACE, x86=True),
    Attack("keyring_syscalls", KEYCTL, x86=True),
    Attack("kernel_misc", KERNEL_MISC, x86=True),
    Attack("i386_and_x32_abi", I386, kinds=(None, "runtime", "killed"), x86=True),
    Attack("sockets", SOCKETS),
    Attack("fds_and_status_forgery", FD_AND_STATUS, kinds=("runtime",)),
    Attack("hostname", HOSTNAME),
]


def escapes(r: SandboxResult) -> list[str]:
    return [line for line in (r.stdout + r.stderr).splitlines() if "ESCAPED" in line or TOKEN in line]


@pytest.mark.parametrize(
    "attack",
    [pytest.param(a, id=a.name, marks=[pytest.mark.slow] if a.slow else []) for a in ATTACKS],
)
def test_attack(attack: Attack):
    if attack.x86 and not X86_64:
        pytest.skip("x86-64 syscall numbers")
    r = run_python(attack.code, **{"timeout_s": 15, **attack.kw})
    assert escapes(r) == [], r
    assert r.error_kind in attack.kinds, r
    if attack.host_check is not None:
        assert not attack.host_check(), r
    if attack.kinds == (None, "runtime"):
        assert "HELD" in r.stdout, r  # the program got to make its attempts


# ---------------------------------------------------------------- attacks that need the host's side


def _wait_gone(marker: str, within_s: float = 2.0) -> list[int]:
    end = time.monotonic() + within_s
    while True:
        pids = []
        for p in os.listdir("/proc"):
            try:
                if p.isdigit() and marker in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"):
                    if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        pids.append(int(p))
            except OSError:
                pass
        if not pids or time.monotonic() > end:
            return pids
        time.sleep(0.05)


def _wait_for(marker: str, started: threading.Event, within_s: float = 3.0) -> None:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if _wait_gone(marker, 0):
            started.set()
            return
        time.sleep(0.02)


def sleep_marker() -> str:
    """A unique argument for `sleep` (a number of seconds), findable in /proc/*/cmdline."""
    return f"{100_000 + uuid.uuid4().int % 900_000}.{uuid.uuid4().int % 10**9:09d}"


def _run_cgroups() -> list[str]:
    from ossrl.sandbox.cgroup import PREFIX, _hierarchies

    mine = f"{PREFIX}{os.getpid()}-"
    return [n for d in set(_hierarchies().values()) if os.path.isdir(d) for n in os.listdir(d) if n.startswith(mine)]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_attack_host_unix_socket(tmp_path):
    path = Path("/tmp") / f"{TAG}.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen()
    server.setblocking(False)
    try:
        code = PRELUDE + (
            f"def go():\n    s = socket.socket(socket.AF_UNIX)\n    s.connect({str(path)!r})\n    return True\n"
            "attempt('connect to a host unix socket', go)\n"
        )
        r = run_python(code, timeout_s=10)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
        path.unlink(missing_ok=True)
    assert escapes(r) == [] and "HELD" in r.stdout, r


def test_attack_host_abstract_socket():
    name = f"\0{TAG}"
    server = socket.socket(socket.AF_UNIX)
    server.bind(name)
    server.listen()
    server.setblocking(False)
    try:
        code = PRELUDE + (
            f"def go():\n    s = socket.socket(socket.AF_UNIX)\n    s.connect({name!r})\n    return True\n"
            "attempt('connect to a host abstract unix socket', go)\n"
        )
        r = run_python(code, timeout_s=10)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    assert escapes(r) == [], r


def test_attack_host_fifo():
    path = Path("/tmp") / f"{TAG}.fifo"
    os.mkfifo(path)
    path.chmod(0o666)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        code = PRELUDE + (
            f"attempt('write to a host FIFO', lambda: os.write(os.open({str(path)!r}, os.O_WRONLY | os.O_NONBLOCK), "
            "b'pwned') == 5)\n"
        )
        r = run_python(code, timeout_s=10)
        try:
            got = os.read(reader, 100)
        except BlockingIOError:
            got = b""
    finally:
        os.close(reader)
        path.unlink()
    assert got == b"" and escapes(r) == [], (got, r)


def test_attack_host_sysv_shm():
    """A world-readable SysV shared memory segment of the host (IPC namespaces keep them apart)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    key = 0x05A7_0000 | (os.getpid() & 0xFFFF)
    shmid = libc.shmget(key, 4096, 0o1666)  # IPC_CREAT | 0666
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    try:
        addr = libc.shmat(shmid, None, 0)
        ctypes.memmove(addr, TOKEN.encode(), len(TOKEN))
        libc.shmdt(ctypes.c_void_p(addr))
        code = PRELUDE + (
            "libc.shmat.restype = ctypes.c_void_p\n"
            f"def go():\n    i = libc.shmget({key}, 0, 0)\n"
            "    if i < 0:\n        raise OSError(ctypes.get_errno(), 'shmget')\n"
            f"    a = libc.shmat(i, None, 0o10000)\n    return ctypes.string_at(a, {len(TOKEN)}).decode()\n"
            "attempt('read a host SysV shm segment', go)\n"
        )
        r = run_python(code, timeout_s=10)
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID
    assert escapes(r) == [], r


@pytest.fixture
def sentinel():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    assert alive, "a host process was killed from inside the sandbox"


def test_attack_signals_to_host(sentinel):
    targets = [os.getpid(), os.getppid(), sentinel.pid, 1, -1, 0]
    code = (
        PRELUDE
        + f"for pid in {targets!r}[:-1]:\n"
        + (
            "    attempt(f'kill({pid})', lambda pid=pid: os.kill(pid, 9) is None and pid not in (os.getpid(), 0))\n"
            f"attempt('killpg of the host', lambda: os.killpg({os.getpgid(0)}, 9) is None)\n"
            "attempt('kill my parent', lambda: os.kill(os.getppid(), 9) is None and os.getppid() > 1)\n"
        )
    )
    r = run_python(code, timeout_s=10)
    assert sentinel.poll() is None and escapes(r) == [], r


@pytest.mark.parametrize("ending", ["exit", "timeout"])
def test_attack_daemon_and_time_bomb(ending, sentinel):
    """setsid + double fork; the grandchild waits for the run to end, then tries to act."""
    marker = sleep_marker()
    code = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(0.5)\n"
        f"        try:\n            os.kill({sentinel.pid}, 9)\n        except OSError:\n            pass\n"
        f"        os.execvp('sleep', ['sleep', '{marker}'])\n    os._exit(0)\n"
    )
    code += "time.sleep(0.8)\n" if ending == "exit" else "while True:\n    pass\n"
    started = threading.Event()
    watcher = threading.Thread(target=lambda: _wait_for(marker, started), daemon=True)
    watcher.start()
    r = run_python(code, timeout_s=1.5)
    watcher.join()
    assert started.is_set(), "the daemon never started: the test proves nothing"
    assert r.error_kind == (None if ending == "exit" else "timeout"), r
    assert _wait_gone(marker, 0.5) == []
    time.sleep(1.0)  # the bomb's timer has run out: nothing of it may be left to go off
    assert _wait_gone(marker, 0) == [] and sentinel.poll() is None
    assert _run_cgroups() == []  # the run's cgroup, which listed the daemon, is gone


def test_attack_output_after_exit():
    """A child keeps the pipes and writes forever after the main program ended: the run ends, output capped."""
    code = (
        "import os, sys\nif os.fork() == 0:\n    while True:\n        sys.stdout.write('y' * 65536)\n"
        "print('main done', flush=True)\n"
    )
    t0 = time.monotonic()
    r = run_python(code, timeout_s=10, max_output_bytes=200_000)
    assert time.monotonic() - t0 < 5, r
    assert len(r.stdout) <= 200_000


def _in_child(fn, *args):
    """Run fn(*args) in a forked child of this process; return what it returned (or raise what it raised)."""
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            try:
                out = (True, fn(*args))
            except BaseException as e:
                out = (False, e)
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    ok, value = pickle.loads(b"".join(chunks))
    if not ok:
        raise value
    return value


KEYCTL_JOIN, KEYCTL_SEARCH, KEY_SPEC_SESSION = 1, 10, -3


def _keyring_run(code: str) -> SandboxResult:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(250, KEYCTL_JOIN, b"ossrl-test") > 0, os.strerror(ctypes.get_errno())
    payload = TOKEN.encode()
    assert libc.syscall(248, b"user", b"ossrl-secret", payload, len(payload), KEY_SPEC_SESSION) > 0
    return run_python(code, timeout_s=10)


@pytest.mark.skipif(not X86_64, reason="x86-64 syscall numbers")
def test_attack_parent_session_keyring():
    code = PRELUDE + (
        "def read_key():\n"
        "    kid = sc(250, 10, -3, b'user', b'ossrl-secret', 0)\n"
        "    buf = ctypes.create_string_buffer(256)\n"
        "    n = sc(250, 11, kid, buf, 256)\n"
        "    return buf.raw[:n].decode()\n"
        "attempt('read a key of the parent session keyring', read_key)\n"
        "attempt('/proc/keys lists the parent key', lambda: [l for l in open('/proc/keys') if 'ossrl-secret' in l])\n"
    )
    r = _in_child(_keyring_run, code)
    assert escapes(r) == [], r


# ---------------------------------------------------------------- the caller is not root (simulated)

UNPRIV_UID = 0x6F00_0000 + (os.getpid() & 0xFFFF)  # a uid nothing on this host owns
DOCKER_LIKE_GID = UNPRIV_UID + 1  # a supplementary group that owns a host file (think: the docker group)
MS_REC, MS_PRIVATE = 16384, 1 << 18


def _expose_interpreter() -> None:
    """In a private mount namespace, make this interpreter reachable for an unprivileged uid (pyenv lives in /root,
    mode 700): cover each closed ancestor with an empty tmpfs and bind the interpreter's prefix back."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert (
        libc.unshare(0x00020000) == 0 and libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None) == 0
    )
    prefixes = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)})
    fds = {p: os.open(p, os.O_PATH) for p in prefixes}
    covered: set[str] = set()
    for p in prefixes:
        closed = [a for a in [*reversed(Path(p).parents), Path(p)] if not a.stat().st_mode & 0o001]
        if not closed:
            continue
        top = str(closed[0])
        if top not in covered:
            assert libc.mount(b"tmpfs", top.encode(), b"tmpfs", 0, b"mode=0755") == 0
            covered.add(top)
        os.makedirs(p, exist_ok=True)
        assert (
            libc.mount(f"/proc/self/fd/{fds[p]}".encode(), p.encode(), None, ctypes.c_ulong(4096 | MS_REC), None) == 0
        )


def _as_user(fn, *args, env: dict[str, str] | None = None, **kw):
    """fn(*args, **kw) in a forked child that dropped to UNPRIV_UID with the supplementary group DOCKER_LIKE_GID."""

    def child():
        _expose_interpreter()
        os.setgroups([DOCKER_LIKE_GID])
        os.setresgid(UNPRIV_UID, UNPRIV_UID, UNPRIV_UID)
        os.setresuid(UNPRIV_UID, UNPRIV_UID, UNPRIV_UID)
        os.environ.update(env or {})
        return fn(*args, **kw)

    return _in_child(child)


@pytest.fixture
def unprivileged_home(tmp_path_factory):
    """The unprivileged caller's home with an ssh key, and a host file only the docker-like group may read."""
    base = Path(f"/tmp/{TAG}-home")
    (base / ".ssh").mkdir(parents=True)
    (base / ".ssh" / "id_ed25519").write_text(TOKEN)
    for p in (base, base / ".ssh", base / ".ssh" / "id_ed25519"):
        os.chown(p, UNPRIV_UID, UNPRIV_UID)
    (base / ".ssh").chmod(0o700)
    (base / ".ssh" / "id_ed25519").chmod(0o600)
    group_file = Path(f"/tmp/{TAG}-group-secret")
    group_file.write_text(TOKEN)
    os.chown(group_file, 0, DOCKER_LIKE_GID)
    group_file.chmod(0o640)
    yield base, group_file
    import shutil

    shutil.rmtree(base)
    group_file.unlink()


def _run_or_error(code: str, **kw) -> SandboxResult | str:
    from ossrl.sandbox import SandboxError

    try:
        return run_python(code, **kw)
    except SandboxError as e:
        return f"SandboxError: {e}"


def test_unprivileged_refuses_without_opt_in(unprivileged_home):
    """Not root: no cgroup can be made here, so the run is refused, naming what is missing and how to opt in."""
    home, _ = unprivileged_home
    out = _as_user(_run_or_error, "print('ran')", env={"HOME": str(home)})
    assert isinstance(out, str) and "refusing to run untrusted code without cgroup" in out, out
    assert "allow_unisolated=True" in out and "OSSRL_SANDBOX_ALLOW_UNISOLATED=1" in out


def test_unprivileged_user_namespace_attacks(unprivileged_home):
    """Not root, opted in: the caller's ~/.ssh, a file of its supplementary group and the host's homes stay out."""
    home, group_file = unprivileged_home
    code = read_files(home / ".ssh" / "id_ed25519") + (
        f"attempt('read the caller\\'s ssh key', lambda: open({str(home / '.ssh' / 'id_ed25519')!r}).read())\n"
        f"attempt('read a file of a supplementary group', lambda: open({str(group_file)!r}).read())\n"
        f"attempt('list the caller\\'s home', lambda: os.listdir({str(home)!r}))\n"
        "attempt('expanduser finds the real home', lambda: os.path.expanduser('~') != os.getcwd())\n"
        "attempt('open init\\'s fds (the status pipe)', lambda: os.listdir('/proc/1/fd'))\n"
        "attempt('forge a status line', lambda: [os.write(os.open(f'/proc/1/fd/{n}', os.O_WRONLY), b'{}') for n in "
        "range(3, 12) if os.path.exists(f'/proc/1/fd/{n}')])\n"
        "attempt('ptrace init', lambda: sc(101, 16, 1, 0, 0) == 0)\n"
        "print('groups', os.getgroups(), 'uid', os.getuid())\n"
    )
    code += list_dirs("/home", "/root", "/tmp")[len(PRELUDE) :]
    r = _as_user(_run_or_error, code, allow_unisolated=True, env={"HOME": str(home)})
    assert isinstance(r, SandboxResult), r
    assert escapes(r) == [] and r.ok, r
    assert {"userns", "pivot_root", "pidns", "netns", "seccomp", "keyring", "nnp"} <= set(r.protections), r
    assert "groups" not in r.protections and r.missing == ("cgroup",), r  # an unprivileged user cannot drop groups


def test_unprivileged_without_namespaces_attacks(unprivileged_home):
    """Not root and no namespaces (opted in through the environment): the program runs under the caller's own
    uid, yet it may not kill a host process of that uid, read its environment, or leave a daemon behind."""
    home, _ = unprivileged_home

    def scenario():
        victim = subprocess.Popen(["sleep", "60"], env={"OSSRL_VICTIM": TOKEN})
        try:
            code = PRELUDE + (
                f"attempt('kill a host process of my uid', lambda: os.kill({victim.pid}, 9) is None)\n"
                f"attempt('read its environment', lambda: open('/proc/{victim.pid}/environ').read())\n"
                f"attempt('kill my parent', lambda: os.kill(os.getppid(), 9) is None)\n"
                f"attempt('read the host project', lambda: open({str(REPO / 'README.md')!r}).read(10))\n"
                "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                "        print('daemon', os.getpid(), flush=True)\n        time.sleep(60)\n    os._exit(0)\n"
                "time.sleep(0.3)\n"
            )
            r = _run_or_error(code, namespaces=False)
            time.sleep(0.3)
            daemon = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("daemon ")]
            return r, victim.poll() is None, [p for p in daemon if _alive(p)]
        finally:
            victim.kill()
            victim.wait()

    out = _as_user(_run_or_error, "print('ran')", namespaces=False, env={"HOME": str(home)})
    assert isinstance(out, str) and "pidns" in out and "refusing" in out, out
    r, victim_alive, daemons = _as_user(scenario, env={"HOME": str(home), "OSSRL_SANDBOX_ALLOW_UNISOLATED": "1"})
    assert isinstance(r, SandboxResult) and escapes(r) == [], r
    assert victim_alive and daemons == [], (r, daemons)
    assert {"landlock", "landlock_scope", "seccomp"} <= set(r.protections) and "pidns" in r.missing, r


def test_attack_concurrent_runs_cannot_meet():
    """Two runs at once (two samples of one group): the second finds nothing the first left for it — no shared
    /dev/shm, abstract socket, SysV segment, temp dir or process."""
    key = 0x05A8_0000 | (os.getpid() & 0xFFFF)
    first = PRELUDE + (
        f"open('/dev/shm/{TAG}', 'w').write('hello')\n"
        f"s = socket.socket(socket.AF_UNIX)\ns.bind('\\0{TAG}')\ns.listen()\n"
        f"libc.shmget({key}, 4096, 0o1666)\n"
        f"open('{TAG}', 'w').write('hello')\n"
        "print('ready', flush=True)\ntime.sleep(2)\n"
    )
    second = PRELUDE + (
        f"attempt('the other run\\'s /dev/shm', lambda: os.listdir('/dev/shm'))\n"
        f"attempt('its abstract socket', lambda: socket.socket(socket.AF_UNIX).connect('\\0{TAG}') is None)\n"
        f"attempt('its SysV segment', lambda: libc.shmget({key}, 0, 0) >= 0)\n"
        "import glob\n"
        f"attempt('its work dir', lambda: glob.glob('/tmp/*/work/{TAG}') + glob.glob('/tmp/*/{TAG}'))\n"
        "attempt('its processes', lambda: [p for p in os.listdir('/proc') if p.isdigit() and int(p) > 3])\n"
    )
    results: dict[str, SandboxResult] = {}
    t = threading.Thread(target=lambda: results.setdefault("first", run_python(first, timeout_s=10)))
    t.start()
    time.sleep(0.8)
    results["second"] = run_python(second, timeout_s=10)
    t.join()
    assert results["first"].ok and "ready" in results["first"].stdout, results["first"]
    assert escapes(results["second"]) == [] and results["second"].ok, results["second"]
